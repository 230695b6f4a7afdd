"""Who computed what: the route of every step, summed per turn into contributions.

The route can change mid-session (failover replaces a server), so it is read at every step
from the server sessions themselves: a wrapper around Petals' per-server ``step`` reports each
successful call (peer id, block span, tokens the server processed, replay included) to the
:class:`StepRecorder` active in the calling thread. Petals runs a session's steps
synchronously in the caller's thread, so a context variable scopes recording exactly.
Each contribution carries the payout wallet its server proved, from the bindings of the
backend running the turn (:func:`farmesh_ws.payout.bindings.current`), or None.
"""

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

from farmesh_ws.core.types import Contribution, RouteHop
from farmesh_ws.payout import bindings

_active_recorder: contextvars.ContextVar["StepRecorder | None"] = contextvars.ContextVar(
    "farmesh_step_recorder", default=None
)
_PATCHED = "_farmesh_step_recorder"


def install() -> None:
    """Wrap ``_ServerInferenceSession.step`` once (after ``compat.apply()``)."""
    from petals.client.inference_session import _ServerInferenceSession

    original = _ServerInferenceSession.step
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = self._position
        outputs = original(self, *args, **kwargs)
        recorder = _active_recorder.get()
        if recorder is not None:
            span = self.span
            recorder.record(
                peer_id=span.peer_id.to_base58(),
                public_name=getattr(span.server_info, "public_name", None),
                start_block=span.start,
                end_block=span.end,
                tokens=self._position - before,
            )
        return outputs

    setattr(step, _PATCHED, True)
    _ServerInferenceSession.step = step


class StepRecorder:
    """Collects the route of each step of one turn and sums it into contributions."""

    def __init__(self) -> None:
        self.routes: list[tuple[RouteHop, ...]] = []
        self._hops: list[RouteHop] = []
        self._step_tokens = 0
        self._discard = False
        self._totals: dict[tuple[str, int, int], list[int]] = {}
        self._names: dict[str, str | None] = {}

    @contextlib.contextmanager
    def step(self, new_tokens: int) -> Iterator[None]:
        """Record the hops of one session step that carries ``new_tokens`` new tokens; they
        count when the step ends, unless :meth:`discard_step` was called inside it."""
        self._hops, self._step_tokens, self._discard = [], new_tokens, False
        token = _active_recorder.set(self)
        try:
            yield
        finally:
            _active_recorder.reset(token)
            if self._hops and not self._discard:
                self.routes.append(tuple(self._hops))
                for hop in self._hops:
                    total = self._totals.setdefault(
                        (hop.peer_id, hop.start_block, hop.end_block), [0, 0]
                    )
                    total[0] += hop.tokens
                    total[1] += max(hop.tokens - self._step_tokens, 0)

    def discard_step(self) -> None:
        """Credit nothing of the current step: its output was thrown away (a spot check
        failed) and the step is redone."""
        self._discard = True

    def record(
        self,
        *,
        peer_id: str,
        public_name: str | None,
        start_block: int,
        end_block: int,
        tokens: int,
    ) -> None:
        self._hops.append(RouteHop(peer_id, start_block, end_block, tokens))
        self._names[peer_id] = public_name

    def contributions(self) -> tuple[Contribution, ...]:
        """Per (server, span): tokens, replayed tokens and the proven payout wallet, ordered by
        block then peer. May wait for one fetch of the payout bindings (their TTL elapsed)."""
        payouts = bindings.current()
        wallets = payouts.wallets(self._names) if payouts is not None and self._names else {}
        return tuple(
            Contribution(
                peer_id=peer_id,
                public_name=self._names.get(peer_id),
                start_block=start,
                end_block=end,
                tokens=tokens,
                replayed_tokens=replayed,
                payout_wallet=wallets.get(peer_id),
            )
            for (peer_id, start, end), (tokens, replayed) in sorted(
                self._totals.items(), key=lambda item: (item[0][1], item[0][0])
            )
        )
