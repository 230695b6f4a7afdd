"""The models a gateway serves, each with its own price and limits (README "Serving several
models"), read from a TOML file (``FARMESH_MODELS_FILE``)::

    include_bundled = true            # the bundled SmolLM2 (default true)

    [[model]]
    id = "tiny-llama"                 # the name clients ask for (``model`` in open/requests)
    path = "/srv/models/tiny-llama"   # the client half: config, tokenizer, embeddings, head
                                      # (a relative path: from this file's folder)
    dht_prefix = "tiny-llama-hf"      # what its servers announce (default: from the id)
    price_per_token_far = "0.00002"   # a string: money is never a float
    price_per_prompt_token_far = "0"
    max_length_limit = 1024           # tokens; each at most the gateway-wide limit
    max_new_tokens_limit = 256

Fields left out take the gateway-wide settings. A bad file raises :class:`CatalogError` with
the file, the entry and the field named.
"""

import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from farmesh_ws.models.names import BUNDLED_MODEL_ID, dht_prefix_for

_MODEL_FIELDS = frozenset(
    {
        "id",
        "path",
        "dht_prefix",
        "price_per_token_far",
        "price_per_prompt_token_far",
        "max_length_limit",
        "max_new_tokens_limit",
    }
)


class CatalogError(ValueError):
    """The models file cannot be used; the message names the file and the field."""


@dataclass(frozen=True, slots=True)
class ModelTerms:
    """One served model. ``path`` None: the bundled model, prepared at start. ``None`` prices
    and limits: the gateway-wide settings."""

    model_id: str
    dht_prefix: str
    path: Path | None = None
    price_per_token_far: Decimal | None = None
    price_per_prompt_token_far: Decimal | None = None
    max_length_limit: int | None = None
    max_new_tokens_limit: int | None = None


BUNDLED_TERMS = ModelTerms(BUNDLED_MODEL_ID, dht_prefix_for(BUNDLED_MODEL_ID))


def load_catalog(path: Path) -> tuple[ModelTerms, ...]:
    """The models of the file at ``path``, the bundled one first unless ``include_bundled``
    is false. Raises :class:`CatalogError` for an unreadable file, an unknown or mistyped
    field, a folder without ``config.json``, a duplicate id or DHT prefix, or no model."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: {exc}") from None
    unknown = set(document) - {"include_bundled", "model"}
    if unknown:
        raise CatalogError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    include_bundled = document.get("include_bundled", True)
    if not isinstance(include_bundled, bool):
        raise CatalogError(f"{path}: include_bundled must be true or false")
    entries = document.get("model", [])
    if not isinstance(entries, list):
        raise CatalogError(f"{path}: model must be an array of tables ([[model]])")
    models = [BUNDLED_TERMS] if include_bundled else []
    for index, entry in enumerate(entries):
        where = f"{path}: model {index + 1}"
        if not isinstance(entry, dict):
            raise CatalogError(f"{where}: not a table")
        models.append(_terms(entry, where, path.resolve().parent))
    for field in ("model_id", "dht_prefix"):
        values = [getattr(model, field) for model in models]
        duplicate = next((value for value in values if values.count(value) > 1), None)
        if duplicate is not None:
            raise CatalogError(f"{path}: {field} {duplicate!r} is listed twice")
    if not models:
        raise CatalogError(f"{path}: no model to serve")
    return tuple(models)


def _terms(entry: dict[str, Any], where: str, base: Path) -> ModelTerms:
    unknown = set(entry) - _MODEL_FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    model_id = _text(entry, "id", where)
    if model_id is None:
        raise CatalogError(f"{where}: id is required")
    folder = _text(entry, "path", where)
    if folder is None:
        raise CatalogError(f"{where} ({model_id}): path is required")
    given = _text(entry, "dht_prefix", where)
    try:
        prefix = dht_prefix_for(given or model_id)
    except ValueError as exc:
        raise CatalogError(f"{where}: {exc}") from None
    if given is not None and given != prefix:
        raise CatalogError(f"{where}: dht_prefix may hold only letters, digits, - and _")
    terms = ModelTerms(
        model_id=model_id,
        dht_prefix=prefix,
        path=(base / Path(folder).expanduser()).resolve(),
        price_per_token_far=_price(entry, "price_per_token_far", where),
        price_per_prompt_token_far=_price(entry, "price_per_prompt_token_far", where),
        max_length_limit=_count(entry, "max_length_limit", where, minimum=16),
        max_new_tokens_limit=_count(entry, "max_new_tokens_limit", where, minimum=1),
    )
    if terms.path is None or not (terms.path / "config.json").is_file():
        raise CatalogError(
            f"{where} ({model_id}): {terms.path} is not a model folder (no config.json; the "
            "gateway loads the model's config, tokenizer and embeddings from it)"
        )
    return terms


def _text(entry: dict[str, Any], name: str, where: str) -> str | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: {name} must be a non-empty string")
    return value.strip()


def _price(entry: dict[str, Any], name: str, where: str) -> Decimal | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, str):  # a TOML float would already have lost digits
        raise CatalogError(f'{where}: {name} must be a decimal string, e.g. "0.0001"')
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise CatalogError(f"{where}: {name} {value!r} is not a decimal number") from None
    if not price.is_finite() or price < 0:
        raise CatalogError(f"{where}: {name} must be a finite number, not negative")
    return price


def _count(entry: dict[str, Any], name: str, where: str, *, minimum: int) -> int | None:
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CatalogError(f"{where}: {name} must be an integer of at least {minimum}")
    return value
