"""The tiny random-weight model: deterministic from its seed, rebuilt only when needed, and a
folder transformers loads with the bundled tokenizer's chat template."""

import os
from pathlib import Path

import numpy as np
import pytest

from farmesh_ws.home import farmesh_home
from farmesh_ws.models.bundled import read_marker
from farmesh_ws.models.gguf_weights import expected_hf_names
from farmesh_ws.models.tiny import TinyShape, prepare_tiny_model, tiny_weights, weights_sha256

SMALL = TinyShape(num_blocks=2)


def test_same_seed_same_weights_hash_other_seed_other(tmp_path: Path) -> None:
    home = farmesh_home()
    first = prepare_tiny_model(home, seed=7, shape=SMALL, folder=tmp_path / "a")
    second = prepare_tiny_model(home, seed=7, shape=SMALL, folder=tmp_path / "b")
    other = prepare_tiny_model(home, seed=8, shape=SMALL, folder=tmp_path / "c")

    assert weights_sha256(first) == weights_sha256(second) != weights_sha256(other)
    marker = read_marker(first)
    assert marker is not None
    assert marker["weights_sha256"] == weights_sha256(first)
    assert marker["seed"] == 7
    assert marker["shape"]["num_blocks"] == 2


def test_rebuilds_only_when_missing_or_changed(tmp_path: Path) -> None:
    home, folder = farmesh_home(), tmp_path / "tiny"
    prepare_tiny_model(home, seed=0, shape=SMALL, folder=folder)
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(1, 1))

    prepare_tiny_model(home, seed=0, shape=SMALL, folder=folder)
    assert weights.stat().st_mtime_ns == 1  # current: kept

    prepare_tiny_model(home, seed=1, shape=SMALL, folder=folder)
    assert weights.stat().st_mtime_ns != 1  # another seed: rebuilt
    assert (read_marker(folder) or {}).get("seed") == 1

    (folder / "config.json").unlink()
    prepare_tiny_model(home, seed=1, shape=SMALL, folder=folder)
    assert (folder / "config.json").is_file()  # incomplete: rebuilt


def test_weights_shapes_and_norms() -> None:
    weights = tiny_weights(SMALL, seed=3)
    assert [(name, array.shape) for name, array in weights.items()] == SMALL.tensor_shapes()
    assert weights.keys() == expected_hf_names(SMALL.hyperparams())
    assert all(array.dtype == np.float32 for array in weights.values())
    assert np.all(weights["model.norm.weight"] == 1)
    assert 0.015 < float(weights["model.embed_tokens.weight"].std()) < 0.025


@pytest.mark.filterwarnings(
    "ignore:`torch.utils._pytree._register_pytree_node` is deprecated:FutureWarning"
)
def test_transformers_loads_it_with_the_chat_template(tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = prepare_tiny_model(farmesh_home(), seed=0, shape=SMALL, folder=tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = model(input_ids=ids).logits

    assert model.config.num_hidden_layers == 2
    assert logits.shape == (1, ids.shape[1], SMALL.vocab_size)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # tied
