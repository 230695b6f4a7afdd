"""The live conversations of this process, by session id, for every surface.

:class:`SessionManager` opens conversations (checking the model and the limits, opening the
mesh session under ``open_timeout_s``), registers them in the shared
:class:`~farmesh_ws.state.registry.SessionRegistry` (``active_sessions`` across processes) and
closes them. It owns conversations, not sockets: a surface holds a reference while it drives one.
"""

import logging
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal

from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.core.types import SamplingOverrides
from farmesh_ws.engine.conversation import Conversation
from farmesh_ws.engine.limits import (
    check_max_length,
    check_max_new_tokens,
    check_model,
    check_text,
    default_max_length,
    open_mesh_session,
)
from farmesh_ws.engine.quotas import Quotas
from farmesh_ws.engine.snapshot import SessionSnapshot, history_of
from farmesh_ws.errors import InvalidRequest, ShuttingDown
from farmesh_ws.mesh.base import MeshBackend
from farmesh_ws.state.registry import SessionRegistry

logger = logging.getLogger(__name__)


async def _nothing_waits(quota_key: str) -> bool:
    return False


class SessionManager:
    """Opens, tracks and closes conversations."""

    def __init__(
        self,
        *,
        settings: Settings,
        backend: MeshBackend,
        registry: SessionRegistry,
        quotas: Quotas,
    ) -> None:
        self._settings = settings
        self._backend = backend
        self.registry = registry
        self._quotas = quotas
        self._live: dict[str, Conversation] = {}
        self.stopping = False
        self.yield_waiting: Callable[[str], Awaitable[bool]] = _nothing_waits
        """Close the oldest of a principal's sessions that wait for a resume (by quota key);
        False if it has none (protocol.md §2.2; set by the protocol v1 surface)."""

    @property
    def count(self) -> int:
        """Conversations open in this process."""
        return len(self._live)

    async def open(
        self,
        *,
        kind: str,
        principal: Principal,
        wallet: str | None = None,
        model_id: str | None = None,
        max_length: int | None = None,
        system_prompt: str | None = None,
        sampling: SamplingOverrides | None = None,
        budget_far: Decimal | None = None,
        session_id: str | None = None,
    ) -> Conversation:
        """Open a conversation for ``principal``, billing ``wallet`` (a claim: None bills the
        principal's own); ``session_id`` is new unless given (a moved session keeps its own).
        Raises ``WalletMismatch``, ``ModelNotFound``, ``InvalidRequest``,
        ``QuotaExceeded``, ``ShuttingDown`` or ``MeshTimeout`` (nothing is opened then)."""
        settings = self._settings
        if self.stopping:
            raise ShuttingDown("the server is shutting down; retry on another server")
        billed = principal.billed_wallet(wallet)
        model_id = model_id or settings.default_model_id
        max_length = max_length or default_max_length(settings, model_id)
        if system_prompt is not None:
            check_text(settings, system_prompt, "system_prompt")
        sampling = sampling or SamplingOverrides()
        check_max_new_tokens(settings, sampling.max_new_tokens, model_id)
        check_model(self._backend, model_id)
        check_max_length(settings, max_length, model_id)
        # a session that waits for a resume gives way to its principal's new one (§2.2)
        while self._quotas.sessions_full(principal):
            if not await self.yield_waiting(principal.quota_key):
                break
        reservation = self._quotas.reserve(principal, model_id, max_length, session=True)
        try:
            mesh = await open_mesh_session(self._backend, model_id, max_length, settings)
        except BaseException:
            self._quotas.release(reservation, session=True)
            raise
        if self.stopping:  # shutdown began while the mesh session was opening
            self._quotas.release(reservation, session=True)
            await mesh.aclose()
            raise ShuttingDown("the server is shutting down; retry on another server")
        conversation = Conversation(
            session_id=session_id or uuid.uuid4().hex,
            kind=kind,
            wallet=billed,
            principal=principal,
            model_id=model_id,
            mesh=mesh,
            reservation=reservation,
            system_prompt=system_prompt,
            sampling=sampling,
            budget_far=budget_far,
        )
        self._live[conversation.session_id] = conversation
        await self.registry.register(conversation.session_id, wallet=billed, model_id=model_id)
        return conversation

    async def restore(self, snapshot: SessionSnapshot, principal: Principal) -> Conversation:
        """Rebuild a conversation another gateway held (protocol.md §2.3): opened as it was
        (same id, settings, budget, spend and turns) on a new mesh session whose first step
        replays the transcript. Raises what :meth:`open` raises, and ``InvalidRequest`` when
        the transcript does not fit (nothing is opened then)."""
        conversation = await self.open(
            kind="chat",
            principal=principal,
            wallet=snapshot.wallet,
            model_id=snapshot.model_id,
            max_length=snapshot.max_length,
            system_prompt=snapshot.system_prompt,
            sampling=snapshot.sampling,
            budget_far=snapshot.budget_far,
            session_id=snapshot.session_id,
        )
        try:
            conversation.mesh.restore(snapshot.transcript, snapshot.pending)
        except ValueError as exc:
            await self.close(conversation)
            raise InvalidRequest(f"the session cannot be rebuilt here: {exc}") from exc
        conversation.spent_far = snapshot.spent_far
        conversation.history = history_of(snapshot)
        return conversation

    async def close(self, conversation: Conversation) -> None:
        """Close the mesh session and forget the conversation. Idempotent; the caller has
        already stopped its running request."""
        if conversation.closed:
            return
        conversation.closed = True
        self._live.pop(conversation.session_id, None)
        self._quotas.release(conversation.reservation, session=True)
        try:
            await conversation.mesh.aclose()
        finally:
            await self.registry.unregister(conversation.session_id)
