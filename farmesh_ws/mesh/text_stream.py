"""Turning a stream of token ids into a stream of text deltas.

Byte-level BPE tokens can end in the middle of a UTF-8 character; a delta is only released
once the decoded text no longer ends in U+FFFD, and a character still incomplete when the
turn ends (cut by ``max_new_tokens``, a full session or a cancel) is dropped. Stop sequences
are matched on the text, and any tail that could still become a stop sequence is held back,
so a client never sees text past a stop.
"""

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Decode ids one at a time without splitting a character."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_start = 0
        self._read_end = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the newly completed text (may be empty)."""
        self._ids.append(token_id)
        settled = self._decode(self._ids[self._prefix_start : self._read_end])
        current = self._decode(self._ids[self._prefix_start :])
        if len(current) <= len(settled) or current.endswith(_INCOMPLETE):
            return ""
        self._prefix_start, self._read_end = self._read_end, len(self._ids)
        return current[len(settled) :]

    def flush(self) -> str:
        """Whatever is still pending at the end of the turn, minus a final incomplete
        character: its tokens were generated (and count) but it has no text. The decoded
        text cannot tell it from a genuine U+FFFD at the very end, which is dropped too."""
        settled = self._decode(self._ids[self._prefix_start : self._read_end])
        current = self._decode(self._ids[self._prefix_start :])
        self._prefix_start = self._read_end = len(self._ids)
        return current[len(settled) :].removesuffix(_INCOMPLETE)


class StopMatcher:
    """Find the first stop sequence in streamed text and hold back possible beginnings."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text that is safe to emit; set ``stopped`` when a stop sequence appears."""
        if self.stopped:
            return ""
        text = self._held + delta
        cut = min((i for i in (text.find(stop) for stop in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        hold = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
