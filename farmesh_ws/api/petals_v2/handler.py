"""One chat.petals.dev v2 connection: open the session, then serve ``generate`` requests.

The step loop (websocket_api.py L50-88: steps until the stop sequence, UTF-8 held back) is
this API's own semantics; admission, the mesh session, budget and settlement are the
engine's. Line numbers cite the original's ``websocket_api.py`` (see the package docstring).
"""

import asyncio
import contextlib
import json
import logging
from dataclasses import replace
from typing import Any, Final

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from farmesh_ws.api.petals_v2.parse import (
    ONE_TOKEN_STOP_MESSAGE,
    GenerateRequest,
    decode_request,
    parse_auth,
    parse_generate,
    parse_open,
)
from farmesh_ws.auth.connection import ConnectionIdentity
from farmesh_ws.core.types import FinishReason
from farmesh_ws.engine.conversation import Client, Conversation
from farmesh_ws.engine.engine import Engine
from farmesh_ws.engine.request import ActiveRequest, require_step
from farmesh_ws.engine.runner import RequestSpec
from farmesh_ws.errors import (
    FarmeshError,
    IdleTimeout,
    InvalidRequest,
    MeshError,
    QuotaExceeded,
    ShuttingDown,
    Unauthorized,
)

logger = logging.getLogger(__name__)

TURN_KIND: Final = "petals_v2"
_INCOMPLETE: Final = "\ufffd"
_INCOMPLETE_LOOKBACK_CHARS: Final = 10  # websocket_api.py L78: outputs[-10:]


class PetalsV2Connection:
    """Serves one WebSocket connection on ``/api/v2/generate`` until it closes."""

    def __init__(
        self,
        connection: ServerConnection,
        engine: Engine,
        *,
        client_key: str,
        identity: ConnectionIdentity,
    ) -> None:
        self._connection = connection
        self._engine = engine
        self._client_key = client_key
        self.identity = identity
        self.client: Client | None = None
        self.conversation: Conversation | None = None
        self._session_tokens = 0  # tokens of the session, the pending generated one included
        self._replace_pending: int | None = None
        self._requests = 0
        self._closing = False

    async def run(self) -> None:
        watcher = asyncio.ensure_future(self._connection.wait_closed())
        watcher.add_done_callback(self._on_connection_closed)
        try:
            conversation = await self._open()
            while True:
                request = await self._receive("generate")
                await self._generate(conversation, request)
        except ConnectionClosed:
            pass
        except FarmeshError as exc:
            if exc.close_code is not None:
                logger.error("v2 request failed", exc_info=True)
            await self._fail(exc)
        except Exception:
            logger.exception("v2 connection handler failed")
            await self._fail(FarmeshError("internal error"))
        finally:
            watcher.cancel()
            if self.conversation is not None:
                await self._engine.sessions.close(self.conversation)
            self.identity.close()

    def _on_connection_closed(self, _: "asyncio.Future[None]") -> None:
        """Stop a running step as soon as the client is gone (after the current token)."""
        self._closing = True
        if self.client is not None and self.client.running is not None:
            self.client.running.cancel()

    async def _receive(self, *expected_types: str) -> dict[str, Any]:
        """The next request; the first one within ``auth_timeout_s`` while credentials are
        owed (protocol.md §2.1), else within ``idle_timeout_s``."""
        settings = self._engine.settings
        owed = self.identity.principal is None
        wait_s = settings.auth_timeout_s if owed else settings.idle_timeout_s
        try:
            frame = await asyncio.wait_for(self._connection.recv(), wait_s)
        except TimeoutError:
            if owed:
                raise Unauthorized(f"not authenticated within {wait_s:g} s") from None
            raise IdleTimeout(f"no request for {wait_s:g} s; closing the session") from None
        return decode_request(frame, *expected_types)

    async def _authenticate(self, request: dict[str, Any]) -> None:
        """protocol.md §2.1: an optional first ``auth`` message, answered in this API's style."""
        auth = parse_auth(request)
        credential = await self.identity.authenticate(
            token=auth.token, message=auth.message, signature=auth.signature
        )
        principal = credential.principal
        answer: dict[str, Any] = {
            "ok": True,
            "principal": principal.principal_id,
            "wallet": principal.wallet,
        }
        if credential.issued:
            answer.update(token=credential.token, expires_at=credential.expires_at)
        await self._send(answer)

    async def _send(self, payload: dict[str, Any]) -> None:
        await self._connection.send(json.dumps(payload))

    async def _fail(self, error: FarmeshError) -> None:
        """websocket_api.py L91-93: the error frame, then the handler ends (socket closed)."""
        self._engine.error_sent(error.code)
        close_code = error.close_code or CloseCode.NORMAL_CLOSURE
        if isinstance(error, ShuttingDown):
            close_code = CloseCode.GOING_AWAY
        elif isinstance(error, Unauthorized):
            close_code = CloseCode.POLICY_VIOLATION
        with contextlib.suppress(ConnectionClosed):
            await self._send({"ok": False, "traceback": f"{error.code}: {error.message}"})
            reason = "idle timeout" if isinstance(error, IdleTimeout) else error.code
            await self._connection.close(close_code, reason)

    async def _open(self) -> Conversation:
        request = await self._receive("auth", "open_inference_session")
        if request["type"] == "auth":
            await self._authenticate(request)
            request = await self._receive("open_inference_session")
        opened = parse_open(request)
        self.client = client = Client(self._client_key, await self.identity.current())
        self.conversation = await self._engine.sessions.open(
            kind=TURN_KIND,
            principal=client.principal,
            wallet=opened.user_wallet,
            model_id=opened.model,
            max_length=opened.max_length,
            budget_far=opened.max_cost_far,
        )
        await self._send({"ok": True})
        return self.conversation

    async def _generate(self, conversation: Conversation, request: dict[str, Any]) -> None:
        generate = parse_generate(request)
        mesh = conversation.mesh
        input_ids = mesh.encode(generate.inputs) if generate.inputs else []
        if not input_ids and self._session_tokens == 0:
            raise InvalidRequest("the first generate request of a session needs inputs")
        stop_token: int | None = None
        if generate.extra_stop_sequences is not None:
            stop_ids = mesh.encode(generate.stop_sequence or "")
            if len(stop_ids) != 1:
                raise InvalidRequest(ONE_TOKEN_STOP_MESSAGE)
            stop_token = stop_ids[0]
        self._requests += 1
        sampling = replace(
            generate.sampling,
            max_new_tokens=self._step_size(generate, len(input_ids), mesh.model_id),
        )
        spec = RequestSpec(
            request_id=f"v2-{self._requests}",
            kind=TURN_KIND,
            text=generate.inputs or "",
            sampling=sampling,
            conversation=conversation,
            token_ids=tuple(input_ids),
            max_cost_far=generate.max_cost_far,
            # steps run until the stop sequence: at most what the session has room for
            total_new_tokens=max(
                1, mesh.max_length - mesh.position - mesh.pending_tokens - len(input_ids)
            ),
        )
        client = self.client
        if client is None:
            raise FarmeshError("generate before the session was opened")
        await self.identity.current()
        active = await self._engine.runner.admit(client, spec)
        if self._closing:
            active.cancel()
        error: FarmeshError | None = None
        try:
            await self._stream(active, generate, stop_token)
        except FarmeshError as exc:
            error = exc
            raise
        except ConnectionClosed:  # the client left: the request ends as cancelled
            active.cancel()
            raise
        except Exception:
            error = FarmeshError("internal error")
            raise
        finally:
            settlement = active.finish(error)
            active.release()
        if settlement.error is not None:
            raise settlement.error  # a budget stop or a mesh failure: websocket_api.py L89-93

    async def _send_outputs(
        self, active: ActiveRequest, outputs: str, stop: bool, tokens: list[int]
    ) -> None:
        """websocket_api.py L85-88: one response for ``tokens``."""
        await self._send({"ok": True, "outputs": outputs, "stop": stop, "token_count": len(tokens)})
        active.delivered(len(tokens))

    def _step_size(self, generate: GenerateRequest, new_tokens: int, model_id: str) -> int:
        """Tokens one step may generate: ``max_new_tokens``, or what ``max_length`` leaves
        of the whole session (at least one, as in transformers)."""
        if generate.max_new_tokens is not None:
            return generate.max_new_tokens
        max_length = generate.max_length or 0
        size = max(1, max_length - (self._session_tokens + new_tokens))
        limit = self._engine.settings.max_new_tokens_limit_for(model_id)
        if size > limit:
            raise InvalidRequest(
                f"max_length {max_length} leaves {size} tokens to generate; "
                f"the limit is {limit} per request"
            )
        return size

    async def _stream(
        self, active: ActiveRequest, generate: GenerateRequest, stop_token: int | None
    ) -> FinishReason:
        """websocket_api.py L50-88: steps until the stop sequence, UTF-8 held back."""
        mesh = active.mesh
        all_outputs = ""
        held: list[int] = []  # tokens of steps not sent yet: their text ends mid-character
        inputs, sampling = active.token_ids, active.sampling
        replace_pending, self._replace_pending = self._replace_pending, None
        while True:
            delta = [
                event.token_id
                async for event in active.step(inputs, sampling, replace_last_token=replace_pending)
            ]
            done = require_step(active)
            self._session_tokens += done.prompt_tokens + done.completion_tokens
            if done.error is not None:
                return done.finish_reason
            if active.stopped:
                if (held or delta) and not self._closing:  # a budget stop: send what is billed
                    await self._send_outputs(active, mesh.decode(held + delta), False, held + delta)
                return done.finish_reason
            if not delta:
                raise MeshError("the mesh generated no token")
            inputs, replace_pending = [], None
            outputs = mesh.decode(held + delta)
            combined = all_outputs + outputs
            stop = generate.stop_sequence is None or combined.endswith(generate.stop_sequence)
            for sequence in generate.extra_stop_sequences or ():
                if combined.endswith(sequence):
                    stop = True
                    self._replace_pending = stop_token
            if not stop and _INCOMPLETE in outputs[-_INCOMPLETE_LOOKBACK_CHARS:]:
                held += delta
            else:
                all_outputs = combined
                await self._send_outputs(active, outputs, stop, held + delta)
                held = []
                if stop:
                    return done.finish_reason
            step = self._step_size(generate, 0, active.mesh.model_id)
            if active.free_tokens_left is not None:  # the anonymous free quota binds
                left = active.free_tokens_left - active.generated
                if left <= 0:
                    raise QuotaExceeded("the free token quota of anonymous use is spent")
                step = min(step, left)
            sampling = replace(sampling, max_new_tokens=step)
