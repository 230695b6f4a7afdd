"""Model names and their DHT prefixes: pure, importable without the ML stack."""

import re
from typing import Final

BUNDLED_MODEL_ID: Final = "SmolLM2-135M-Instruct"

_DHT_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def dht_prefix_for(model_id: str) -> str:
    """A Petals DHT prefix for `model_id`: every character but letters, digits, - and _ → "-".

    Petals splits module uids on "." and chains on " ", so neither may appear in a prefix.
    """
    prefix = _DHT_UNSAFE.sub("-", model_id.strip())
    if not prefix.strip("-_"):
        raise ValueError(f"model id {model_id!r} has no characters usable in a DHT prefix")
    return prefix
