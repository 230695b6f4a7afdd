"""Incremental detokenisation and stop-sequence matching, on a byte-level toy vocabulary."""

from collections.abc import Sequence

import pytest

from farmesh_ws.mesh.text_stream import IncrementalDecoder, StopMatcher


# One token per byte, so multi-byte characters arrive split across tokens.
def _decode_bytes(ids: Sequence[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str) -> list[str]:
    decoder = IncrementalDecoder(_decode_bytes)
    deltas = [decoder.push(byte) for byte in text.encode()]
    deltas.append(decoder.flush())
    return deltas


@pytest.mark.parametrize("text", ["plain ascii", "naïve café — 東京 🙂", "🙂🙂", "a\u0301"])
def test_deltas_reassemble_the_text(text: str) -> None:
    assert "".join(_stream(text)) == text


def test_no_delta_splits_a_character() -> None:
    for delta in _stream("東京 🙂 — é"):
        assert "\ufffd" not in delta
        delta.encode("utf-8")


def test_emoji_is_released_only_when_complete() -> None:
    deltas = _stream("🙂")
    assert deltas[:3] == ["", "", ""]
    assert deltas[3] == "🙂"


def test_a_character_cut_at_the_end_is_dropped() -> None:
    rocket = "🚀".encode()
    decoder = IncrementalDecoder(_decode_bytes)
    deltas = [decoder.push(byte) for byte in b"ok " + rocket + rocket[:3]]
    assert "".join(deltas) == "ok 🚀"
    assert decoder.flush() == ""


def test_complete_text_held_with_a_cut_character_is_released() -> None:
    # One token carries "é" and the first byte of "🚀", so "é" waits for the rest; the
    # turn ends there, and "é" is released without the incomplete character.
    tokens = {0: "é".encode() + "🚀".encode()[:1]}

    def decode(ids: Sequence[int]) -> str:
        return b"".join(tokens[i] for i in ids).decode("utf-8", errors="replace")

    decoder = IncrementalDecoder(decode)
    assert decoder.push(0) == ""
    assert decoder.flush() == "é"


def _feed(stops: Sequence[str], deltas: Sequence[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    emitted = "".join(matcher.feed(delta) for delta in deltas) + matcher.flush()
    return emitted, matcher.stopped


def test_stop_sequence_across_deltas_is_cut_and_never_emitted() -> None:
    emitted, stopped = _feed(["\nUser:"], ["Hello", " there\nUs", "er: more"])
    assert (emitted, stopped) == ("Hello there", True)


def test_a_possible_stop_prefix_is_held_then_released() -> None:
    matcher = StopMatcher(["###"])
    assert matcher.feed("a#") == "a"
    assert matcher.feed("#b") == "##b"
    assert not matcher.stopped


def test_earliest_of_several_stops_wins() -> None:
    emitted, stopped = _feed(["END", "STOP"], ["go STOP then END"])
    assert (emitted, stopped) == ("go ", True)


def test_without_stops_everything_passes() -> None:
    assert _feed([], ["a", "b"]) == ("ab", False)
