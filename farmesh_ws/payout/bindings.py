"""The coordinator's verified payout bindings: peer id → wallet, cached with a TTL.

:class:`PayoutBindings` fetches every statement (``fetch``, e.g. :func:`~.dht.fetch_statements`
on the mesh client's DHT) at most once per ``ttl_s``, keeps those that verify
(:func:`~.statement.verify_statement`) and are fresh (issued at most ``max_age_s`` ago and not
more than ``max_clock_skew_s`` ahead), the newest per peer id, and answers from that cache.
A statement that fails is ignored and logged once, by claimed peer id and reason only. When a
fetch fails the bindings verified before stay in use until they are too old. The fetch is made
by the first turn to find the cache older than ``ttl_s`` (one DHT get: 6 ms median, 10 ms at
most over 10 gets on the local swarm); turns ending meanwhile wait for it.

Attribution reads the bindings of the mesh backend whose worker thread it runs in:
:func:`running_with` sets them around a worker call, :func:`current` reads them.
"""

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from farmesh_ws.payout.statement import InvalidStatement, PayoutStatement, verify_statement

logger = logging.getLogger(__name__)
T = TypeVar("T")
Fetch = Callable[[float], Iterable[object]]

_current: contextvars.ContextVar["PayoutBindings | None"] = contextvars.ContextVar(
    "farmesh_payout_bindings", default=None
)


@dataclass(frozen=True, slots=True)
class BindingPolicy:
    """How bindings are fetched and which statements count; all in seconds (.env.example,
    ``FARMESH_PAYOUT_*``)."""

    ttl_s: float = 60.0
    fetch_timeout_s: float = 2.0
    max_age_s: float = 86400.0
    max_clock_skew_s: float = 300.0


class PayoutBindings:
    """Verified statements by peer id. Thread-safe; :meth:`wallets` may block on one fetch
    (at most ``fetch_timeout_s``), so call it from a worker thread."""

    def __init__(
        self, fetch: Fetch, policy: BindingPolicy, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._fetch = fetch
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._statements: dict[str, PayoutStatement] = {}
        self._fetched_at: float | None = None
        self._reported: set[tuple[str, str]] = set()

    def wallets(self, peer_ids: Iterable[str]) -> dict[str, str]:
        """The proven payout wallet (EIP-55) of each of ``peer_ids`` that has one."""
        with self._lock:
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at >= self.policy.ttl_s:
                self._fetched_at = now
                self._refresh(now)
            found = {}
            for peer_id in peer_ids:
                statement = self._statements.get(peer_id)
                if statement is not None and self._fresh(statement, now):
                    found[peer_id] = statement.wallet
            return found

    def _refresh(self, now: float) -> None:
        try:
            raw = list(self._fetch(self.policy.fetch_timeout_s))
        except Exception as exc:  # noqa: BLE001 - a failed fetch keeps the verified bindings
            logger.warning(
                "cannot fetch payout statements (%s); keeping %d bindings",
                type(exc).__name__,
                len(self._statements),
            )
            return
        for value in raw:
            statement = self._verified(value, now)
            if statement is None:
                continue
            known = self._statements.get(statement.peer_id)
            if known is None or statement.issued_at >= known.issued_at:
                self._statements[statement.peer_id] = statement

    def _verified(self, value: object, now: float) -> PayoutStatement | None:
        claimed = str(value.get("peer_id", "?"))[:64] if isinstance(value, dict) else "?"
        try:
            statement = PayoutStatement.from_json(value)
            verify_statement(statement)
            if not self._fresh(statement, now):
                raise InvalidStatement("issued_at is outside the accepted window")
        except InvalidStatement as exc:
            if (claimed, str(exc)) not in self._reported:
                self._reported.add((claimed, str(exc)))
                logger.warning("ignoring the payout statement of peer %r: %s", claimed, exc)
            return None
        return statement

    def _fresh(self, statement: PayoutStatement, now: float) -> bool:
        return (
            now - self.policy.max_age_s <= statement.issued_at <= now + self.policy.max_clock_skew_s
        )


def current() -> PayoutBindings | None:
    """The bindings of the backend running this worker call (None outside one)."""
    return _current.get()


def running_with(bindings: PayoutBindings | None, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` wrapped to run with ``bindings`` as :func:`current`."""

    def run(*args: Any) -> T:
        token = _current.set(bindings)
        try:
            return fn(*args)
        finally:
            _current.reset(token)

    return run
