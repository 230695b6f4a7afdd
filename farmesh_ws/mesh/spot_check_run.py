"""Running spot checks on a Petals 2.2 mesh (the rules are in :mod:`.spot_check`).

Inference steps are stateful (each server keeps its span's attention cache), so a replica
cannot replay one step alone. Petals' client keeps every server session's input hidden states
(``_ServerInferenceSession.history``, its failover replay buffer); a check sends that whole
prefix through the span's stateless forward (``rpc_forward``, as Petals' ``sequential_forward``
does) on replicas other than the checked node, and compares the last positions with what the
node returned from its inference step (relative RMS difference; :mod:`.spot_check_steps`).

A wrapper around ``_ServerInferenceSession.step`` asks the monitor whether to check each server
step. A node's compulsory checks start on hivemind's event loop at once, while the step goes on
downstream, and are joined before the step's output is used (:meth:`StepChecks.join`), so a
node is never trusted before it passed them; a failed one raises :class:`SpotCheckFailed` and
the session redoes the step on other nodes.

Sampled checks are kept until the turn ends (:meth:`SpotChecker.turn`), then one background
check per server session covers every step sampled in it: a single forward over the prefix up
to the last sampled step gives the reference for each of them, where one check per step would
recompute that prefix each time. They cost the turn nothing (on one machine's shared CPUs, a
check run mid-turn slowed it down; ``scripts/bench_spot_checks.py``), and at most
``max_background`` run at once. A liar they catch is flagged and excluded from routing, and
every session holding it reroutes at its next step (:meth:`SpotChecker.holds_excluded`).
"""

import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from farmesh_ws.mesh.spot_check import IntegrityMonitor
from farmesh_ws.mesh.spot_check_steps import (
    DeferredCheck,
    TurnChecks,
    at_positions,
    step_check,
    worst_difference,
)

logger = logging.getLogger(__name__)

_active: contextvars.ContextVar["StepChecks | None"] = contextvars.ContextVar(
    "farmesh_step_checks", default=None
)
_turn: contextvars.ContextVar["TurnChecks | None"] = contextvars.ContextVar(
    "farmesh_turn_checks", default=None
)
_PATCHED = "_farmesh_spot_check"


class SpotCheckFailed(RuntimeError):
    """A compulsory check blamed ``peer_id`` for this step; ``permanent``: it is flagged and
    excluded (else the check was disputed and the node is avoided for Petals' ban time)."""

    def __init__(self, peer_id: str, *, permanent: bool) -> None:
        super().__init__(f"spot check failed for {peer_id}")
        self.peer_id = peer_id
        self.permanent = permanent


def install() -> None:
    """Wrap ``_ServerInferenceSession.step`` (timing, checks) and the sequence manager's
    refresh (exclusions and measured throughput survive it) once, after ``compat.apply()``
    and before a model is loaded."""
    from petals.client.inference_session import _ServerInferenceSession
    from petals.client.routing.sequence_manager import RemoteSequenceManager

    original = _ServerInferenceSession.step
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        before = self._position
        outputs = original(self, *args, **kwargs)
        checks = _active.get()
        if checks is not None:
            checks.checker.after_server_step(
                self, outputs, self._position - before, time.perf_counter() - started, checks
            )
        return outputs

    original_update = RemoteSequenceManager._update

    @functools.wraps(original_update)
    def _update(self: Any) -> None:
        original_update(self)
        checker = getattr(self, "_farmesh_spot_checker", None)
        if checker is not None:
            checker.apply_to_routes()

    setattr(step, _PATCHED, True)
    _ServerInferenceSession.step = step
    RemoteSequenceManager._update = _update


class StepChecks:
    """The compulsory checks started during one session step."""

    def __init__(self, checker: "SpotChecker") -> None:
        self.checker = checker
        self.pending: list[tuple[str, concurrent.futures.Future[SpotCheckFailed | None]]] = []

    def join(self) -> None:
        """Wait for every compulsory check of the step; raise the first failure."""
        for peer_id, future in self.pending:
            try:
                failure = future.result(timeout=self.checker.policy.timeout_s * 3)
            except Exception:
                logger.warning("spot check of %s did not finish", peer_id, exc_info=True)
                continue
            if failure is not None:
                raise failure


class SpotChecker:
    """Spot checks for one model's sequence manager, reporting to ``monitor``."""

    def __init__(self, monitor: IntegrityMonitor, manager: Any) -> None:
        self.monitor = monitor
        self.policy = monitor.policy
        self._manager = manager
        self._background: set[concurrent.futures.Future[SpotCheckFailed | None]] = set()
        self._background_lock = threading.Lock()
        self._rps_overrides: dict[str, float] = {}
        manager._farmesh_spot_checker = self

    @contextlib.contextmanager
    def step(self) -> Iterator[StepChecks]:
        """Scope one session step: checks started inside it land in the yielded value."""
        checks = StepChecks(self)
        token = _active.set(checks)
        try:
            yield checks
        finally:
            _active.reset(token)

    @contextlib.contextmanager
    def turn(self) -> Iterator[TurnChecks]:
        """Scope one turn: its sampled checks start, coalesced, when it ends."""
        checks = TurnChecks()
        token = _turn.set(checks)
        try:
            yield checks
        finally:
            _turn.reset(token)
            for deferred in checks.deferred.values():
                logger.debug(
                    "checking %d sampled steps of %s", len(deferred.steps), deferred.peer_id
                )
                self._start_sampled(deferred)

    def holds_excluded(self, server_sessions: list[Any]) -> bool:
        """True if one of a session's server sessions is on an excluded node."""
        excluded = self.monitor.excluded
        return bool(excluded) and any(
            s.span.peer_id.to_base58() in excluded for s in server_sessions
        )

    def after_server_step(
        self, session: Any, outputs: Any, tokens: int, seconds: float, checks: StepChecks
    ) -> None:
        """Called in the client thread after one server's step: time it, maybe check it."""
        span = session.span
        peer_id = span.peer_id.to_base58()
        blocks = span.end - span.start
        announced = getattr(span.server_info, "inference_rps", None) or 0.0
        if self.monitor.on_latency(peer_id, blocks, seconds, float(announced)):
            measured = 1.0 / max(self.monitor.record(peer_id).latency_per_block_s, 1e-9)
            self.monitor.flag(
                peer_id,
                "implausible_throughput",
                f"announced {announced:.0f} steps/s per block, measured {measured:.1f}",
            )
            self._rps_overrides[peer_id] = measured
            self.apply_to_routes()
        compulsory = self.monitor.record(peer_id).passed < self.policy.first_steps
        if not self.monitor.on_step(peer_id, tokens * blocks):
            return
        if compulsory:
            checks.pending.append((peer_id, self._run(step_check(session, outputs))))
            return
        turn = _turn.get()
        if turn is not None:
            turn.defer(session, outputs)
        else:
            self._start_sampled(step_check(session, outputs))

    def _start_sampled(self, deferred: DeferredCheck) -> None:
        """Start a background check, unless ``max_background`` are running: then skip it."""
        with self._background_lock:
            if len(self._background) >= self.policy.max_background:
                future = None
            else:
                future = self._run(deferred)
                self._background.add(future)
        if future is None:
            self.monitor.skipped(deferred.peer_id)
            return
        future.add_done_callback(self._finished)

    def _finished(self, future: "concurrent.futures.Future[SpotCheckFailed | None]") -> None:
        with self._background_lock:
            self._background.discard(future)

    def _run(self, deferred: DeferredCheck) -> "concurrent.futures.Future[SpotCheckFailed | None]":
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        check = self._check(deferred, self._manager.rpc_info)
        future: concurrent.futures.Future[SpotCheckFailed | None] = (
            RemoteExpertWorker.run_coroutine(check, return_future=True)
        )
        return future

    def wait_background(self, timeout_s: float) -> None:
        """Block until the sampled checks started so far have finished (tests, benchmarks)."""
        with self._background_lock:
            running = list(self._background)
        concurrent.futures.wait(running, timeout=timeout_s)

    def exclude(self, peer_id: str) -> None:
        """Never route to ``peer_id`` again (Petals' ``blocked_servers``), from now on."""
        from hivemind.p2p import PeerID

        manager = self._manager
        with manager.lock_changes:
            if manager.blocked_servers is None:
                manager.blocked_servers = set()
            manager.blocked_servers.add(PeerID.from_base58(peer_id))
        self.apply_to_routes()

    def apply_to_routes(self) -> None:
        """Drop excluded nodes from the routing table and put measured throughput in place
        of implausible claims, then re-sort the spans (as Petals' refresh does)."""
        from petals.client.routing.sequence_info import RemoteSequenceInfo

        manager = self._manager
        excluded = self.monitor.excluded
        with manager.lock_changes:
            info = manager.state.sequence_info
            for block in info.block_infos:
                for peer in list(block.servers):
                    name = peer.to_base58()
                    if name in excluded:
                        del block.servers[peer]
                    elif name in self._rps_overrides:
                        block.servers[peer].inference_rps = self._rps_overrides[name]
            info.spans_by_priority, info.spans_containing_block = RemoteSequenceInfo._sort_spans(
                info.block_infos
            )

    def _route(self, start: int, end: int, avoid: set[str]) -> list[tuple[Any, int, int]] | None:
        """Nodes other than ``avoid`` covering blocks ``start:end``, fewest hops first and
        the most checked nodes among equals; None if the blocks cannot be covered."""
        manager = self._manager
        route, block = [], start
        with manager.lock_changes:
            spans = manager.state.sequence_info.spans_containing_block
            while block < end:
                candidates = [s for s in spans[block] if s.peer_id.to_base58() not in avoid]
                if not candidates:
                    return None
                best = max(
                    candidates,
                    key=lambda s: (
                        min(s.end, end),
                        self.monitor.record(s.peer_id.to_base58()).passed,
                    ),
                )
                route.append((best.peer_id, block, min(best.end, end)))
                block = min(best.end, end)
        return route

    async def _forward(self, hidden: Any, route: list[tuple[Any, int, int]], info: Any) -> Any:
        from hivemind import MSGPackSerializer
        from petals.client.remote_forward_backward import run_remote_forward
        from petals.data_structures import CHAIN_DELIMITER
        from petals.server.handler import TransformerConnectionHandler
        from petals.utils.misc import DUMMY
        from petals.utils.packaging import pack_args_kwargs

        manager = self._manager
        for peer, start, end in route:
            stub = TransformerConnectionHandler.get_stub(manager.state.p2p, peer)
            flat, structure = pack_args_kwargs(hidden, DUMMY)
            uids = CHAIN_DELIMITER.join(manager.block_uids[start:end])
            metadata = manager.get_request_metadata("rpc_forward", structure, uids, *flat)
            (hidden,) = await run_remote_forward(
                uids,
                stub,
                info,
                *flat,
                config=manager.config,
                metadata=MSGPackSerializer.dumps(metadata),
            )
        return hidden

    async def _check(self, deferred: DeferredCheck, info: Any) -> SpotCheckFailed | None:
        """Check a server's steps against a replica's forward over the same inputs; returns
        the failure to raise in the step, if any."""
        import asyncio

        started = time.perf_counter()
        peer_id, start, end, steps = deferred.peer_id, deferred.start, deferred.end, deferred.steps
        needed = max(offset + int(outputs.shape[1]) for offset, outputs in steps)
        history = deferred.history[:, :needed]
        work = needed * (end - start)
        route = self._route(start, end, {peer_id} | self.monitor.excluded)
        if route is None:
            self.monitor.not_checked(peer_id, "unavailable")
            return None
        tolerance = self.policy.tolerance_for(str(steps[0][1].dtype).removeprefix("torch."))
        try:
            async with asyncio.timeout(self.policy.timeout_s):
                reference = at_positions(steps, await self._forward(history, route, info))
                difference = worst_difference(steps, reference)
                if difference <= tolerance:
                    seconds = time.perf_counter() - started
                    self.monitor.passed(peer_id, work=work, seconds=seconds, difference=difference)
                    return None
                checkers = tuple(peer.to_base58() for peer, _, _ in route)
                third = self._route(start, end, {peer_id, *checkers} | self.monitor.excluded)
                opinion = None
                if third is not None:
                    work += needed * (end - start)
                    other = at_positions(steps, await self._forward(history, third, info))
                    opinion = (
                        worst_difference(steps, other) <= tolerance,
                        worst_difference(reference, other) <= tolerance,
                    )
        except Exception:
            logger.warning("spot check of %s failed to run", peer_id, exc_info=True)
            self.monitor.not_checked(peer_id, "error", seconds=time.perf_counter() - started)
            return None
        return self._settle(peer_id, checkers, opinion, difference, tolerance, work, started)

    def _settle(
        self,
        peer_id: str,
        checkers: tuple[str, ...],
        opinion: tuple[bool, bool] | None,
        difference: float,
        tolerance: float,
        work: int,
        started: float,
    ) -> SpotCheckFailed | None:
        verdict = self.monitor.judge(peer_id, checkers, opinion)
        liar = {"checked": peer_id, "checker": checkers[0], "disputed": None}[verdict]
        evidence = (
            f"relative difference {difference:.2e} > {tolerance:.0e} against "
            f"{','.join(checkers)}; third opinion "
            + ("none" if opinion is None else f"agreed with checked={opinion[0]}")
        )
        seconds = time.perf_counter() - started
        flag = self.monitor.mismatch(liar, verdict, evidence, work=work, seconds=seconds)
        logger.warning("spot check mismatch (%s): %s", verdict, evidence)
        if flag is not None:
            self.exclude(flag.peer_id)
        if verdict == "checker":
            return None
        return SpotCheckFailed(peer_id, permanent=verdict == "checked")
