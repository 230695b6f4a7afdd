"""The one exception tree of farmesh_ws. Each error carries its wire code and retryable flag.

::

    FarmeshError                      code="internal_error"
    ├── MeshError                     failures of the mesh (Petals/hivemind), mapped in mesh/
    │   ├── MeshUnavailable           code="mesh_unavailable", retryable: no route, dead peers
    │   ├── MeshTimeout               code="mesh_timeout", retryable: a step took too long
    │   ├── ContextOverflow           code="context_overflow": the session's max_length is reached
    │   ├── ModelNotFound             code="model_not_found": the mesh does not serve that model
    │   └── SessionClosed             code="session_closed": the mesh session was closed
    ├── InvalidRequest                code="invalid_request": arguments out of range
    └── BudgetExceeded                code="budget_exceeded": max_cost_far reached

Messages are written for the client: they never contain a traceback or an internal detail.
"""


class FarmeshError(Exception):
    """Base of every error farmesh_ws raises on purpose."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class MeshError(FarmeshError):
    """The mesh could not do what was asked."""

    code = "mesh_error"


class MeshUnavailable(MeshError):
    """No working route through the mesh right now; trying again later may succeed."""

    code = "mesh_unavailable"
    retryable = True


class MeshTimeout(MeshError):
    """The mesh did not answer in time."""

    code = "mesh_timeout"
    retryable = True


class ContextOverflow(MeshError):
    """The turn does not fit into the session's ``max_length`` tokens."""

    code = "context_overflow"


class ModelNotFound(MeshError):
    """The requested model is not known to this gateway."""

    code = "model_not_found"


class SessionClosed(MeshError):
    """The mesh session is closed and cannot run turns."""

    code = "session_closed"


class InvalidRequest(FarmeshError):
    """An argument is outside its documented range."""

    code = "invalid_request"


class BudgetExceeded(FarmeshError):
    """A request or session reached its ``max_cost_far``."""

    code = "budget_exceeded"
