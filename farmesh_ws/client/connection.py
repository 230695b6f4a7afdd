"""The connection: :class:`FarmeshClient` (one WebSocket, one reader task that routes every
frame to the stream or the control request waiting for it) and :func:`connect`."""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from farmesh_ws import protocol as p
from farmesh_ws.client import signin, wire
from farmesh_ws.client.errors import ConnectionLost, FarmeshClientError, RequestTimeout
from farmesh_ws.client.events import ChatInfo, Identity
from farmesh_ws.client.resume import ResumePoint, reattach
from farmesh_ws.client.routing import FrameRouting
from farmesh_ws.client.stream import Chat, ReplyStream

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from farmesh_ws.client.connecting import Connecting

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S: Final = 60.0
"""Seconds any single wait on the server may take: the handshake, a reply, the next frame."""

RESUME_WITHIN_S: Final = 30.0
"""Seconds to keep trying to resume a chat after its connection dropped (protocol.md §2.2)."""

SIGN_IN_VALID_FOR_S: Final = 3600.0
"""How long a Sign-In with Ethereum message is valid by default (its ``Expiration Time``)."""

Sampling = p.Sampling
"""Default sampling of a chat session (``open_chat(sampling=...)``); a mapping works too."""


def _retrieve(future: "asyncio.Future[Any]") -> None:
    """Mark a future's exception as seen, so asyncio does not log it when nobody awaited."""
    if future.done() and not future.cancelled():
        future.exception()


class FarmeshClient(FrameRouting):
    """One WebSocket connection to a farmesh_ws gateway. Make it with :meth:`connect`."""

    def __init__(
        self,
        connection: ClientConnection,
        *,
        url: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        resume_within_s: float = RESUME_WITHIN_S,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._token = token
        self._resume_within_s = resume_within_s
        self._resume: ResumePoint | None = None
        self._attached = asyncio.Event()
        self._attached.set()
        self.chat: Chat | None = None
        """The chat session opened on this connection, if any."""
        self.identity: Identity | None = None
        """Who the gateway said this connection is, after :meth:`authenticate` or
        :meth:`sign_in_with_ethereum` (a credential given to :meth:`connect` is checked
        at the handshake, which answers nothing)."""
        self._ws = connection
        self._streams = {}
        self._used_request_ids: set[str] = set()
        self._pongs = {}
        self._control = None
        self._control_lock = asyncio.Lock()
        self._closing = False
        self._closed = asyncio.Event()
        self.close_error: ConnectionLost | None = None
        """Why the connection closed, once it has."""
        self._reader = asyncio.create_task(self._read_loop(), name="farmesh-client-reader")

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        resume_within_s: float = RESUME_WITHIN_S,
    ) -> "Connecting":
        """Connect to ``url`` (``ws://HOST:PORT/ws``): ``await`` the result for a client, or
        use it in ``async with``, which closes the client at the end. ``token`` (an API key
        ``fmk_…`` or a session token ``fms_…``) is sent as ``Authorization: Bearer`` in the
        handshake (protocol.md §2.1); a refused one raises :class:`Unauthorized`. If the
        connection drops while a chat is open, the client reconnects and resumes the chat
        for up to ``resume_within_s`` seconds (0: never; protocol.md §2.2)."""
        from farmesh_ws.client.connecting import Connecting

        return Connecting(url, timeout, token, resume_within_s)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_code(self) -> int | None:
        """The WebSocket close code once the connection is closed (protocol.md §6)."""
        return self._ws.close_code

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, by either side."""
        await self._closed.wait()

    async def authenticate(self, token: str) -> Identity:
        """Authenticate this connection with an API key or session token sent as the
        ``auth`` message (protocol.md §2.1). Raises :class:`Unauthorized` for a credential
        the gateway does not accept (the connection stays open for another try)."""
        identity = await self._authenticate(p.Auth(token=token))
        self._token = token  # a resume authenticates its new connection with it
        return identity

    async def sign_in_with_ethereum(
        self, account: "LocalAccount", *, valid_for_s: float = SIGN_IN_VALID_FOR_S
    ) -> Identity:
        """Sign in with an eth-account key (EIP-4361, protocol.md §2.1): a nonce from the
        gateway's ``GET /auth/nonce``, a message for ``account.address`` valid for
        ``valid_for_s`` seconds, signed as ``personal_sign`` does, sent as ``auth``. The
        returned identity's ``token`` (until ``expires_at``) authenticates later
        connections without signing again: ``connect(url, token=identity.token)``."""
        proof = await signin.signed_sign_in(
            self.url, account, timeout_s=self.timeout, valid_for_s=valid_for_s
        )
        return await self._authenticate(p.Auth(siwe=proof))

    async def _authenticate(self, message: p.Auth) -> Identity:
        answer = await self._control_request(message)
        if not isinstance(answer, p.Authenticated):
            kind = str(type(answer).__struct_config__.tag)
            raise FarmeshClientError("protocol_error", f"expected 'authenticated', got {kind!r}")
        self.identity = Identity(answer.principal, answer.wallet, answer.token, answer.expires_at)
        self._token = answer.token or self._token
        return self.identity

    async def open_chat(
        self,
        *,
        model: str | None = None,
        max_length: int | None = None,
        system_prompt: str | None = None,
        user_wallet: str | None = None,
        sampling: p.Sampling | Mapping[str, Any] | None = None,
        max_cost_far: Decimal | str | None = None,
    ) -> Chat:
        """Open this connection's chat session (protocol.md §3.1). Options left at None
        take the server's defaults."""
        message = p.Open(
            model=model,
            max_length=max_length,
            user_wallet=user_wallet,
            system_prompt=system_prompt,
            sampling=wire.sampling(sampling),
            max_cost_far=wire.amount(max_cost_far),
        )
        opened = await self._control_request(message)
        if not isinstance(opened, p.Opened):
            kind = str(type(opened).__struct_config__.tag)  # not the frame: it may hold a token
            raise FarmeshClientError("protocol_error", f"expected 'opened', got {kind!r}")
        try:
            info = ChatInfo(
                session_id=opened.session_id,
                model=opened.model,
                max_length=opened.max_length,
                price_per_token_far=Decimal(opened.price_per_token_far),
                price_per_prompt_token_far=Decimal(opened.price_per_prompt_token_far),
                protocol_version=opened.protocol_version,
            )
        except InvalidOperation:
            raise FarmeshClientError("protocol_error", f"malformed prices in {opened!r}") from None
        self.chat = Chat(self, info)
        if opened.resume_token is not None:
            self._resume = ResumePoint(opened.session_id, opened.resume_token, opened.seq or 0)
        return self.chat

    def generate(
        self,
        prompt: str,
        *,
        request_id: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        user_wallet: str | None = None,
        model: str | None = None,
        max_cost_far: Decimal | str | None = None,
    ) -> ReplyStream:
        """A one-shot request in a fresh mesh session (protocol.md §3.3); no chat needed and
        the chat session, if any, is untouched. ``max_new_tokens`` is the wire's
        ``max_tokens``, ``model`` its ``model_id``."""
        message = p.Generate(
            request_id=request_id or wire.new_request_id(),
            prompt=prompt,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            user_wallet=user_wallet,
            model_id=model,
            max_cost_far=wire.amount(max_cost_far),
        )
        return ReplyStream(self, message)

    async def ping(self) -> float:
        """A protocol ``ping`` (§3.6); returns the round trip in seconds."""
        data = uuid.uuid4().hex
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[data] = pong
        started = time.perf_counter()
        try:
            await self._send(p.Ping(data=data))
            await asyncio.wait_for(pong, self.timeout)
        except TimeoutError:
            raise RequestTimeout(f"no pong within {self.timeout:g} s") from None
        finally:
            self._pongs.pop(data, None)
            _retrieve(pong)
        return time.perf_counter() - started

    async def aclose(self) -> None:
        """Close the connection; the server then cancels a running request and closes the
        chat session (protocol.md §2). Idempotent."""
        if not self.closed:
            self._closing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ws.close(), self.timeout)
        await asyncio.wait({self._reader}, timeout=self.timeout)
        if not self._reader.done():
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Sending -----------------------------------------------------------------------------

    async def _send(self, message: p.ClientMessage) -> None:
        await self._send_text(wire.encode(message), request_id=getattr(message, "request_id", None))

    async def _send_text(self, frame: str, *, request_id: str | None = None) -> None:
        if not self._attached.is_set():  # a resume is under way: send on its connection
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._attached.wait(), self.timeout)
        if self.closed:
            raise self.lost_error()
        try:
            await asyncio.wait_for(self._ws.send(frame), self.timeout)
        except ConnectionClosed:
            raise self.lost_error() from None
        except TimeoutError:
            raise RequestTimeout(
                f"could not send within {self.timeout:g} s", request_id=request_id
            ) from None

    async def _control_request(self, message: p.Auth | p.Open | p.Close) -> p.ServerMessage:
        """Send a message answered without a request_id (``authenticated``, ``opened``,
        ``closed``, or an ``error`` without one) and return the answer; error frames are
        raised."""
        async with self._control_lock:
            reply: asyncio.Future[p.ServerMessage] = asyncio.get_running_loop().create_future()
            self._control = reply
            try:
                await self._send(message)
                answer = await asyncio.wait_for(reply, self.timeout)
            except TimeoutError:
                kind = str(type(message).__struct_config__.tag)
                raise RequestTimeout(f"no answer to {kind!r} within {self.timeout:g} s") from None
            finally:
                self._control = None
                _retrieve(reply)
        if isinstance(answer, p.Error):
            raise FarmeshClientError.from_frame(answer)
        return answer

    def lost_error(self) -> ConnectionLost:
        """A :class:`ConnectionLost` describing how the connection closed."""
        code, reason = self._ws.close_code, self._ws.close_reason or ""
        if self._closing:
            message = "the connection was closed by this client"
        elif code is None or code == 1006:
            message = "the connection to the server was lost"
        else:
            message = f"the server closed the connection ({code}{' ' + reason if reason else ''})"
        return ConnectionLost(message, close_code=code, close_reason=reason)

    def _forget(self, stream: ReplyStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    # Receiving (the one reader task) -----------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    frame = await self._ws.recv()
                except ConnectionClosed:
                    if not await self._reattach():
                        return
                    continue
                if isinstance(frame, str):
                    self._route(frame)
        except Exception:
            logger.exception("the reader of %s failed; closing the connection", self.url)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), self.timeout)
        finally:
            self._on_closed()

    async def _reattach(self) -> bool:
        """The connection dropped: resume the chat on a new one (False: not resumable)."""
        point = self._resume
        if self._closing or point is None or self._resume_within_s <= 0:
            return False
        self._attached.clear()
        try:
            self._ws = await reattach(
                self.url,
                point,
                token=self._token,
                timeout_s=self.timeout,
                within_s=self._resume_within_s,
            )
        except FarmeshClientError as exc:
            logger.warning("could not resume the chat: %s", exc)
            return False
        finally:
            self._attached.set()
        logger.info("resumed the chat after frame %d", point.last_seq)
        return True

    def _on_closed(self) -> None:
        """Whatever still waits on this connection learns that it is gone."""
        self.close_error = self.lost_error()
        self._closed.set()
        for stream in list(self._streams.values()):
            stream._feed(self.lost_error())
        self._streams.clear()
        for pong in self._pongs.values():
            if not pong.done():
                pong.set_exception(self.lost_error())
        if self._control is not None and not self._control.done():
            self._control.set_exception(self.lost_error())
