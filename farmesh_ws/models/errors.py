"""The one error model preparation raises, so callers (the CLI, the swarm) can report it cleanly."""


class ModelPreparationError(Exception):
    """The bundled model could not be turned into a Hugging Face folder.

    Raised for a missing package or file, a file whose hash or content is not what the
    converter expects, or a GGUF this converter does not support. The message says which.
    """
