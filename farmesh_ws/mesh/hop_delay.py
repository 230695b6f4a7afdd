"""A simulated network delay per mesh hop, inside test servers (``tc netem`` stands in on
machines whose kernel has the qdisc; these do not).

:func:`install` makes every inference step a Petals server receives wait ``delay_s`` seconds
before it reaches the server's compute: whether the step comes from the client or is pushed
by the previous server of the chain (Petals' ``rpc_push``), so every hop of a step's route
costs ``delay_s`` more, as a one-way link delay would. The wait is an ``asyncio.sleep`` in the
connection handler's per-session step loop (``TransformerConnectionHandler.
_iterate_inference_steps``): it suspends only that session's stream, and the handler's
event loop keeps serving every other session's steps meanwhile. That loop is hivemind's
uvloop (``hivemind/moe/server/connection_handler.py``), whose timers count whole
milliseconds: a wait may end up to 1 ms sooner than asked. Forward/backward calls and the
DHT are not delayed.

Used by :mod:`farmesh_ws.swarm_node` when the swarm's ``step_delay_ms`` is positive. With
hop tracing on (:mod:`.hop_trace`, installed first), the delay lies between a step's
``srv_recv`` and ``srv_submit`` stamps, and is itself stamped ``delay_start``/``delay_end``
with the server-side ``session`` id.
"""

import asyncio
from contextlib import aclosing
from typing import Any

from farmesh_ws.mesh import compat, hop_trace

_PATCHED = "_farmesh_hop_delay"


def install(delay_s: float) -> None:
    """Delay each inference step a server receives by ``delay_s`` seconds (> 0). Call in the
    server process before it forks its connection handlers; idempotent (a second call keeps
    the first delay). Raises ValueError for a delay ≤ 0."""
    if delay_s <= 0:
        raise ValueError(f"a hop delay must be positive, not {delay_s}")
    compat.apply()
    from petals.server.handler import TransformerConnectionHandler

    original = TransformerConnectionHandler._iterate_inference_steps
    if getattr(original, _PATCHED, False):
        return

    async def _iterate_inference_steps(self: Any, *args: Any, **kwargs: Any) -> Any:
        async with aclosing(original(self, *args, **kwargs)) as steps:
            async for request, metadata in steps:
                session = str(metadata.get("session_id"))
                hop_trace.emit("delay_start", session=session)
                await asyncio.sleep(delay_s)
                hop_trace.emit("delay_end", session=session)
                yield request, metadata

    setattr(_iterate_inference_steps, _PATCHED, True)
    TransformerConnectionHandler._iterate_inference_steps = _iterate_inference_steps
