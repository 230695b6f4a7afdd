"""The bundled model folder against the golden data, and the converter's own pieces.

The golden file was produced from the same GGUF by an independent loader, so equal ids and
greedy continuations mean the weights, the Q/K unpermutation and the tokenizer are right.
"""

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from farmesh_ws.home import farmesh_home
from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
from farmesh_ws.models.bundled import (
    CONVERTER_VERSION,
    MARKER_FILE,
    prepare_bundled_model,
    prepare_model_folder,
    read_marker,
)
from farmesh_ws.models.errors import ModelPreparationError
from farmesh_ws.models.generation import recommended_sampling
from farmesh_ws.models.gguf_source import GGUFSource, locate_bundled_gguf
from farmesh_ws.models.gguf_weights import FloatArray, hf_name, unpermute_rope_rows
from farmesh_ws.models.hf_folder import write_hf_folder

# transformers 4.34.1 calls a torch API that torch 2.13 deprecates, once, at import time.
TRANSFORMERS_ON_NEW_TORCH = pytest.mark.filterwarnings(
    "ignore:`torch.utils._pytree._register_pytree_node` is deprecated:FutureWarning"
)


@pytest.fixture(scope="module")
def model_folder() -> Path:
    return prepare_bundled_model(farmesh_home(), progress=False)


@pytest.fixture(scope="module")
def tokenizer(model_folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_folder))


@pytest.fixture(scope="module")
def model(model_folder: Path) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(str(model_folder), torch_dtype=torch.float32)
    return loaded.eval()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def llama_cpp_permute(weights: FloatArray, n_head: int) -> FloatArray:
    """llama.cpp's Q/K row permutation, written from its definition."""
    rows, hidden = weights.shape
    head_dim = rows // n_head
    return weights.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(rows, hidden)


# --- golden data --------------------------------------------------------------------------


def test_folder_has_expected_files_and_ids(model_folder: Path, golden: dict[str, Any]) -> None:

    assert model_folder == farmesh_home() / "models" / BUNDLED_MODEL_ID
    config = json.loads((model_folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == golden["vocab_size"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (
        golden["bos_token_id"],
        golden["eos_token_id"],
    )
    generation = json.loads((model_folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == golden["eos_token_id"]
    assert not (model_folder / "model.safetensors.index.json").exists()


@TRANSFORMERS_ON_NEW_TORCH
def test_folder_recommends_the_model_cards_sampling(model_folder: Path) -> None:
    """The model card's usage example samples with temperature 0.2 and top_p 0.9; the folder
    records that, and /models announces what transformers itself reads from it."""
    from transformers import GenerationConfig

    generation = json.loads((model_folder / "generation_config.json").read_text())
    assert generation["do_sample"] is True
    assert (generation["temperature"], generation["top_p"]) == (0.2, 0.9)
    marker = read_marker(model_folder)
    assert marker is not None
    assert marker["converter_version"] == CONVERTER_VERSION

    config = GenerationConfig.from_pretrained(str(model_folder))
    assert config.do_sample is True
    announced = recommended_sampling(model_folder)
    assert announced == {"temperature": 0.2, "top_p": 0.9, "top_k": 50}
    assert announced == {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
    }
    assert config.repetition_penalty == 1.0


def test_weights_are_float32_hf_names_without_lm_head(model_folder: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_folder / "model.safetensors"), framework="np") as weights:
        keys = set(weights.keys())
        assert weights.metadata() == {"format": "pt"}
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys
    assert len(keys) == 2 + 30 * 9
    assert "model.layers.29.self_attn.k_proj.weight" in keys


def test_tokenize_cases(tokenizer: Any, golden: dict[str, Any]) -> None:
    for case in golden["tokenize"]:
        ids = tokenizer(case["text"])["input_ids"]
        assert ids == case["ids"], case["text"]
        assert tokenizer.decode(ids) == case["text"]


def test_chat_template_prompts(tokenizer: Any, golden: dict[str, Any]) -> None:
    for conversation in golden["conversations"]:
        messages: list[dict[str, str]] = []
        for turn in conversation:
            messages.extend(turn["new_messages"])
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            assert prompt == turn["prompt_ids"]
            reply = tokenizer.decode(turn["greedy_48_ids"], skip_special_tokens=True)
            assert reply + tokenizer.eos_token == turn["greedy_48_text"]
            messages.append({"role": "assistant", "content": reply})


@TRANSFORMERS_ON_NEW_TORCH
def test_greedy_continuations(model: Any, golden: dict[str, Any]) -> None:
    import torch

    for conversation in golden["conversations"]:
        for turn in conversation:
            prompt = torch.tensor([turn["prompt_ids"]])
            with torch.no_grad():
                output = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    do_sample=False,
                    # The folder recommends sampling; neutral values keep greedy unwarned.
                    temperature=1.0,
                    top_p=1.0,
                    max_new_tokens=48,
                )
            assert output[0, prompt.shape[1] :].tolist() == turn["greedy_48_ids"]


@TRANSFORMERS_ON_NEW_TORCH
def test_last_logits_top5_of_first_prompt(model: Any, golden: dict[str, Any]) -> None:
    """The golden top-5 belong to the first conversation's first prompt."""
    import torch

    prompt = torch.tensor([golden["conversations"][0][0]["prompt_ids"]])
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    top = torch.topk(logits, 5)
    expected_ids = [token for token, _ in golden["last_logits_top5"]]
    expected_values = [value for _, value in golden["last_logits_top5"]]
    assert top.indices.tolist() == expected_ids
    assert top.values.tolist() == pytest.approx(expected_values, abs=1e-3)


@TRANSFORMERS_ON_NEW_TORCH
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_petals_server_loads_a_block_from_the_folder(model_folder: Path, tmp_path: Path) -> None:
    """Petals finds the unsharded model.safetensors in a local folder (no index needed)."""
    import torch
    from safetensors import safe_open

    from farmesh_ws.mesh import compat

    compat.apply()
    from petals.server.from_pretrained import load_pretrained_block

    block = load_pretrained_block(
        str(model_folder), 29, torch_dtype=torch.float32, cache_dir=str(tmp_path)
    )
    with safe_open(str(model_folder / "model.safetensors"), framework="pt") as weights:
        for name, parameter in block.named_parameters():
            assert torch.equal(parameter, weights.get_tensor(f"model.layers.29.{name}")), name


# --- preparation -------------------------------------------------------------------------


def test_second_prepare_does_not_rewrite(model_folder: Path) -> None:
    before = {path.name: path.stat().st_mtime_ns for path in model_folder.iterdir()}
    assert prepare_bundled_model(farmesh_home(), progress=False) == model_folder
    after = {path.name: path.stat().st_mtime_ns for path in model_folder.iterdir()}
    assert after == before
    marker = read_marker(model_folder)
    assert marker is not None
    assert marker["gguf_sha256"] == locate_bundled_gguf().expected_sha256


def test_fresh_concurrent_prepare_converts_once_and_matches(
    model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads preparing a fresh folder at once convert once, with the same result."""
    gguf_copy = tmp_path / "model.gguf"
    shutil.copy2(locate_bundled_gguf().path, gguf_copy)
    source = GGUFSource(gguf_copy, locate_bundled_gguf().expected_sha256)
    target = tmp_path / "models" / "copy"

    calls: list[Path] = []

    def counting_write(gguf_path: Path, folder: Path, *, progress: bool) -> Any:
        calls.append(folder)
        return write_hf_folder(gguf_path, folder, progress=progress)

    monkeypatch.setattr("farmesh_ws.models.bundled.write_hf_folder", counting_write)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(prepare_model_folder, source, target, progress=False) for _ in range(2)
        ]
        results = [future.result() for future in futures]

    assert results == [target, target]
    assert len(calls) == 1
    assert sorted(path.name for path in target.parent.iterdir()) == [".copy.lock", "copy"]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _file_sha256(target / name) == _file_sha256(model_folder / name), name

    # A touched but unchanged GGUF is re-hashed once, not re-converted.
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns
    os.utime(gguf_copy, ns=(weights_mtime + 10**9, weights_mtime + 10**9))
    assert prepare_model_folder(source, target, progress=False) == target
    assert len(calls) == 1
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime
    marker = read_marker(target)
    assert marker is not None
    assert marker["gguf_mtime_ns"] == weights_mtime + 10**9

    # A marker from another converter version means the folder is converted again.
    (target / MARKER_FILE).write_text('{"converter_version": "0"}')
    assert prepare_model_folder(source, target, progress=False) == target
    assert len(calls) == 2
    assert read_marker(target) == {**marker, "gguf_mtime_ns": weights_mtime + 10**9}
    assert sorted(path.name for path in target.parent.iterdir()) == [".copy.lock", "copy"]


def test_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    source = GGUFSource(tmp_path / "absent.gguf")
    with pytest.raises(ModelPreparationError, match=r"GGUF file not found: .*absent\.gguf"):
        prepare_model_folder(source, tmp_path / "models" / "absent", progress=False)
    assert not (tmp_path / "models" / "absent").exists()


def test_missing_package_is_a_clear_error() -> None:
    with pytest.raises(ModelPreparationError, match=r"'farmesh-no-such-package' .* not installed"):
        locate_bundled_gguf("farmesh-no-such-package")


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file" * 100)
    target = tmp_path / "models" / "broken"
    with pytest.raises(ModelPreparationError, match="is corrupt: sha256"):
        prepare_model_folder(GGUFSource(broken, "0" * 64), target, progress=False)
    with pytest.raises(ModelPreparationError, match="not a readable GGUF"):
        prepare_model_folder(GGUFSource(broken), target, progress=False)
    assert [path.name for path in target.parent.iterdir()] == [".broken.lock"]


# --- pure pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n_head", "rows"), [(9, 576), (3, 192), (2, 8)])
def test_unpermute_inverts_llama_cpp_permutation(n_head: int, rows: int) -> None:
    rng = np.random.default_rng(n_head)
    weights = rng.standard_normal((rows, 576 if rows > 8 else 3)).astype(np.float32)
    np.testing.assert_array_equal(
        unpermute_rope_rows(llama_cpp_permute(weights, n_head), n_head), weights
    )
    np.testing.assert_array_equal(
        llama_cpp_permute(unpermute_rope_rows(weights, n_head), n_head), weights
    )


def test_unpermute_restores_rotary_halves() -> None:
    """One head of 4 rows: llama.cpp interleaves halves [0 1 | 2 3] as [0 2 1 3]."""
    permuted = np.array([[0.0], [2.0], [1.0], [3.0]], dtype=np.float32)
    assert unpermute_rope_rows(permuted, 1).ravel().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_unpermute_rejects_rows_not_split_into_heads() -> None:
    with pytest.raises(ModelPreparationError):
        unpermute_rope_rows(np.zeros((10, 4), dtype=np.float32), 3)


def test_hf_names() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    with pytest.raises(ModelPreparationError, match="unexpected GGUF tensor"):
        hf_name("rope_freqs.weight")


def test_dht_prefix_for() -> None:
    assert dht_prefix_for(BUNDLED_MODEL_ID) == "SmolLM2-135M-Instruct"
    assert dht_prefix_for("HuggingFaceTB/SmolLM2-1.7B Instruct") == (
        "HuggingFaceTB-SmolLM2-1-7B-Instruct"
    )
    with pytest.raises(ValueError, match="DHT prefix"):
        dht_prefix_for("...")
