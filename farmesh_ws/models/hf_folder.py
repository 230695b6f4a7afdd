"""Writing a Hugging Face model folder (config, weights, tokenizer) from a GGUF file.

The folder is what both `transformers.LlamaForCausalLM.from_pretrained` and Petals load
from a local path: a single unsharded `model.safetensors` (Petals 2.2 looks for
`model.safetensors.index.json` first and falls back to `model.safetensors`), float32,
tied embeddings, hence no `lm_head.weight`. Its `generation_config.json` carries the model's
recommended sampling (:data:`farmesh_ws.models.generation.BUNDLED_GENERATION`), which the
browser page and `farmesh-ws chat` read back through `/models`.
"""

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
from safetensors.numpy import save_file
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig

from farmesh_ws.models.errors import ModelPreparationError
from farmesh_ws.models.generation import BUNDLED_GENERATION
from farmesh_ws.models.gguf_tokenizer import write_tokenizer
from farmesh_ws.models.gguf_weights import (
    FloatArray,
    LlamaHyperparams,
    expected_hf_names,
    iter_hf_tensors,
)
from farmesh_ws.models.gguf_weights import read_hyperparams as read_llama_hyperparams

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
FOLDER_FILES = (
    "config.json",
    "generation_config.json",
    WEIGHTS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def open_gguf(path: Path) -> Any:
    """Open a GGUF read-only (memory-mapped), turning a malformed file into a clear error."""
    try:
        return gguf.GGUFReader(path, "r")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelPreparationError(f"{path} is not a readable GGUF file: {exc}") from exc


def _write_weights(reader: Any, params: LlamaHyperparams, folder: Path, progress: bool) -> None:
    state: dict[str, FloatArray] = {}
    with tqdm(
        total=len(reader.tensors),
        desc="Converting GGUF tensors",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
    ) as bar:
        for name, array in iter_hf_tensors(reader, params):
            if name in state:
                raise ModelPreparationError(f"GGUF holds tensor {name!r} twice")
            state[name] = array
            bar.update(1)
    expected = expected_hf_names(params)
    if state.keys() != expected:
        missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
        raise ModelPreparationError(
            f"GGUF tensors do not match its hyperparameters: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def write_configs(
    folder: Path, params: LlamaHyperparams, generation: Mapping[str, bool | float | int]
) -> None:
    """Write ``config.json`` (Llama, from ``params``) and ``generation_config.json`` (the
    model's token ids and the ``generation`` keywords) into ``folder``."""
    LlamaConfig(**params.llama_config_kwargs()).save_pretrained(str(folder))
    GenerationConfig(
        bos_token_id=params.bos_token_id,
        eos_token_id=params.eos_token_id,
        pad_token_id=params.pad_token_id,
        **generation,
    ).save_pretrained(str(folder))


def write_hf_folder(
    gguf_path: Path,
    folder: Path,
    *,
    progress: bool,
    generation: Mapping[str, bool | float | int] = BUNDLED_GENERATION,
) -> LlamaHyperparams:
    """Convert `gguf_path` into the (existing, empty) directory `folder`; `generation` is
    the recommended sampling to record (transformers `GenerationConfig` keywords)."""
    reader = open_gguf(gguf_path)
    params = read_llama_hyperparams(reader)
    write_configs(folder, params, generation)
    write_tokenizer(reader, folder)
    _write_weights(reader, params, folder, progress)
    logger.debug("wrote %s from %s", folder, gguf_path)
    return params
