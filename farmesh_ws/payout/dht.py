"""Where payout statements live: one hivemind DHT key, one subkey per server.

A server stores its statement (:meth:`~.statement.PayoutStatement.to_json`) under the key
``PAYOUT_DHT_KEY`` and the subkey of its base58 peer id, as Petals stores a module's servers
under the module's key, and stores it again (freshly signed) every ``period_s`` with a DHT
expiration ``expiration_s`` ahead, so a server that stops is forgotten as its modules are.
One ``get`` of the key returns every server's statement at once.

The DHT authenticates nothing: anyone may store any value under any subkey. That is why a
statement proves itself (its signature and peer id are checked by the coordinator, and a bad
one is ignored). A peer that overwrites a server's subkey with garbage can hide its binding
until the next store (the node is credited unbound meanwhile); it cannot redirect a payout.
"""

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from farmesh_ws.payout.statement import SigningKey, sign_statement

logger = logging.getLogger(__name__)

PAYOUT_DHT_KEY = "farmesh_payout_bindings_v1"


def fetch_statements(dht: Any, timeout_s: float) -> list[object]:
    """Every statement stored under ``PAYOUT_DHT_KEY``, unverified, as stored (JSON-like
    values). Blocking: call from a worker thread. Raises TimeoutError after ``timeout_s`` and
    whatever the DHT raises."""
    future = dht.get(PAYOUT_DHT_KEY, latest=True, return_future=True)
    try:
        found = future.result(timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"the DHT did not answer within {timeout_s} s") from None
    if found is None or not isinstance(found.value, dict):
        return []
    return [getattr(entry, "value", None) for entry in found.value.values()]


class StatementPublisher:
    """Signs and stores a server's statement now and every ``period_s`` seconds (a thread).

    ``dht`` is the server's hivemind DHT; ``key`` its identity key (the statement is for the
    peer id that key derives, which must be the server's); ``wallet`` any-case 0x address.
    Raises ValueError at construction for a wallet that is not an Ethereum address.
    """

    def __init__(
        self,
        dht: Any,
        key: SigningKey,
        wallet: str,
        *,
        period_s: float,
        expiration_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.statement = sign_statement(key, wallet, int(clock()))
        self._dht = dht
        self._key = key
        self._period_s = period_s
        self._expiration_s = expiration_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="farmesh-payout-publisher", daemon=True
        )

    def start(self) -> None:
        """Publish once now (so the statement is in the DHT when this returns, unless the
        store failed, which is logged), then every ``period_s`` in the thread."""
        self._publish_logged()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def publish(self) -> bool:
        """Sign a fresh statement and store it; True if the DHT accepted it."""
        now = self._clock()
        self.statement = sign_statement(self._key, self.statement.wallet, int(now))
        stored = self._dht.store(
            PAYOUT_DHT_KEY,
            self.statement.to_json(),
            expiration_time=now + self._expiration_s,
            subkey=self.statement.peer_id,
        )
        return bool(stored)

    def _run(self) -> None:
        while not self._stop.wait(self._period_s):
            self._publish_logged()

    def _publish_logged(self) -> None:
        try:
            if not self.publish():
                logger.warning("the DHT did not store the payout statement; will retry")
        except Exception as exc:  # noqa: BLE001 - the next period tries again
            logger.warning("publishing the payout statement failed (%s)", type(exc).__name__)
