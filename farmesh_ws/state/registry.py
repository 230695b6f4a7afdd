"""Which chat sessions are live, across every gateway process sharing the state store.

The server registers a session when it opens and unregisters it when the connection ends;
a heartbeat renews every local session's entry (TTL ``ttl_s``), so the sessions of a process
that dies drop out of ``active_sessions`` within one TTL.
"""

import asyncio
import contextlib
import logging
import os
import socket

from farmesh_ws.state import StateStore

logger = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(self, store: StateStore, *, ttl_s: float = 30.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.process_id = f"{socket.gethostname()}:{os.getpid()}"
        self._local: dict[str, tuple[str | None, str]] = {}
        self._heartbeat: asyncio.Task[None] | None = None

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

    def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat(), name="farmesh-session-heartbeat")

    async def aclose(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        for session_id in list(self._local):
            await self.unregister(session_id)

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
