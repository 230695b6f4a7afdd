"""Protocol v1 (protocol.md) over the engine: one connection's messages in, frames out.

This adapter decodes client frames, turns them into engine calls and encodes what the engine
reports; every rule (limits, budget, rate limit, context room, session state) is the
engine's. Section numbers cite protocol.md.
"""

import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal

from farmesh_ws import protocol as p
from farmesh_ws.api.v1_frames import error_frame, settled_frames
from farmesh_ws.api.v1_handoff import Handoff
from farmesh_ws.api.v1_reattach import reattach
from farmesh_ws.api.v1_resume import Outbox, ResumableSessions, new_resume_token
from farmesh_ws.auth.connection import ConnectionIdentity
from farmesh_ws.core.money import far_text
from farmesh_ws.core.settlement import Settlement
from farmesh_ws.core.types import SamplingOverrides, TokenEvent
from farmesh_ws.engine.conversation import Client, Conversation
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.history import rewind_idle
from farmesh_ws.engine.request import ActiveRequest
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import (
    AlreadyOpen,
    FarmeshError,
    InvalidRequest,
    NoSession,
    SessionClosed,
    SessionExpired,
    UnknownRequest,
)

logger = logging.getLogger(__name__)

Send = Callable[[p.ServerMessage], Awaitable[None]]


class V1Session:
    """One connection's protocol v1 session (§2): at most one conversation, one request at a
    time. ``send`` delivers a frame (and drops it once the socket is closed); ``identity``
    is the connection's principal (§2.1)."""

    def __init__(
        self,
        engine: Engine,
        send: Send,
        *,
        client_key: str,
        identity: ConnectionIdentity,
        resumable: ResumableSessions | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._engine = engine
        self._send = send
        self._client_key = client_key
        self.identity = identity
        self._resumable = resumable
        self._handoff = handoff
        self.client: Client | None = None
        self.conversation: Conversation | None = None
        self.outbox: Outbox | None = None
        self.closed = False
        self.moved = False
        """The session was resumed on another connection (§2.2): this one no longer has it."""

    @property
    def session_id(self) -> str | None:
        return None if self.conversation is None else self.conversation.session_id

    @property
    def busy(self) -> bool:
        return self.client is not None and self.client.busy

    async def handle_frame(self, frame: str | bytes) -> bool:
        """Decode and act on one frame; False if it was answered with an ``error`` frame."""
        request_id: str | None = None
        try:
            message = p.decode_client_message(frame)
            request_id = p.request_id_of(message)
            await self.handle(message)
        except FarmeshError as exc:
            if exc.close_code is not None:
                logger.error("internal error", exc_info=True)
            await self.send_error(exc, request_id)
            return False
        return True

    async def handle(self, message: p.ClientMessage) -> None:
        """Act on one decoded message; raises :class:`FarmeshError` for an ``error`` frame."""
        if isinstance(message, p.Ping):
            await self._send(p.Pong(data=message.data))
        elif isinstance(message, p.Auth):
            await self._auth(message)
        elif self.identity.principal is None:  # §2.1: credentials first
            self.identity.require()
        elif isinstance(message, p.Open):
            await self._open(message)
        elif isinstance(message, p.Resume):
            await self._resume(message)
        elif isinstance(message, p.Turn | p.Regenerate):
            await self._turn(message)
        elif isinstance(message, p.Rewind):
            await self._rewind(message)
        elif isinstance(message, p.Generate):
            await self._generate(message)
        elif isinstance(message, p.Cancel):
            self._cancel(message.request_id)
        elif isinstance(message, p.Close):
            self._check_open()
            await self.aclose()
            await self._emit(p.Closed(session_id=self.session_id))

    async def disconnected(self, *, resumable: bool) -> None:
        """The connection ended: keep the session for a resume (§2.2) if ``resumable`` (it
        did not close normally) and the server keeps sessions, else close it."""
        self.identity.close()
        if self.moved:
            return
        session_id = self.session_id
        sessions = self._resumable
        if (
            resumable
            and session_id is not None
            and not self.closed
            and sessions is not None
            and not self._engine.sessions.stopping
            and self.outbox is not None
            and sessions.detach(session_id)
        ):
            self.outbox.detach()
            self.outbox.on_overflow = self._cancel_running
            return
        # the server closed it while stopping: another gateway may take the session (§2.3)
        await self.aclose(release=self._engine.sessions.stopping)

    def _cancel_running(self) -> None:
        running = self.client.running if self.client is not None else None
        if running is not None:
            running.cancel()

    async def aclose(self, *, release: bool = False) -> None:
        """Cancel a running request (it still settles) and close the conversation; with
        ``release``, another gateway may take it over (§2.3)."""
        if self.closed:
            return
        self.closed = True
        session_id = self.session_id
        if self._resumable is not None and session_id is not None:
            self._resumable.forget(session_id)
        running = self.client.running if self.client is not None else None
        try:
            if running is not None:
                running.cancel()
                if running.task is not None:
                    await running.task
        finally:
            if self._handoff is not None and session_id is not None:
                await self._handoff.forget(session_id, released=self.outbox if release else None)
            if self.conversation is not None:
                await self._engine.sessions.close(self.conversation)
            self.identity.close()

    async def _emit(self, message: p.ServerMessage) -> None:
        """A frame of the session (numbered, kept for a resume) or, before one is open, of
        the connection."""
        if self.outbox is not None:
            await self.outbox.send(message)
        else:
            await self._send(message)

    async def send_error(self, error: FarmeshError, request_id: str | None) -> None:
        """An ``error`` frame of the session (or, when it moved to another connection, to
        this connection only)."""
        self._engine.error_sent(error.code)
        frame = error_frame(error, request_id)
        await (self._send(frame) if self.moved else self._emit(frame))

    # §2.1
    async def _auth(self, message: p.Auth) -> None:
        self._check_open()
        if self.conversation is not None or self.busy:
            raise InvalidRequest(
                "this connection already opened a session without credentials; authenticate "
                "a new connection first (an auth message, or the Authorization header)"
            )
        siwe = message.siwe
        credential = await self.identity.authenticate(
            token=message.token,
            message=None if siwe is None else siwe.message,
            signature=None if siwe is None else siwe.signature,
        )
        principal = credential.principal
        if self.client is not None:
            self.client.principal = principal
        await self._send(
            p.Authenticated(
                principal=principal.principal_id,
                wallet=principal.wallet,
                token=credential.token if credential.issued else None,
                expires_at=credential.expires_at if credential.issued else None,
            )
        )

    async def _requester(self) -> Client:
        """The connection's requester, its credential still good (§2.1)."""
        principal = await self.identity.current()
        if self.client is None:
            self.client = Client(self._client_key, principal)
        return self.client

    # §3.1
    async def _open(self, message: p.Open) -> None:
        if self.conversation is not None:
            raise AlreadyOpen("this connection already has a chat session")
        self._check_open()
        principal = (await self._requester()).principal
        conversation = await self._engine.sessions.open(
            kind="chat",
            principal=principal,
            wallet=message.user_wallet,
            model_id=message.model,
            max_length=message.max_length,
            system_prompt=message.system_prompt,
            sampling=_overrides(message.sampling) if message.sampling else None,
            budget_far=_amount(message.max_cost_far),
        )
        self.conversation = conversation
        settings = self._engine.settings
        prices = settings.prices_for(conversation.model_id)
        self.outbox = Outbox(settings.resume_outbox_frames, self._send)
        token: str | None = None
        if self._resumable is not None and self._resumable.enabled:
            token, token_hash = new_resume_token()
            self._resumable.add(conversation.session_id, token_hash, self)
            if self._handoff is not None:
                self._handoff.hold(conversation.session_id, token_hash)
        await self._emit(
            p.Opened(
                session_id=conversation.session_id,
                model=conversation.model_id,
                max_length=conversation.mesh.max_length,
                price_per_token_far=far_text(prices.per_token),
                price_per_prompt_token_far=far_text(prices.per_prompt_token),
                protocol_version=p.PROTOCOL_VERSION,
                resume_token=token,
            )
        )
        await self._save()

    async def _save(
        self, running: str | None = None, frames: Sequence[p.ServerMessage] = ()
    ) -> None:
        """Where the session stands (``frames``: its newest, not yet delivered), for another
        gateway to take over (§2.3)."""
        if self._handoff is not None and self.conversation is not None and self.outbox:
            await self._handoff.save(self.conversation, self.outbox.last_seq, running, frames)

    # §2.2
    async def _resume(self, message: p.Resume) -> None:
        self._check_open()
        if self.conversation is not None:
            raise AlreadyOpen("this connection already has a chat session")
        if self._resumable is None or not self._resumable.enabled:
            raise SessionExpired("sessions are not kept for a resume on this server")
        principal = (await self._requester()).principal
        found = await reattach(
            self,
            message,
            principal,
            engine=self._engine,
            client_key=self._client_key,
            send=self._send,
            resumable=self._resumable,
            handoff=self._handoff,
        )
        self.client, self.conversation, self.outbox = found.client, found.conversation, found.outbox
        await self._send(found.resumed)
        await found.outbox.attach(self._send, message.last_seq)
        for frame in found.lost:
            await self._emit(frame)
        if found.resumed.moved:
            await self._save()

    # §3.2
    async def _turn(self, message: p.Turn | p.Regenerate) -> None:
        conversation = self._conversation()
        regenerate = isinstance(message, p.Regenerate)
        spec = RequestSpec(
            request_id=message.request_id,
            kind="regenerate" if regenerate else "turn",
            text=message.text if isinstance(message, p.Turn) else "",
            sampling=_overrides(message).over(conversation.sampling),
            conversation=conversation,
            max_cost_far=_amount(message.max_cost_far),
            regenerate=regenerate,
        )
        await self._launch(spec)

    # §3.9
    async def _rewind(self, message: p.Rewind) -> None:
        conversation = self._conversation()
        method = await rewind_idle(await self._requester(), conversation, message.turns)
        position = conversation.mesh.position
        await self._emit(p.Rewound(turns=message.turns, position=position, method=method))
        await self._save()

    def _conversation(self) -> Conversation:
        self._check_open()
        if self.conversation is None:
            raise NoSession("send an 'open' message first")
        return self.conversation

    # §3.3
    async def _generate(self, message: p.Generate) -> None:
        self._check_open()
        spec = RequestSpec(
            request_id=message.request_id,
            kind="generate",
            text=message.prompt,
            sampling=SamplingOverrides(
                temperature=message.temperature,
                top_p=message.top_p,
                max_new_tokens=message.max_tokens,
            ),
            max_cost_far=_amount(message.max_cost_far),
            model_id=message.model_id,
            wallet=message.user_wallet,
        )
        await self._launch(spec)

    async def _launch(self, spec: RequestSpec) -> None:
        active = await self._engine.runner.admit(await self._requester(), spec)
        if self.outbox is not None:
            self.outbox.request_started()
        await self._save(running=active.request_id)
        self._engine.runner.launch(active, self)

    # §3.4
    def _cancel(self, request_id: str) -> None:
        running = self.client.running if self.client is not None else None
        if running is None or running.request_id != request_id:
            raise UnknownRequest(f"no running request {request_id!r}")
        running.cancel()

    def _check_open(self) -> None:
        if self.moved:
            raise SessionClosed("the session was resumed on another connection")
        if self.closed:
            raise SessionClosed("the session is closed")

    # The engine's sink (RequestSink): §4.2-§4.4
    async def token(self, active: ActiveRequest, event: TokenEvent) -> None:
        await self._emit(
            p.Token(
                request_id=active.request_id,
                token=event.text,
                tokens_generated=active.generated,
                cost_far=far_text(active.cost_far),
            )
        )

    async def finished(self, active: ActiveRequest, settlement: Settlement) -> None:
        if settlement.error is not None:
            self._engine.error_sent(settlement.error.code)
        frames = settled_frames(active, settlement)
        if self.outbox is None:
            for frame in frames:
                await self._send(frame)
            return
        # numbered and in the snapshot before the client sees them: a gateway that dies now
        # leaves a snapshot that has them (§2.3)
        framed = [self.outbox.number(frame) for frame in frames]
        await self._save(frames=framed)
        for frame in framed:
            await self.outbox.deliver(frame)


def _overrides(message: p.Sampling | p.Turn | p.Regenerate) -> SamplingOverrides:
    return SamplingOverrides(
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        repetition_penalty=message.repetition_penalty,
        seed=message.seed,
        max_new_tokens=message.max_new_tokens,
        stop=None if message.stop is None else tuple(message.stop),
    )


def _amount(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)
