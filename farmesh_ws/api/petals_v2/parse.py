"""Decoding chat.petals.dev v2 requests: JSON objects read with ``request.get`` semantics.

A ``null`` field counts as absent and unknown fields are ignored, as in the original. Shapes
and static ranges are checked here; configured limits (text size, ``max_new_tokens``,
``max_length``) are the engine's (:mod:`farmesh_ws.engine.limits`).
"""

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.core.types import SamplingParams
from farmesh_ws.errors import InvalidRequest

MAX_STOP_CHARS: Final = 64
MAX_EXTRA_STOP_SEQUENCES: Final = 8
TEMPERATURE_MAX: Final = 2.0
TOP_K_MAX: Final = 1000
REPETITION_PENALTY_MAX: Final = 2.0
ONE_TOKEN_STOP_MESSAGE: Final = (
    "extra_stop_sequences require stop_sequence length to be exactly 1 token"
)
_WALLET: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_AMOUNT: Final = re.compile(r"[0-9]{1,12}(\.[0-9]{1,8})?")


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """``open_inference_session``: ``model`` None means the default model."""

    model: str | None
    max_length: int
    user_wallet: str | None
    max_cost_far: Decimal | None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One ``generate`` request of the right shape."""

    inputs: str | None
    max_new_tokens: int | None
    max_length: int | None
    sampling: SamplingParams
    stop_sequence: str | None
    extra_stop_sequences: tuple[str, ...] | None
    max_cost_far: Decimal | None


def decode_request(frame: str | bytes, *expected_types: str) -> dict[str, Any]:
    """Parse one frame as a JSON object of one of ``expected_types`` (an optional ``auth``
    may come before the due one)."""
    try:
        request = json.loads(frame)
    except (ValueError, RecursionError):
        raise InvalidRequest("the frame is not valid JSON") from None
    if not isinstance(request, dict):
        raise InvalidRequest("a request must be a JSON object")
    kind = request.get("type")
    if kind not in expected_types:  # the last expected type is the one the client is due
        raise InvalidRequest(f"expected a request of type {expected_types[-1]!r}, got {kind!r}")
    return request


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """protocol.md §2.1 on this path: a token, or a signed EIP-4361 message."""

    token: str | None
    message: str | None
    signature: str | None


def parse_auth(request: dict[str, Any]) -> AuthRequest:
    """Decode an ``auth`` request with protocol v1's rules (shape and lengths)."""
    try:
        checked = msgspec.convert(request, p.Auth)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid auth request: {exc}") from None
    siwe = checked.siwe
    return AuthRequest(
        token=checked.token,
        message=None if siwe is None else siwe.message,
        signature=None if siwe is None else siwe.signature,
    )


def parse_open(request: dict[str, Any]) -> OpenRequest:
    max_length = opt_int(request, "max_length", minimum=1)
    if max_length is None:
        raise InvalidRequest("max_length is required")
    wallet = opt_str(request, "user_wallet")
    if wallet is not None and not _WALLET.fullmatch(wallet):
        raise InvalidRequest("user_wallet must be 1-128 characters of A-Z a-z 0-9 _ . : -")
    return OpenRequest(
        model=opt_str(request, "model"),
        max_length=max_length,
        user_wallet=wallet,
        max_cost_far=_opt_amount(request, "max_cost_far"),
    )


def parse_generate(request: dict[str, Any]) -> GenerateRequest:
    """Check a ``generate`` request's shape and static ranges."""
    max_new_tokens = opt_int(request, "max_new_tokens", minimum=1)
    max_length = opt_int(request, "max_length", minimum=1)
    if max_new_tokens is None and max_length is None:
        raise InvalidRequest("set max_new_tokens or max_length")
    stop_sequence = opt_str(request, "stop_sequence")
    if stop_sequence is not None and len(stop_sequence) > MAX_STOP_CHARS:
        raise InvalidRequest(f"stop_sequence is longer than {MAX_STOP_CHARS} characters")
    extra = _opt_stop_list(request, "extra_stop_sequences")
    if extra is not None and stop_sequence is None:
        raise InvalidRequest(ONE_TOKEN_STOP_MESSAGE)
    return GenerateRequest(
        inputs=opt_str(request, "inputs"),
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        sampling=_parse_sampling(request),
        stop_sequence=stop_sequence,
        extra_stop_sequences=extra,
        max_cost_far=_opt_amount(request, "max_cost_far"),
    )


def _parse_sampling(request: dict[str, Any]) -> SamplingParams:
    do_sample = request.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool | int):
        raise InvalidRequest("do_sample must be a boolean (or 0 / 1)")
    penalty = _opt_number(request, "repetition_penalty")
    if penalty is not None and not 1.0 <= penalty <= REPETITION_PENALTY_MAX:
        raise InvalidRequest(f"repetition_penalty must be between 1 and {REPETITION_PENALTY_MAX:g}")
    repetition_penalty = 1.0 if penalty is None else penalty
    if not do_sample:
        # transformers ignores temperature / top_k / top_p in greedy decoding.
        return SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty)
    temperature = _opt_number(request, "temperature")
    if temperature is not None and not 0.0 < temperature <= TEMPERATURE_MAX:
        raise InvalidRequest(
            f"temperature must be above 0 and at most {TEMPERATURE_MAX:g} when do_sample is set"
        )
    top_p = _opt_number(request, "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidRequest("top_p must be above 0 and at most 1")
    top_k = opt_int(request, "top_k", minimum=0)
    if top_k is not None and top_k > TOP_K_MAX:
        raise InvalidRequest(f"top_k must be between 0 and {TOP_K_MAX}")
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=0 if top_k is None else top_k,
        repetition_penalty=repetition_penalty,
    )


def opt_str(request: dict[str, Any], name: str) -> str | None:
    value = request.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    return value


def opt_int(request: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer")
    if value < minimum:
        raise InvalidRequest(f"{name} must be at least {minimum}")
    return value


def _opt_number(request: dict[str, Any], name: str) -> float | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidRequest(f"{name} must be a finite number")
    return number


def _opt_amount(request: dict[str, Any], name: str) -> Decimal | None:
    """A $FAR amount: a decimal string as in protocol v1 (≤ 12 digits, ≤ 8 decimals)."""
    value = opt_str(request, name)
    if value is None:
        return None
    if not _AMOUNT.fullmatch(value):
        raise InvalidRequest(f'{name} must be a decimal string such as "0.05"')
    return Decimal(value)


def _opt_stop_list(request: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = request.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidRequest(f"{name} must be a list of strings")
    if len(value) > MAX_EXTRA_STOP_SEQUENCES:
        raise InvalidRequest(f"{name} has more than {MAX_EXTRA_STOP_SEQUENCES} sequences")
    if any(len(item) > MAX_STOP_CHARS for item in value):
        raise InvalidRequest(f"{name} has a sequence longer than {MAX_STOP_CHARS} characters")
    return tuple(value)
