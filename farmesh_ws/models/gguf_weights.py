"""Llama weights out of a GGUF: hyperparameters, dequantized float32 tensors under HF names.

llama.cpp stores Q and K projections with their rows permuted for its RoPE layout (the two
rotary halves of each head interleaved); `unpermute_rope_rows` undoes that so the tensors
match what transformers' `LlamaAttention` expects.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
from numpy.typing import NDArray

from farmesh_ws.models.errors import ModelPreparationError
from farmesh_ws.models.gguf_fields import float_field, int_field, optional_field_value, str_field

FloatArray = NDArray[np.float32]

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class LlamaHyperparams:
    """The architecture numbers a `LlamaConfig` needs, as the GGUF states them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None
    tie_word_embeddings: bool

    def llama_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `transformers.LlamaConfig`."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        }


def _float32_decimal(value: float) -> float:
    """The shortest decimal of a float32 value: GGUF's 9.9999997e-06 is the model's 1e-05."""
    return float(str(np.float32(value)))


def read_hyperparams(reader: Any) -> LlamaHyperparams:
    """Read and sanity-check the Llama hyperparameters of an open `gguf.GGUFReader`."""
    arch = str_field(reader, "general.architecture")
    if arch != "llama":
        raise ModelPreparationError(f"unsupported GGUF architecture {arch!r} (expected 'llama')")
    tensor_names = {tensor.name for tensor in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ModelPreparationError("GGUF has no token_embd.weight tensor")
    vocab_size = int(embedding.shape[1])
    declared_vocab = optional_field_value(reader, "llama.vocab_size")
    if declared_vocab is not None and int(declared_vocab) != vocab_size:
        raise ModelPreparationError(
            f"GGUF llama.vocab_size {declared_vocab} differs from the embedding's {vocab_size}"
        )
    hidden = int_field(reader, "llama.embedding_length")
    n_head = int_field(reader, "llama.attention.head_count")
    n_head_kv = optional_field_value(reader, "llama.attention.head_count_kv")
    rope_dims = optional_field_value(reader, "llama.rope.dimension_count")
    if hidden % n_head or (rope_dims is not None and int(rope_dims) != hidden // n_head):
        raise ModelPreparationError(
            "only full-head RoPE with hidden_size divisible by head_count is supported"
        )
    if optional_field_value(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ModelPreparationError("GGUF uses RoPE scaling, which this converter does not map")
    pad = optional_field_value(reader, "tokenizer.ggml.padding_token_id")
    freq_base = optional_field_value(reader, "llama.rope.freq_base")
    return LlamaHyperparams(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int_field(reader, "llama.feed_forward_length"),
        num_hidden_layers=int_field(reader, "llama.block_count"),
        num_attention_heads=n_head,
        num_key_value_heads=n_head if n_head_kv is None else int(n_head_kv),
        max_position_embeddings=int_field(reader, "llama.context_length"),
        rms_norm_eps=_float32_decimal(
            float_field(reader, "llama.attention.layer_norm_rms_epsilon")
        ),
        rope_theta=10000.0 if freq_base is None else _float32_decimal(float(freq_base)),
        bos_token_id=int_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=int_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=None if pad is None else int(pad),
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def unpermute_rope_rows(weights: FloatArray, n_head: int) -> FloatArray:
    """Undo llama.cpp's per-head RoPE row permutation of a Q or K projection.

    llama.cpp views each head's rows as (2, head_dim/2) and swaps those axes; this views
    them as (head_dim/2, 2) and swaps back.
    """
    rows = weights.shape[0]
    if rows % (2 * n_head):
        raise ModelPreparationError(f"{rows} rows cannot be split into {n_head} RoPE heads")
    half = rows // n_head // 2
    restored = weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2)
    return np.ascontiguousarray(restored.reshape(weights.shape))


def hf_name(gguf_name: str) -> str:
    """The transformers `LlamaForCausalLM` state-dict key of a GGUF tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ModelPreparationError(f"unexpected GGUF tensor {gguf_name!r}")
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"


def expected_hf_names(params: LlamaHyperparams) -> set[str]:
    """Every state-dict key a complete model with these hyperparameters has."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not params.tie_word_embeddings:
        names.add("lm_head.weight")
    for index in range(params.num_hidden_layers):
        names.update(f"model.layers.{index}.{suffix}" for suffix in _BLOCK_NAMES.values())
    return names


def dequantize_tensor(tensor: Any) -> FloatArray:
    """A GGUF tensor as a C-contiguous float32 array in numpy (row-major, HF) order."""
    expected_shape = tuple(int(dim) for dim in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ModelPreparationError(
            f"GGUF tensor {tensor.name!r} uses unsupported type {tensor.tensor_type.name}"
        ) from exc
    array = np.array(values, dtype=np.float32, order="C", copy=True)
    if array.size != int(np.prod(expected_shape)):
        raise ModelPreparationError(
            f"GGUF tensor {tensor.name!r} has {array.size} values, not {expected_shape}"
        )
    return array.reshape(expected_shape)


def iter_hf_tensors(reader: Any, params: LlamaHyperparams) -> Iterator[tuple[str, FloatArray]]:
    """Yield (HF name, float32 array) for every tensor, Q/K rows restored to HF order."""
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        array = dequantize_tensor(tensor)
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rope_rows(array, params.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rope_rows(array, params.num_key_value_heads)
        yield name, array
