"""Typed access to GGUF metadata, so a missing or mistyped key becomes a clear error."""

from typing import Any

from farmesh_ws.models.errors import ModelPreparationError


def field_value(reader: Any, key: str) -> Any:
    """The decoded value of metadata `key` (a scalar, a string or a list)."""
    field = reader.fields.get(key)
    if field is None:
        raise ModelPreparationError(f"GGUF metadata has no {key!r}")
    return field.contents()


def optional_field_value(reader: Any, key: str) -> Any:
    """Like `field_value`, but None when the key is absent."""
    return field_value(reader, key) if key in reader.fields else None


def int_field(reader: Any, key: str) -> int:
    """An integer metadata value."""
    value = field_value(reader, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelPreparationError(f"GGUF metadata {key!r} is not an integer: {value!r}")
    return value


def float_field(reader: Any, key: str) -> float:
    """A float metadata value (GGUF stores float32)."""
    value = field_value(reader, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelPreparationError(f"GGUF metadata {key!r} is not a number: {value!r}")
    return float(value)


def str_field(reader: Any, key: str) -> str:
    """A string metadata value."""
    value = field_value(reader, key)
    if not isinstance(value, str):
        raise ModelPreparationError(f"GGUF metadata {key!r} is not a string: {value!r}")
    return value


def str_list_field(reader: Any, key: str) -> list[str]:
    """A list-of-strings metadata value."""
    value = field_value(reader, key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ModelPreparationError(f"GGUF metadata {key!r} is not a list of strings")
    return value


def int_list_field(reader: Any, key: str) -> list[int]:
    """A list-of-integers metadata value."""
    value = field_value(reader, key)
    if not isinstance(value, list) or not all(isinstance(item, int) for item in value):
        raise ModelPreparationError(f"GGUF metadata {key!r} is not a list of integers")
    return value
