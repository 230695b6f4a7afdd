"""Which steps to spot-check, who lied, and what each node's record is (issue 12, items 2–3).

Pure bookkeeping, thread-safe, importable without torch: :mod:`.spot_check_run` runs the
checks on the mesh and reports here. The rules:

* **Sampling.** A node's first ``first_steps`` *passed* checks are compulsory: every one of its
  steps is checked until it has passed that many. After that, its steps are cut into windows of
  ``W = round(1 / rate)`` consecutive steps and exactly one step of each window, drawn uniformly
  by a CSPRNG, is checked. A node that tampers with every step from its step ``t`` on is
  therefore checked, and caught, by its step ``t + 2W - 1`` at the latest (the window holding
  ``t`` may have drawn an earlier step; the next one draws a step in it), its verdict coming
  when that step's turn ends (:mod:`.spot_check_run` checks sampled steps then); one that tampers
  with a fraction ``f`` of steps, independently, is caught per window with probability ``f``.
* **Load.** At most ``max_background`` sampled checks run at once per model; a sampled check
  due while that many run is skipped (counted ``skipped``) and the node's next step is checked
  instead, so the bound above stretches by the steps during which the cap stayed full.
  Compulsory checks are never skipped.
* **Judging.** The checked node's outputs are compared with a replica's; on a mismatch a third
  opinion (replicas other than both) decides; with no third opinion, the side with fewer passed
  checks is held to be lying, the checked node on a tie (the coordinator can go on with the
  checker's route, never the other way round).
* **Withholding.** A caught node is flagged (:class:`NodeFlag`) and excluded; its work since its
  last passed check (``withheld_since``) is withheld by the ledger (schema version 6).
* **Plausibility.** A node announcing ``inference_rps`` (steps per second per block) whose measured
  step latency per block, averaged over ``min_samples`` steps, is more than ``factor`` times the
  announced one's is flagged ``implausible_throughput``; routing then uses the measured figure.
"""

import math
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

FlagKind = Literal["tampered_output", "implausible_throughput"]
CheckResult = Literal["pass", "mismatch", "unavailable", "error", "skipped"]
Verdict = Literal["checked", "checker", "disputed"]

_TOLERANCE_BY_DTYPE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 3e-2}
"""Relative RMS difference allowed between two honest computations of the same span, by dtype.
float32: honest replicas measured at most 2e-6 apart on the bundled model (a cached inference
step against a full-prefix forward, 30 blocks), so 1e-3 leaves a wide margin while a perturbation
of 1% of the hidden states' RMS is caught. 16-bit: 10-bit (half) and 7-bit (bfloat16) mantissas,
ε = 1e-3 and 8e-3, accumulated over a span."""


@dataclass(frozen=True, slots=True)
class SpotCheckPolicy:
    """``rate``: the fraction of a node's steps checked after its first ``first_steps`` passed
    checks (0 turns spot checks off); ``tolerance``: relative RMS difference allowed, 0 for
    the dtype's default (:data:`_TOLERANCE_BY_DTYPE`); ``timeout_s``: one check's remote calls;
    ``max_background``: sampled checks running at once, per model (see "Load" in the module
    docstring); ``plausibility_factor``/``plausibility_min_samples``: see the module docstring."""

    rate: float = 0.05
    first_steps: int = 3
    tolerance: float = 0.0
    timeout_s: float = 30.0
    max_background: int = 4
    plausibility_factor: float = 10.0
    plausibility_min_samples: int = 20

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    @property
    def window(self) -> int:
        """Steps per sampling window, ``W``; one step of each is checked."""
        return max(1, round(1 / self.rate)) if self.rate > 0 else 0

    @property
    def detection_bound_steps(self) -> int:
        """The most steps a node tampering with every step from some step on can take past
        its compulsory checks before it is checked: ``2W - 1``."""
        return 2 * self.window - 1

    def tolerance_for(self, dtype: str) -> float:
        """The tolerance for hidden states of ``dtype`` (torch's name without ``torch.``)."""
        return self.tolerance or _TOLERANCE_BY_DTYPE.get(dtype, _TOLERANCE_BY_DTYPE["float16"])


@dataclass(frozen=True, slots=True)
class NodeFlag:
    """A node found cheating. ``step``: the node's step count (this coordinator's) when
    caught; ``withheld_since``: Unix time of its last passed check (0: never passed), its
    work in turns ended after it is withheld; ``evidence``: a one-line summary."""

    peer_id: str
    kind: FlagKind
    flagged_at: float
    step: int
    evidence: str
    withheld_since: float
    withheld_work: int = 0
    """Token-blocks of work since the last passed check, as counted by this coordinator."""


@dataclass(slots=True)
class PeerRecord:
    """This coordinator's view of one node; work in token-blocks."""

    steps: int = 0
    passed: int = 0
    last_passed_at: float = 0.0
    unverified_work: int = 0
    flagged: bool = False
    latency_per_block_s: float = 0.0
    latency_samples: int = 0
    owed: bool = False
    """A sampled check was skipped (cap full): the next step is checked instead."""
    _window: int = -1
    _draw: int = -1


@dataclass(slots=True)
class IntegrityCounters:
    """Totals for ``/metrics``: checks by result, mismatches by verdict, withheld work and
    the verification's own cost (token-blocks recomputed, seconds spent)."""

    checks: dict[str, int] = field(default_factory=dict)
    mismatches: dict[str, int] = field(default_factory=dict)
    withheld_work: int = 0
    check_work: int = 0
    check_seconds: float = 0.0
    flags: dict[str, int] = field(default_factory=dict)


Listener = Callable[["IntegrityEvent"], None]


@dataclass(frozen=True, slots=True)
class IntegrityEvent:
    """What listeners (ledger, metrics) hear: a check's outcome, or a flag."""

    peer_id: str
    result: CheckResult | None = None
    verdict: str | None = None
    work: int = 0
    seconds: float = 0.0
    at: float = 0.0
    difference: float = 0.0
    flag: NodeFlag | None = None


class IntegrityMonitor:
    """Per-node records, sampling decisions and verdicts of one coordinator."""

    def __init__(self, policy: SpotCheckPolicy, *, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.counters = IntegrityCounters()
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, PeerRecord] = {}
        self._rng = random.Random(secrets.randbits(64))
        self._listeners: list[Listener] = []
        self.paused = False
        """While True no step is chosen for a check (a benchmark's "without" side)."""
        self.excluded: frozenset[str] = frozenset()
        """Nodes flagged for tampering: never routed to again (read without the lock)."""

    def subscribe(self, listener: Listener) -> None:
        """``listener(event)`` is called, from a mesh thread, for every check and flag."""
        self._listeners.append(listener)

    def record(self, peer_id: str) -> PeerRecord:
        """A copy of the node's record (a fresh one for a node never seen)."""
        with self._lock:
            found = self._peers.get(peer_id, PeerRecord())
            return PeerRecord(**{name: getattr(found, name) for name in found.__slots__})

    def on_step(self, peer_id: str, work: int) -> bool:
        """Count one step of ``work`` token-blocks by ``peer_id``; True if it must be checked."""
        with self._lock:
            record = self._peers.setdefault(peer_id, PeerRecord())
            record.steps += 1
            record.unverified_work += work
            if not self.policy.enabled or self.paused or record.flagged:
                return False
            if record.passed < self.policy.first_steps or record.owed:
                record.owed = False
                return True
            window = self.policy.window
            index = record.steps - 1
            if index // window != record._window:
                record._window = index // window
                record._draw = record._window * window + self._rng.randrange(window)
            return index == record._draw

    def judge(
        self, checked: str, checker_peers: tuple[str, ...], third: tuple[bool, bool] | None
    ) -> Verdict:
        """Who lied after a mismatch between ``checked`` and the replicas ``checker_peers``.
        ``third``: whether a third opinion agreed with (the checked node, the checker), or
        None when no third replica exists; then the side with fewer passed checks lied, the
        checked node on a tie. ``disputed``: the third opinion agreed with neither, or blames
        a checker route of several nodes (which one is unknown)."""
        if third is not None:
            checked_agrees, checker_agrees = third
            if checker_agrees and not checked_agrees:
                return "checked"
            if checked_agrees and not checker_agrees and len(checker_peers) == 1:
                return "checker"
            return "disputed"
        with self._lock:
            mine = self._peers.get(checked, PeerRecord()).passed
            theirs = min(self._peers.get(p, PeerRecord()).passed for p in checker_peers)
        return "checker" if mine > theirs and len(checker_peers) == 1 else "checked"

    def passed(self, peer_id: str, *, work: int, seconds: float, difference: float) -> None:
        """A check of ``peer_id`` passed (relative ``difference``): its work so far counts as
        verified."""
        now = self._clock()
        with self._lock:
            record = self._peers.setdefault(peer_id, PeerRecord())
            record.passed += 1
            record.last_passed_at = now
            record.unverified_work = 0
            self._count("pass", work, seconds)
        self._tell(
            IntegrityEvent(
                peer_id, result="pass", work=work, seconds=seconds, at=now, difference=difference
            )
        )

    def not_checked(
        self, peer_id: str, result: CheckResult, *, work: int = 0, seconds: float = 0.0
    ) -> None:
        """A check could not run (``unavailable``: no replica; ``error``: a replica failed)."""
        with self._lock:
            self._count(result, work, seconds)
        self._tell(IntegrityEvent(peer_id, result=result, work=work, seconds=seconds))

    def skipped(self, peer_id: str) -> None:
        """A sampled check of ``peer_id`` due now was not started (too many running): count
        it, and check the node's next step instead."""
        with self._lock:
            self._peers.setdefault(peer_id, PeerRecord()).owed = True
            self._count("skipped", 0, 0.0)
        self._tell(IntegrityEvent(peer_id, result="skipped"))

    def mismatch(
        self, liar: str | None, verdict: Verdict, evidence: str, *, work: int, seconds: float
    ) -> NodeFlag | None:
        """Record a mismatch; flag ``liar`` (once; None when disputed) and return the flag."""
        with self._lock:
            self._count("mismatch", work, seconds)
            self.counters.mismatches[verdict] = self.counters.mismatches.get(verdict, 0) + 1
        self._tell(
            IntegrityEvent(
                liar or "", result="mismatch", verdict=verdict, work=work, seconds=seconds
            )
        )
        return None if liar is None else self.flag(liar, "tampered_output", evidence)

    def flag(self, peer_id: str, kind: FlagKind, evidence: str) -> NodeFlag | None:
        """Flag ``peer_id``; a node already flagged for ``tampered_output`` is not flagged
        again. Returns the new flag, or None."""
        now = self._clock()
        with self._lock:
            record = self._peers.setdefault(peer_id, PeerRecord())
            if record.flagged:
                return None
            flag = NodeFlag(
                peer_id=peer_id,
                kind=kind,
                flagged_at=now,
                step=record.steps,
                evidence=evidence,
                withheld_since=record.last_passed_at if kind == "tampered_output" else now,
                withheld_work=record.unverified_work if kind == "tampered_output" else 0,
            )
            if kind == "tampered_output":
                record.flagged = True
                self.excluded = self.excluded | {peer_id}
                self.counters.withheld_work += record.unverified_work
            self.counters.flags[kind] = self.counters.flags.get(kind, 0) + 1
        self._tell(IntegrityEvent(peer_id, flag=flag, at=now))
        return flag

    def on_latency(self, peer_id: str, blocks: int, seconds: float, announced_rps: float) -> bool:
        """Fold one step's latency into the node's mean per block; True when the claim
        ``announced_rps`` (steps/s per block, 0: none) just became implausible."""
        if blocks < 1:
            return False
        with self._lock:
            record = self._peers.setdefault(peer_id, PeerRecord())
            record.latency_samples += 1
            n = record.latency_samples
            record.latency_per_block_s += (seconds / blocks - record.latency_per_block_s) / n
            if announced_rps <= 0 or n != self.policy.plausibility_min_samples:
                return False
            return record.latency_per_block_s * announced_rps > self.policy.plausibility_factor

    def measured_rps(self, peer_id: str) -> float:
        """Steps per second per block measured for ``peer_id`` (math.inf before any)."""
        with self._lock:
            record = self._peers.get(peer_id)
            if record is None or record.latency_per_block_s <= 0:
                return math.inf
            return 1.0 / record.latency_per_block_s

    def _count(self, result: str, work: int, seconds: float) -> None:
        self.counters.checks[result] = self.counters.checks.get(result, 0) + 1
        self.counters.check_work += work
        self.counters.check_seconds += seconds

    def _tell(self, event: IntegrityEvent) -> None:
        for listener in self._listeners:
            listener(event)
