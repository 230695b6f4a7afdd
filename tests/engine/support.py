"""A protocol v1 session on the engine over the scripted mesh: no sockets, no ML stack."""

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from farmesh_ws import protocol as p
from farmesh_ws.api.v1 import V1Session
from farmesh_ws.auth.connection import ConnectionIdentity
from farmesh_ws.auth.credentials import Authenticator
from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.engine.allowances import BalanceHolds
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.events import Observer, RequestEvent, RequestFinished, RequestStarted
from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
from farmesh_ws.state import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry

PRICE = Decimal("0.0001")


@dataclass
class Recorder(Observer):
    events: list[RequestEvent] = field(default_factory=list)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self, event: RequestEvent) -> None:
        self.events.append(event)
        if isinstance(event, RequestFinished):
            self.settled.set()

    def of(self, kind: type) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]

    @property
    def started_or_finished(self) -> list[RequestEvent]:
        return [e for e in self.events if isinstance(e, RequestStarted | RequestFinished)]


@dataclass
class Harness:
    """One connection's v1 session; ``frames`` are what the client received, as JSON dicts."""

    engine: Engine
    backend: FakeBackend
    recorder: Recorder
    session: V1Session
    frames: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, message: dict[str, Any]) -> bool:
        return await self.session.handle_frame(msgspec.json.encode(message).decode())

    async def finish_running(self) -> None:
        """Wait until the running request, if any, has sent its last frame."""
        running = self.session.client.running if self.session.client else None
        if running is not None and running.task is not None:
            await running.task

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == kind]

    def take(self) -> list[dict[str, Any]]:
        frames, self.frames[:] = list(self.frames), []
        return frames


def harness(
    backend: FakeBackend | None = None,
    *,
    principal: Principal | None = None,
    address: str = "127.0.0.1",
    engine: Engine | None = None,
    holds: BalanceHolds | None = None,
    **overrides: Any,
) -> Harness:
    """A v1 session on ``engine`` (a new one by default) for ``principal`` (default: what a
    client without credentials gets; ``auth`` defaults to ``off``, where a ``user_wallet``
    claim is billed as named, as the wire-rule tests expect)."""
    overrides.setdefault("auth", "off")
    settings = Settings(default_model_id=FAKE_MODEL_ID, price_per_token_far=PRICE, **overrides)
    backend = backend or FakeBackend()
    recorder = Recorder()
    engine = engine or Engine(
        settings=settings,
        backend=backend,
        registry=SessionRegistry(MemoryStateStore()),
        observer=recorder,
        holds=holds,
    )
    authenticator = Authenticator(settings)
    if principal is None:
        principal = authenticator.without_credentials(address)
    if principal is not None:
        engine.quotas.connect(principal)
    identity = ConnectionIdentity(
        authenticator, engine.quotas, principal=principal, address=address, domain="test"
    )
    frames: list[dict[str, Any]] = []

    async def send(message: p.ServerMessage) -> None:
        frames.append(msgspec.json.decode(p.encode_server_message(message)))

    session = V1Session(engine, send, client_key="connection:test", identity=identity)
    return Harness(engine, backend, recorder, session, frames)


def release(gate: asyncio.Semaphore, tokens: int) -> None:
    """Let ``tokens`` more scripted tokens through."""
    for _ in range(tokens):
        gate.release()
