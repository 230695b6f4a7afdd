"""Caps per principal and the mesh's attention-cache reservations (protocol.md §9).

Counted in this process, keyed by :attr:`~farmesh_ws.core.principal.Principal.quota_key` (the
API key or signed wallet; the hashed client address without credentials): connections, running
requests, open sessions, and reserved context tokens, the sum of ``max_length`` over the
principal's sessions and one-shot requests (a one-shot reserves prompt + ``max_new_tokens``).
Anonymous use has the ``anonymous_*`` caps; every other principal, ``auth = off`` included (its
clients may all come through one trusted proxy), has the ``*_per_principal`` ones.

Reservations are also held against the mesh. Petals servers allocate a session's attention
cache for its whole ``max_length`` when its first step arrives and announce what is left as
``cache_tokens_left`` (tokens of one session over all of a server's blocks). A new reservation
fits when it is at most what the best route has left (:func:`capacity` of the latest status)
minus what this process reserved that the servers had not yet counted at that time: sessions
not stepped yet, or stepped after the status was read.

Every refusal raises :class:`~farmesh_ws.errors.QuotaExceeded` and changes no counter.
"""

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal, PrincipalKind
from farmesh_ws.errors import QuotaExceeded


@dataclass(frozen=True, slots=True)
class Caps:
    connections: int
    requests: int
    sessions: int
    reserved_tokens: int


@dataclass(frozen=True, slots=True)
class MeshCapacity:
    """``cache_tokens_left`` of a model's best route at ``checked_at`` (Unix s); None: unknown."""

    cache_tokens_left: int | None
    checked_at: float


@dataclass(slots=True, eq=False)
class Reservation:
    """Context tokens held for one session (or one-shot request) until released."""

    quota_key: str
    model_id: str
    tokens: int
    anonymous: bool = False
    allocated_at: float | None = None
    released: bool = False

    def allocated(self) -> None:
        """Its first step is about to run: the servers allocate its cache now."""
        if self.allocated_at is None:
            self.allocated_at = time.time()


class KeptReservations(Protocol):
    """Reservations that sessions kept for reuse hold while idle, which give way on demand."""

    def held_by(self, quota_key: str) -> int:
        """Tokens the principal's idle kept sessions hold."""
        ...

    def reclaim(self, quota_key: str) -> bool:
        """Release the principal's least recently used kept session; False if none."""
        ...

    def give_way(self, model_id: str, tokens: int) -> None:
        """Close idle kept sessions on ``model_id`` (least recently used first) holding up to
        ``tokens``: the mesh frees their cache, for a later request."""
        ...


class _NothingKept:
    def held_by(self, quota_key: str) -> int:
        return 0

    def reclaim(self, quota_key: str) -> bool:
        return False

    def give_way(self, model_id: str, tokens: int) -> None:
        return None


@dataclass(slots=True)
class _Usage:
    connections: int = 0
    requests: int = 0
    sessions: int = 0
    reserved_tokens: int = 0

    def idle(self) -> bool:
        return not (self.connections or self.requests or self.sessions or self.reserved_tokens)


@dataclass(slots=True)
class _Totals:
    connections: int = 0
    requests: int = 0
    sessions: int = 0
    reserved: Counter[str] = field(default_factory=Counter)
    reserved_anonymous: Counter[str] = field(default_factory=Counter)


class Quotas:
    """Counters and caps; ``capacity(model_id)`` reads the mesh's latest status."""

    def __init__(
        self, settings: Settings, capacity: Callable[[str], MeshCapacity] | None = None
    ) -> None:
        self._settings = settings
        self._capacity = capacity
        self._usage: dict[str, _Usage] = {}
        self._reservations: set[Reservation] = set()
        self.totals = _Totals()
        self.kept: KeptReservations = _NothingKept()
        """Reservations held by idle kept sessions (:mod:`~farmesh_ws.engine.reuse`)."""

    def caps(self, principal: Principal) -> Caps:
        """The configured caps of the principal's kind, with its own limits over them."""
        s = self._settings
        if principal.kind is PrincipalKind.ANONYMOUS:
            base = Caps(
                s.anonymous_max_connections,
                s.anonymous_max_requests,
                s.anonymous_max_sessions,
                s.anonymous_max_reserved_tokens,
            )
        else:
            base = Caps(
                s.max_connections_per_principal,
                s.max_requests_per_principal,
                s.max_sessions_per_principal,
                s.max_reserved_tokens_per_principal,
            )
        own = principal.limits
        return Caps(
            base.connections if own.max_connections is None else own.max_connections,
            base.requests if own.max_requests is None else own.max_requests,
            base.sessions if own.max_sessions is None else own.max_sessions,
            base.reserved_tokens if own.max_reserved_tokens is None else own.max_reserved_tokens,
        )

    def connect(self, principal: Principal) -> None:
        usage = self._usage_of(principal)
        cap = self.caps(principal).connections
        self._check(usage.connections + 1 <= cap, principal, f"{cap} connections")
        usage.connections += 1
        self.totals.connections += 1

    def disconnect(self, principal: Principal) -> None:
        self._change(principal, connections=-1)
        self.totals.connections -= 1

    def begin_request(self, principal: Principal) -> None:
        usage = self._usage_of(principal)
        cap = self.caps(principal).requests
        self._check(usage.requests + 1 <= cap, principal, f"{cap} running requests")
        usage.requests += 1
        self.totals.requests += 1

    def end_request(self, principal: Principal) -> None:
        self._change(principal, requests=-1)
        self.totals.requests -= 1

    def reserve(
        self,
        principal: Principal,
        model_id: str,
        tokens: int,
        *,
        session: bool,
        reclaim: bool = True,
    ) -> Reservation:
        """Hold ``tokens`` of context for a session (``session``: also counts one session)
        or a one-shot request; raises QuotaExceeded if the principal or the mesh is full.
        With ``reclaim``, the principal's idle kept sessions give their reservations back when
        that makes the tokens fit its cap (only then: a refusal closes none of them), and on a
        mesh too full, idle kept sessions on the model are closed for a later retry."""
        usage = self._usage_of(principal)
        caps = self.caps(principal)
        if session:
            self._check(
                usage.sessions + 1 <= caps.sessions, principal, f"{caps.sessions} open sessions"
            )
        held = usage.reserved_tokens
        spare = self.kept.held_by(principal.quota_key) if reclaim else 0
        self._check(
            held - spare + tokens <= caps.reserved_tokens,
            principal,
            f"{caps.reserved_tokens} reserved context tokens ({held} held, {tokens} asked)",
        )
        anonymous = principal.kind is PrincipalKind.ANONYMOUS
        try:
            self._check_mesh(model_id, tokens, anonymous=anonymous)
        except QuotaExceeded:
            if reclaim:
                self.kept.give_way(model_id, tokens)
            self._forget_if_idle(principal)
            raise
        while held + tokens > caps.reserved_tokens and self.kept.reclaim(principal.quota_key):
            held = self._usage_of(principal).reserved_tokens
        usage = self._usage_of(principal)  # a reclaim may have dropped an idle entry
        reservation = Reservation(principal.quota_key, model_id, tokens, anonymous)
        self._reservations.add(reservation)
        usage.reserved_tokens += tokens
        self.totals.reserved[model_id] += tokens
        if anonymous:
            self.totals.reserved_anonymous[model_id] += tokens
        if session:
            usage.sessions += 1
            self.totals.sessions += 1
        return reservation

    def release(self, reservation: Reservation, *, session: bool) -> None:
        """Give the tokens back (idempotent)."""
        if reservation.released:
            return
        reservation.released = True
        self._reservations.discard(reservation)
        self.totals.reserved[reservation.model_id] -= reservation.tokens
        if reservation.anonymous:
            self.totals.reserved_anonymous[reservation.model_id] -= reservation.tokens
        usage = self._usage.get(reservation.quota_key)
        if usage is None:
            return
        usage.reserved_tokens -= reservation.tokens
        if session:
            usage.sessions -= 1
            self.totals.sessions -= 1
        if usage.idle():
            del self._usage[reservation.quota_key]

    def uncounted_tokens(self, model_id: str, checked_at: float) -> int:
        """Reserved here but not yet in the servers' ``cache_tokens_left`` of ``checked_at``."""
        return sum(
            r.tokens
            for r in self._reservations
            if r.model_id == model_id and (r.allocated_at is None or r.allocated_at >= checked_at)
        )

    def sessions_full(self, principal: Principal) -> bool:
        """Whether the principal holds as many sessions as its cap allows."""
        return self._usage_of(principal).sessions >= self.caps(principal).sessions

    def could_hold(self, model_id: str) -> int | None:
        """Context tokens this gateway could hold on ``model_id``: what the mesh has free plus
        what it reserves now (None: the mesh's capacity is unknown)."""
        free = self._free(model_id)
        return None if free is None else max(free, 0) + self.totals.reserved[model_id]

    def _free(self, model_id: str) -> int | None:
        if self._capacity is None:
            return None
        capacity = self._capacity(model_id)
        if capacity.cache_tokens_left is None:
            return None
        return capacity.cache_tokens_left - self.uncounted_tokens(model_id, capacity.checked_at)

    def _check_mesh(self, model_id: str, tokens: int, *, anonymous: bool) -> None:
        """``tokens`` fit in what the mesh has free; anonymous use all together holds at most
        ``anonymous_max_cache_share`` of what this gateway could hold (free + reserved)."""
        free = self._free(model_id)
        if free is None:
            return
        if tokens > free:
            raise QuotaExceeded(
                f"the mesh has attention cache for {max(free, 0)} more tokens; this needs "
                f"{tokens} (ask for a smaller max_length or retry when sessions close)"
            )
        share = self._settings.anonymous_max_cache_share
        if anonymous:
            limit = int(share * (free + self.totals.reserved[model_id]))
            if self.totals.reserved_anonymous[model_id] + tokens > limit:
                raise QuotaExceeded(
                    f"anonymous use may hold {share:.0%} of the mesh's attention cache, and "
                    "holds it; use an API key or retry when sessions close"
                )

    def _usage_of(self, principal: Principal) -> _Usage:
        return self._usage.setdefault(principal.quota_key, _Usage())

    def _change(self, principal: Principal, **deltas: int) -> None:
        usage = self._usage.get(principal.quota_key)
        if usage is None:
            return
        for name, delta in deltas.items():
            setattr(usage, name, getattr(usage, name) + delta)
        if usage.idle():
            del self._usage[principal.quota_key]

    def _forget_if_idle(self, principal: Principal) -> None:
        usage = self._usage.get(principal.quota_key)
        if usage is not None and usage.idle():
            del self._usage[principal.quota_key]

    def _check(self, ok: bool, principal: Principal, what: str) -> None:
        if ok:
            return
        self._forget_if_idle(principal)
        who = "this client address" if principal.anonymous else principal.principal_id
        raise QuotaExceeded(f"{who} may hold at most {what} at once")
