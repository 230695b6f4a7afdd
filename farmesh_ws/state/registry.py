"""Which chat sessions are live, across every gateway process sharing the state store.

The server registers a session when it opens and unregisters it when the connection ends;
a heartbeat renews every local session's entry (TTL ``ttl_s``), so the sessions of a process
that dies drop out of ``active_sessions`` within one TTL. The same heartbeat renews the
process's lease (TTL ``lease_s``): another process may take over the sessions of one whose lease
lapsed (:mod:`farmesh_ws.api.v1_handoff`).
"""

import asyncio
import logging
import os
import secrets
import socket

from farmesh_ws.core.tasks import cancel_and_wait
from farmesh_ws.state import StateStore

logger = logging.getLogger(__name__)


_LEASE_KEY = "process-lease:"


class SessionRegistry:
    """``process_id``: host, pid and a random part (a restarted process whose pid was reused is
    another process)."""

    def __init__(self, store: StateStore, *, ttl_s: float = 30.0, lease_s: float = 10.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._local: dict[str, tuple[str | None, str]] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._lease: asyncio.Task[None] | None = None

    async def register(self, session_id: str, *, wallet: str | None, model_id: str) -> None:
        self._local[session_id] = (wallet, model_id)
        await self.store.register_session(
            session_id,
            process_id=self.process_id,
            wallet=wallet,
            model_id=model_id,
            ttl_s=self.ttl_s,
        )

    async def unregister(self, session_id: str) -> None:
        if self._local.pop(session_id, None) is not None:
            await self.store.unregister_session(session_id)

    async def active_sessions(self) -> int:
        return await self.store.active_sessions()

    async def process_alive(self, process_id: str) -> bool:
        """Whether ``process_id`` (this process or another sharing the store) holds a lease:
        it renewed it within ``lease_s``, and has not stopped."""
        if process_id == self.process_id:
            return self._heartbeat is not None
        return await self.store.get_value(_LEASE_KEY + process_id) is not None

    def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat(), name="farmesh-session-heartbeat")
        self._lease = asyncio.create_task(self._renew_lease(), name="farmesh-process-lease")

    async def aclose(self) -> None:
        await cancel_and_wait(self._heartbeat)
        await cancel_and_wait(self._lease)
        self._heartbeat = self._lease = None
        await self.store.take_value(_LEASE_KEY + self.process_id)
        for session_id in list(self._local):
            await self.unregister(session_id)

    async def _renew_lease(self) -> None:
        """Its own task: however many sessions the heartbeat touches, the lease stays fresh."""
        while True:
            await self.store.put_value(_LEASE_KEY + self.process_id, "1", self.lease_s)
            await asyncio.sleep(self.lease_s / 3)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for session_id, (wallet, model_id) in list(self._local.items()):
                if not await self.store.touch_session(session_id, self.ttl_s):
                    await self.store.register_session(
                        session_id,
                        process_id=self.process_id,
                        wallet=wallet,
                        model_id=model_id,
                        ttl_s=self.ttl_s,
                    )
