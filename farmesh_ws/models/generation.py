"""The sampling a model recommends, as protocol v1 fields: read from a prepared folder's
``generation_config.json`` for ``/models``, and read back from a gateway's ``/models`` by
``farmesh-ws chat``. Standard library only.

The file is read with :mod:`json` (importing transformers would cost seconds) the way
transformers' ``generate`` reads it: sampling only when ``do_sample`` is true, and then
transformers' defaults for the keys it leaves out (``temperature`` 1.0, ``top_p`` 1.0,
``top_k`` 50, ``repetition_penalty`` 1.0). The browser page and ``farmesh-ws chat`` send the
result by default; a request that names no sampling stays greedy (protocol.md §3.2).
"""

import json
import logging
import math
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypedDict, TypeGuard

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE: Final = "generation_config.json"

BUNDLED_GENERATION: Final[Mapping[str, bool | float]] = {
    "do_sample": True,
    "temperature": 0.2,
    "top_p": 0.9,
}
"""Written into the bundled SmolLM2-135M-Instruct folder's ``generation_config.json``.

Source: the usage example of the model card (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct,
"How to use"): ``model.generate(inputs, max_new_tokens=50, temperature=0.2, top_p=0.9,
do_sample=True)``. The upstream ``generation_config.json`` has no sampling values. As in that
example, ``top_k`` is transformers' default, 50.

No ``repetition_penalty``: the card names none, and measured on this model with the gateway's
own token choice (``Write a short poem about GPUs, with an emoji 🚀.``, 128 tokens, seeds 0-3)
it did not make replies end: with 1.1 every reply still ran into repeated emoji, with 1.2 every
one rambled to the length limit, and 1.2 kept ordinary answers from ending (``List five
fruits.`` ran to the limit). The penalty covers the whole history, ``<|im_end|>`` included.
"""


class Sampling(TypedDict, total=False):
    """Protocol v1 sampling fields (protocol.md §3.2); a missing one takes the protocol's
    default (greedy, ``top_p`` 1.0, ``top_k`` 0, ``repetition_penalty`` 1.0)."""

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float


GREEDY: Final[Sampling] = {"temperature": 0.0}


def recommended_sampling(folder: Path) -> Sampling:
    """The sampling ``folder/generation_config.json`` recommends: :data:`GREEDY` when
    ``do_sample`` is false or absent, ``{}`` when the file is missing or unreadable."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.debug("no generation config in %s: %s", folder, exc)
        return {}
    if not isinstance(config, dict):
        logger.warning("%s is not a JSON object; ignoring it", path)
        return {}
    return sampling_from_config(config)


def sampling_from_config(config: Mapping[str, Any]) -> Sampling:
    """:func:`recommended_sampling` of a parsed ``generation_config.json``. Values outside
    protocol v1's ranges are clamped into them; a ``top_p`` of 0 or less is dropped. Fields
    equal to the protocol's defaults are left out, except ``temperature``."""
    temperature = _number(config, "temperature", 1.0)
    if config.get("do_sample") is not True or temperature <= 0.0:
        return {**GREEDY}
    sampling: Sampling = {"temperature": min(temperature, 2.0)}
    top_p = _number(config, "top_p", 1.0)
    if 0.0 < top_p < 1.0:
        sampling["top_p"] = top_p
    top_k = int(min(max(_number(config, "top_k", 50), 0), 1000))
    if top_k:
        sampling["top_k"] = top_k
    penalty = min(_number(config, "repetition_penalty", 1.0), 2.0)
    if penalty > 1.0:
        sampling["repetition_penalty"] = penalty
    return sampling


def announced_sampling(value: object) -> Sampling:
    """A ``generation`` object from ``/models`` as :class:`Sampling`: fields that are not
    numbers, or that this version does not know, are dropped."""
    if not isinstance(value, Mapping):
        return {}
    sampling: Sampling = {}
    if _is_number(temperature := value.get("temperature")):
        sampling["temperature"] = float(temperature)
    if _is_number(top_p := value.get("top_p")):
        sampling["top_p"] = float(top_p)
    if _is_number(top_k := value.get("top_k")) and float(top_k).is_integer():
        sampling["top_k"] = int(top_k)
    if _is_number(penalty := value.get("repetition_penalty")):
        sampling["repetition_penalty"] = float(penalty)
    return sampling


def models_url(ws_url: str) -> str:
    """A gateway's ``/models`` address from its WebSocket URL: same host and port."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/models", "", ""))


def fetch_announced_sampling(ws_url: str, model: str, timeout: float) -> Sampling:
    """``model``'s ``generation`` in the ``/models`` of the gateway at ``ws_url`` (``{}`` if
    it has none). Raises ``OSError`` (``urllib.error.URLError`` too) or ``ValueError``."""
    with urllib.request.urlopen(models_url(ws_url), timeout=timeout) as reply:
        body = json.load(reply)
    for entry in body.get("models", []) if isinstance(body, dict) else []:
        if isinstance(entry, dict) and entry.get("model_id") == model:
            return announced_sampling(entry.get("generation"))
    return {}


def chat_sampling(
    ws_url: str, model: str, timeout: float, *, temperature: float | None, top_p: float | None
) -> tuple[Sampling, str | None]:
    """What ``farmesh-ws chat`` sends: ``model``'s sampling from the gateway's ``/models``
    with the given overrides (:func:`with_overrides`). If ``/models`` cannot be read, the
    overrides over greedy decoding, and why (else None)."""
    recommended: Sampling = {}
    problem: str | None = None
    try:
        recommended = fetch_announced_sampling(ws_url, model, timeout)
    except (OSError, ValueError) as exc:
        problem = f"{models_url(ws_url)}: {exc}"
    return with_overrides(recommended, temperature=temperature, top_p=top_p), problem


def with_overrides(
    recommended: Sampling, *, temperature: float | None = None, top_p: float | None = None
) -> Sampling:
    """``recommended`` with the given fields replaced; a temperature of 0 is plain greedy
    decoding (:data:`GREEDY`, nothing else)."""
    sampling: Sampling = {**recommended}
    if temperature is not None:
        sampling["temperature"] = temperature
    if top_p is not None:
        sampling["top_p"] = top_p
    if sampling.get("temperature", 0.0) <= 0.0:
        return {**GREEDY}
    return sampling


def describe_sampling(sampling: Sampling) -> str:
    """One line for a person, e.g. ``temperature 0.2, top_p 0.9, top_k 50`` or ``greedy``."""
    if sampling.get("temperature", 0.0) <= 0.0:
        return "greedy"
    return ", ".join(f"{name} {value:g}" for name, value in sampling.items())


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(config: Mapping[str, Any], name: str, default: float) -> float:
    """``config[name]`` if it is a finite number, else ``default``."""
    value = config.get(name)
    if not _is_number(value):
        if value is not None:
            logger.warning("ignoring generation config %s=%r", name, value)
        return default
    return float(value)
