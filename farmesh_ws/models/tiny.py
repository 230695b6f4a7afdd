"""A tiny Llama-architecture model with random weights, built locally for benchmarks and tests.

Run: ``python -m farmesh_ws.models.tiny [--home DIR] [--seed N]`` (prints the folder).

The folder is what Petals servers and transformers load, like the bundled model's
(:mod:`farmesh_ws.models.hf_folder`): ``config.json`` (Llama, tied embeddings), a greedy
``generation_config.json``, one float32 ``model.safetensors``, and the bundled SmolLM2
tokenizer files with its chat template, so the gateway's chat path works unchanged. The
weights are drawn from NumPy's PCG64 generator seeded with ``seed`` (normal, standard
deviation 0.02; norm weights 1), in a fixed tensor order, so the same seed and shape give
the same bytes on every machine. Building takes about a second; like the bundled model's
preparation it runs under a file lock, in a staging folder renamed into place, and is
skipped when the folder's marker (``farmesh-conversion.json``: seed, shape, tokenizer files'
hash, builder version, weights hash) matches the requested build.
"""

import argparse
import hashlib
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from farmesh_ws.models.bundled import (
    _apply_umask_to_files,
    _exclusive_lock,
    _make_sibling_dir,
    _move_into_place,
    _remove_leftovers,
    _write_marker,
    prepare_bundled_model,
    read_marker,
)
from farmesh_ws.models.gguf_weights import LlamaHyperparams
from farmesh_ws.models.hf_folder import FOLDER_FILES, WEIGHTS_FILE, write_configs

logger = logging.getLogger(__name__)

TINY_MODEL_ID: Final = "farmesh-tiny-llama"
BUILDER_VERSION: Final = "1"
TOKENIZER_FILES: Final = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
INIT_STD: Final = 0.02


@dataclass(frozen=True, slots=True)
class TinyShape:
    """Hyperparameters of the tiny model. ``vocab_size`` must be the SmolLM2 tokenizer's
    (49,152) for its ids to index the embedding; ``hidden_size`` divisible by ``heads``,
    ``heads`` by ``kv_heads``."""

    num_blocks: int = 6
    hidden_size: int = 64
    intermediate_size: int = 128
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 49152
    max_positions: int = 2048

    def hyperparams(self) -> LlamaHyperparams:
        """The model's ``LlamaConfig`` numbers; token ids as the SmolLM2 tokenizer's."""
        return LlamaHyperparams(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_blocks,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            tie_word_embeddings=True,
        )

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight's Hugging Face name and shape, in the order they are drawn."""
        hidden, head_dim = self.hidden_size, self.hidden_size // self.heads
        kv = self.kv_heads * head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab_size, hidden))
        ]
        for block in range(self.num_blocks):
            prefix = f"model.layers.{block}"
            shapes += [
                (f"{prefix}.input_layernorm.weight", (hidden,)),
                (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
                (f"{prefix}.self_attn.k_proj.weight", (kv, hidden)),
                (f"{prefix}.self_attn.v_proj.weight", (kv, hidden)),
                (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
                (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
                (f"{prefix}.mlp.gate_proj.weight", (self.intermediate_size, hidden)),
                (f"{prefix}.mlp.up_proj.weight", (self.intermediate_size, hidden)),
                (f"{prefix}.mlp.down_proj.weight", (hidden, self.intermediate_size)),
            ]
        shapes.append(("model.norm.weight", (hidden,)))
        return shapes


def tiny_weights(shape: TinyShape, seed: int) -> dict[str, np.ndarray[Any, Any]]:
    """The model's float32 tensors by name: norms 1, everything else N(0, 0.02²) from
    PCG64(``seed``), drawn in :meth:`TinyShape.tensor_shapes` order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    weights: dict[str, np.ndarray[Any, Any]] = {}
    for name, dims in shape.tensor_shapes():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(dims, dtype=np.float32)
        else:
            weights[name] = (rng.standard_normal(dims, dtype=np.float32) * INIT_STD).astype(
                np.float32
            )
    return weights


def weights_sha256(folder: Path) -> str:
    """SHA-256 hex digest of ``folder``'s weights file."""
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


def prepare_tiny_model(
    home: Path, *, seed: int = 0, shape: TinyShape | None = None, folder: Path | None = None
) -> Path:
    """Make sure ``folder`` (default ``home/models/farmesh-tiny-llama``) holds the tiny model
    of ``seed`` and ``shape``; build it (≈1 s, ~13 MB with the default shape) only when it
    is missing, incomplete, or of another seed, shape, tokenizer or builder version. Returns
    the folder.
    Prepares the bundled model first for its tokenizer; raises
    :class:`~farmesh_ws.models.errors.ModelPreparationError` when that fails."""
    shape = shape or TinyShape()
    folder = folder or Path(home) / "models" / TINY_MODEL_ID
    tokenizer_source = prepare_bundled_model(home, progress=False)
    wanted = {
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "shape": asdict(shape),
        "tokenizer_sha256": _files_sha256(tokenizer_source, TOKENIZER_FILES),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(folder.parent / f".{folder.name}.lock"):
        if _is_current(folder, wanted):
            return folder
        _remove_leftovers(folder)
        staging = _make_sibling_dir(folder, "partial")
        try:
            _write_folder(staging, shape, seed, tokenizer_source)
            _apply_umask_to_files(staging)
            _write_marker(staging, {**wanted, "weights_sha256": weights_sha256(staging)})
            _move_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("built the tiny model (seed %d) into %s", seed, folder)
        return folder


def _files_sha256(folder: Path, names: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _is_current(folder: Path, wanted: dict[str, Any]) -> bool:
    marker = read_marker(folder)
    if marker is None or any(marker.get(key) != value for key, value in wanted.items()):
        return False
    return all((folder / name).is_file() for name in FOLDER_FILES)


def _write_folder(folder: Path, shape: TinyShape, seed: int, tokenizer_source: Path) -> None:
    from safetensors.numpy import save_file

    write_configs(folder, shape.hyperparams(), generation={})  # no sampling: greedy
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_source / name, folder / name)
    save_file(tiny_weights(shape, seed), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    """CLI: build (or find current) the tiny model and print its folder."""
    from farmesh_ws.home import farmesh_home

    parser = argparse.ArgumentParser(prog="python -m farmesh_ws.models.tiny")
    parser.add_argument("--home", type=Path, default=None, help="default: $FARMESH_HOME")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--blocks", type=int, default=6, help="transformer blocks (default 6)")
    args = parser.parse_args(argv)
    home = args.home or farmesh_home()
    folder = prepare_tiny_model(home, seed=args.seed, shape=TinyShape(num_blocks=args.blocks))
    print(folder)  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
