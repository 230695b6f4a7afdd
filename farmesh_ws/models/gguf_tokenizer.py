"""The GGUF's GPT-2-style byte-level BPE tokenizer rebuilt as a transformers fast tokenizer.

It is built and saved with the installed tokenizers 0.14.1, because that version cannot
read a tokenizer.json written by newer releases. Like the reference, it adds no BOS on a
plain encode; the chat template from the GGUF supplies the `<|im_start|>` markers.
"""

from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from farmesh_ws.models.errors import ModelPreparationError
from farmesh_ws.models.gguf_fields import (
    int_field,
    int_list_field,
    optional_field_value,
    str_field,
    str_list_field,
)

_SPECIAL_TYPES = {int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN)}
_USER_DEFINED_TYPE = int(gguf.TokenType.USER_DEFINED)


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelPreparationError(f"malformed BPE merge in GGUF: {merge!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def build_backend_tokenizer(reader: Any) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE, special tokens included."""
    kind = str_field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelPreparationError(f"unsupported GGUF tokenizer model {kind!r} (expected 'gpt2')")
    tokens = str_list_field(reader, "tokenizer.ggml.tokens")
    token_types = int_list_field(reader, "tokenizer.ggml.token_type")
    if len(tokens) != len(token_types):
        raise ModelPreparationError("GGUF tokenizer tokens and token types differ in length")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelPreparationError("GGUF tokenizer vocabulary has duplicate tokens")
    merges = _split_merges(str_list_field(reader, "tokenizer.ggml.merges"))

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [
            AddedToken(token, normalized=False, special=True)
            for token, kind_id in zip(tokens, token_types, strict=True)
            if kind_id in _SPECIAL_TYPES
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False)
            for token, kind_id in zip(tokens, token_types, strict=True)
            if kind_id == _USER_DEFINED_TYPE
        ]
    )
    return tokenizer


def _token_at(tokens: list[str], reader: Any, key: str) -> str | None:
    index = optional_field_value(reader, key)
    if index is None:
        return None
    if not 0 <= int(index) < len(tokens):
        raise ModelPreparationError(f"GGUF {key} {index} is outside the vocabulary")
    return tokens[int(index)]


def build_fast_tokenizer(reader: Any) -> PreTrainedTokenizerFast:
    """The transformers tokenizer, with the GGUF's special tokens and chat template."""
    tokens = str_list_field(reader, "tokenizer.ggml.tokens")
    if optional_field_value(reader, "tokenizer.ggml.add_bos_token"):
        raise ModelPreparationError("GGUF asks for an automatic BOS, which is not supported")
    special: dict[str, str] = {}
    for name, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ):
        token = _token_at(tokens, reader, key)
        if token is not None:
            special[name] = token
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(reader),
        chat_template=str_field(reader, "tokenizer.chat_template"),
        model_max_length=int_field(reader, "llama.context_length"),
        clean_up_tokenization_spaces=False,
        **special,
    )


def write_tokenizer(reader: Any, folder: Path) -> None:
    """Save tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    build_fast_tokenizer(reader).save_pretrained(str(folder), legacy_format=False)
