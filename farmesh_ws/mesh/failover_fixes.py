"""Fixes that let a Petals 2.2.0.post1 inference session survive a dead server (Petals #587).

Stock Petals never recovers when a server dies mid-session, even with a replica serving the
same blocks. Four bugs, four wrappers, applied by :func:`apply` (via ``compat.apply``):

1. ``stale_routes``: ``RemoteSequenceManager.on_request_failure`` drops the dead peer from
   ``block_infos`` but not from ``spans_containing_block``, so routing keeps choosing the dead
   peer until the next DHT refresh (``update_period``). We recompute the spans after the drop.
2. ``replacement_history``: ``InferenceSession._update_sequence`` hands the replacement server
   session the failed session's ``history`` with ``_position=0``, which then fails every try
   with "Broken input cache". We keep only the prefix the failed server had processed and, on
   the replacement's first step, send that prefix followed by the current tokens.
3. ``replayed_prefix``: the replacement returns hidden states for prefix + current tokens; a
   downstream server that already holds its cache must get only the current tokens.
4. ``unreachable_replacement``: when the server chosen to replace a failed one cannot be
   reached either (a dead server stays announced in the DHT until its record expires), the
   step's failure names no peer (``on_request_failure(None)``), so the next try picks the same
   dead server again. Opening a server session now tags its error with the peer, and the
   failure bans that peer.

Fix 3 needs to know how many tokens the current ``InferenceSession.step`` carries; the step
runs synchronously in one thread, so a context variable set around it is exact.
"""

import contextlib
import contextvars
import functools
import sys
from typing import Any

_current_step_tokens: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "farmesh_current_step_tokens", default=None
)
_PATCHED = "_farmesh_failover_fix"
_UNREACHABLE_PEER = "_farmesh_unreachable_peer"


def apply() -> None:
    """Install the three fixes (idempotent)."""
    from petals.client import inference_session
    from petals.client.routing import sequence_manager

    _fix_stale_routes(sequence_manager.RemoteSequenceManager)
    _name_unreachable_peer(inference_session._ServerInferenceSession)
    _track_step_tokens(inference_session.InferenceSession)
    _fix_replacement_history(inference_session.InferenceSession)
    _fix_replayed_prefix(inference_session._ServerInferenceSession)


def _already(method: Any) -> bool:
    return bool(getattr(method, _PATCHED, False))


def _fix_stale_routes(manager_cls: Any) -> None:
    original = manager_cls.on_request_failure
    if _already(original):
        return
    from petals.client.routing.sequence_info import RemoteSequenceInfo

    @functools.wraps(original)
    def on_request_failure(self: Any, peer_id: Any) -> None:
        if peer_id is None:  # called while handling the step's error: fix 4 may name the peer
            peer_id = getattr(sys.exc_info()[1], _UNREACHABLE_PEER, None)
        original(self, peer_id)
        if peer_id is None:
            return
        with self.lock_changes:
            info = self.state.sequence_info
            info.spans_by_priority, info.spans_containing_block = RemoteSequenceInfo._sort_spans(
                info.block_infos
            )

    setattr(on_request_failure, _PATCHED, True)
    manager_cls.on_request_failure = on_request_failure


def _name_unreachable_peer(server_session_cls: Any) -> None:
    original = server_session_cls.__dict__["create"].__func__
    if _already(original):
        return

    @functools.wraps(original)
    async def create(cls: Any, config: Any, p2p: Any, span: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(cls, config, p2p, span, *args, **kwargs)
        except Exception as exc:
            with contextlib.suppress(AttributeError):  # an exception type without a __dict__
                setattr(exc, _UNREACHABLE_PEER, span.peer_id)
            raise

    setattr(create, _PATCHED, True)
    server_session_cls.create = classmethod(create)


def _track_step_tokens(session_cls: Any) -> None:
    original = session_cls.step
    if _already(original):
        return

    @functools.wraps(original)
    def step(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        token = _current_step_tokens.set(int(inputs.shape[1]))
        try:
            return original(self, inputs, *args, **kwargs)
        finally:
            _current_step_tokens.reset(token)

    setattr(step, _PATCHED, True)
    session_cls.step = step


def _fix_replacement_history(session_cls: Any) -> None:
    original = session_cls._update_sequence
    if _already(original):
        return

    @functools.wraps(original)
    def _update_sequence(self: Any, server_idx: int, block_idx: int, attempt_no: int) -> Any:
        failed = (
            self._server_sessions[server_idx] if server_idx < len(self._server_sessions) else None
        )
        processed = failed._position if failed is not None else 0
        result = original(self, server_idx, block_idx, attempt_no)
        replacement = self._server_sessions[server_idx]
        if failed is not None and replacement.history is not None:
            replacement.history = replacement.history[:, :processed]
            replacement._farmesh_replay_prefix = processed
        return result

    setattr(_update_sequence, _PATCHED, True)
    session_cls._update_sequence = _update_sequence


def _fix_replayed_prefix(server_session_cls: Any) -> None:
    original = server_session_cls.step
    if _already(original):
        return
    import torch

    @functools.wraps(original)
    def step(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        current = _current_step_tokens.get()
        prefix = getattr(self, "_farmesh_replay_prefix", 0)
        if prefix and not self.stepped and current is not None:
            # A replacement: replay what the failed server had cached, then the new tokens.
            self.history = torch.cat([self.history, inputs[:, -current:]], dim=1)
            inputs = self.history
            self._farmesh_replay_prefix = 0
        elif self.stepped and current is not None and inputs.shape[1] > current:
            # Upstream replayed a prefix this server already holds in its cache.
            inputs = inputs[:, -current:]
        return original(self, inputs, *args, **kwargs)

    setattr(step, _PATCHED, True)
    server_session_cls.step = step
