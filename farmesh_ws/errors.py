"""The one exception tree of farmesh_ws: one class per wire error code (protocol.md §5).

Each class carries its ``code``, its ``retryable`` flag and the WebSocket ``close_code`` that
follows its ``error`` frame (``None``: the connection stays open)::

    FarmeshError                  internal_error      close 1011: a bug (details only in the log)
    ├── InvalidJson               invalid_json        the frame is not JSON
    ├── InvalidMessage            invalid_message     binary frame, unknown type, bad field
    ├── InvalidRequest            invalid_request     a value above a configured limit
    ├── RequestRefused            (a request that does not fit the session's state)
    │   ├── NoSession             no_session          ``turn`` before ``open``
    │   ├── AlreadyOpen           already_open        a second ``open``
    │   ├── Busy                  busy                a request is already running
    │   ├── DuplicateRequestId    duplicate_request_id
    │   ├── UnknownRequest        unknown_request     ``cancel`` of an id that is not running
    │   └── ShuttingDown          shutting_down       retryable: the server is stopping
    ├── Unauthorized              unauthorized        no, bad or expired credentials
    ├── AuthUnavailable           auth_unavailable    retryable: credentials cannot be checked now
    ├── WalletMismatch            wallet_mismatch     ``user_wallet`` is not the principal's wallet
    ├── QuotaExceeded             quota_exceeded      retryable: a cap of the principal or the mesh
    ├── InsufficientBalance       insufficient_balance  the prepaid balance cannot pay
    ├── RateLimited               rate_limited        retryable
    ├── BudgetExceeded            budget_exceeded     ``max_cost_far`` reached
    ├── IdleTimeout               idle_timeout        chat.petals.dev v2 only: no request in time
    └── MeshError                 mesh_error          retryable: another mesh failure
        ├── MeshUnavailable       mesh_unavailable    retryable: no route, dead peers
        ├── MeshTimeout           mesh_timeout        retryable: a step took too long
        ├── ContextOverflow       context_overflow    the session's ``max_length`` is reached
        ├── ModelNotFound         model_not_found     the mesh does not serve that model
        └── SessionClosed         session_closed      the session was closed

Messages are written for the client: they never contain a traceback or an internal detail.
Failures of Petals, hivemind or torch become these at one boundary,
:func:`farmesh_ws.mesh.petals.translate_error` (``raise ... from exc``).
"""

from typing import ClassVar


class FarmeshError(Exception):
    """Base of every error farmesh_ws raises on purpose; on its own, our bug."""

    code: ClassVar[str] = "internal_error"
    retryable: bool = False
    close_code: ClassVar[int | None] = 1011

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class _ClientError(FarmeshError):
    close_code: ClassVar[int | None] = None


class InvalidJson(_ClientError):
    """The frame is not valid JSON (or nests deeper than the decoder allows)."""

    code = "invalid_json"


class InvalidMessage(_ClientError):
    """A binary frame, an unknown ``type``, or a missing, unknown or mistyped field."""

    code = "invalid_message"


class InvalidRequest(_ClientError):
    """An argument is outside a configured limit."""

    code = "invalid_request"


class RequestRefused(_ClientError):
    """A request that does not fit the session's current state (protocol.md §2)."""


class NoSession(RequestRefused):
    code = "no_session"


class AlreadyOpen(RequestRefused):
    code = "already_open"


class ResumeDenied(RequestRefused):
    """A ``resume`` that cannot re-attach: wrong token, another principal, or frames after
    its ``last_seq`` no longer kept (protocol.md §2.2)."""

    code = "resume_denied"


class SessionExpired(RequestRefused):
    """A ``resume`` of a session that is gone: closed, past ``resume_grace_s``, or unknown."""

    code = "session_expired"


class Busy(RequestRefused):
    code = "busy"


class DuplicateRequestId(RequestRefused):
    code = "duplicate_request_id"


class UnknownRequest(RequestRefused):
    code = "unknown_request"


class ShuttingDown(RequestRefused):
    """The server is stopping: running requests finish, new ones are refused."""

    code = "shutting_down"
    retryable = True


class Unauthorized(_ClientError):
    """No credentials where they are required, or a key or token that is unknown, revoked,
    expired or malformed. The message never repeats the credential."""

    code = "unauthorized"


class AuthUnavailable(_ClientError):
    """The credential store (ledger database, state store) cannot answer right now."""

    code = "auth_unavailable"
    retryable = True


class WalletMismatch(_ClientError):
    """A message names a ``user_wallet`` the authenticated principal may not bill."""

    code = "wallet_mismatch"


class _RetryLater(_ClientError):
    """A refusal that ends by itself; ``retry_after_s`` says when (None: when something else
    ends, e.g. another request or session of the same principal)."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SessionElsewhere(_RetryLater):
    """A ``resume`` of a session another live gateway still holds (protocol.md §2.3): it
    moves here once that gateway lets it go (its connection there ended and it was asked to,
    it shut down, or its lease lapsed)."""

    code = "session_elsewhere"


class CoordinatorLost(_ClientError):
    """A request that was running on a gateway that died before it settled (protocol.md
    §2.3): its remaining frames are lost; the session goes on from before it."""

    code = "coordinator_lost"
    retryable = True


class QuotaExceeded(_RetryLater):
    """A cap of the principal (connections, requests, sessions, reserved context tokens, free
    tokens) or of the mesh (attention cache left) would be exceeded."""

    code = "quota_exceeded"


class InsufficientBalance(_ClientError):
    """The wallet's prepaid balance does not cover the prompt plus one token."""

    code = "insufficient_balance"


class RateLimited(_RetryLater):
    """Too many requests for one principal; ``retry_after_s`` says when to retry."""

    code = "rate_limited"


class BudgetExceeded(_ClientError):
    """A request or session reached its ``max_cost_far``."""

    code = "budget_exceeded"


class IdleTimeout(_ClientError):
    """No request arrived within ``idle_timeout_s`` (chat.petals.dev v2 path)."""

    code = "idle_timeout"


class MeshError(_ClientError):
    """The mesh could not do what was asked."""

    code = "mesh_error"
    retryable = True


class MeshUnavailable(MeshError):
    """No working route through the mesh right now; trying again later may succeed."""

    code = "mesh_unavailable"


class MeshTimeout(MeshError):
    """The mesh did not answer in time."""

    code = "mesh_timeout"


class ContextOverflow(MeshError):
    """The turn does not fit into the session's ``max_length`` tokens. Messages start with
    Petals' own wording, "Maximum length exceeded", which chat.petals.dev's page matches to
    offer a longer session."""

    code = "context_overflow"
    retryable = False

    @classmethod
    def session_full(cls, *, position: int, needed: int, max_length: int) -> "ContextOverflow":
        """``needed`` more tokens do not fit after ``position`` in ``max_length``."""
        return cls(
            f"Maximum length exceeded: prefix {position} + current {needed} tokens exceeds "
            f"this session's max_length {max_length} ({max_length - position} tokens left)"
        )


class ModelNotFound(MeshError):
    """The requested model is not known to this gateway."""

    code = "model_not_found"
    retryable = False


class SessionClosed(MeshError):
    """The session is closed and cannot run requests."""

    code = "session_closed"
    retryable = False


def error_classes() -> dict[str, type[FarmeshError]]:
    """Every wire code and its class (the table of protocol.md §5)."""
    found: dict[str, type[FarmeshError]] = {}
    pending: list[type[FarmeshError]] = [FarmeshError]
    while pending:
        cls = pending.pop()
        if "code" in cls.__dict__:
            found[cls.code] = cls
        pending.extend(cls.__subclasses__())
    return found
