"""A turn's text and counters, on a byte-level toy vocabulary (one token per byte)."""

from collections.abc import Sequence

from farmesh_ws.core.types import SamplingParams, TokenEvent
from farmesh_ws.mesh.petals_turn import TurnState

ROCKET = "🚀".encode()
EOS = 0


def _decode_bytes(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _state(max_new_tokens: int) -> TurnState:
    return TurnState(
        eos_token_id=EOS,
        decode=_decode_bytes,
        sampling=SamplingParams(max_new_tokens=max_new_tokens),
        cached=0,
    )


def _accept_all(state: TurnState, token_ids: Sequence[int]) -> list[TokenEvent]:
    return [state.accept(token_id, room=1000) for token_id in token_ids]


def test_a_reply_cut_by_length_inside_a_character_drops_that_character() -> None:
    cut = ROCKET * 13 + ROCKET[:2]
    state = _state(max_new_tokens=len(cut))
    events = _accept_all(state, cut)
    assert state.finish == "length"
    assert state.generated == len(cut)
    assert "".join(event.text for event in events) == "🚀" * 13
    assert state.text == "🚀" * 13


def test_a_reply_cancelled_inside_a_character_drops_that_character() -> None:
    cut = ROCKET * 3 + ROCKET[:1]
    state = _state(max_new_tokens=100)
    events = _accept_all(state, cut)
    state.cancel()
    assert state.finish == "cancelled"
    assert state.generated == len(cut)
    assert "".join(event.text for event in events) == "🚀" * 3
    assert state.text == "🚀" * 3
