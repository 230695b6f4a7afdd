"""The one boundary where Petals, hivemind and torch exceptions become farmesh errors."""

import concurrent.futures

from farmesh_ws.errors import (
    ContextOverflow,
    FarmeshError,
    MeshError,
    MeshTimeout,
    MeshUnavailable,
)


def translate_error(exc: BaseException) -> FarmeshError:
    """Map a Petals/hivemind/torch exception to a typed farmesh error (the one boundary)."""
    if isinstance(exc, FarmeshError):
        return exc
    from petals.client.routing.sequence_manager import MissingBlocksError

    if isinstance(exc, MissingBlocksError):
        return MeshUnavailable("no server in the mesh currently serves part of this model")
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
        return MeshTimeout("the mesh did not answer in time")
    if isinstance(exc, ValueError) and "Maximum length exceeded" in str(exc):
        return ContextOverflow("the session's max_length is reached")
    if _is_p2p_failure(exc):
        return MeshUnavailable("a mesh server failed and no replacement answered")
    return MeshError("the mesh failed to run this step", retryable=True)


def _is_p2p_failure(exc: BaseException) -> bool:
    from hivemind.p2p import P2PDaemonError, P2PHandlerError
    from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

    return isinstance(exc, ControlFailure | P2PHandlerError | P2PDaemonError | ConnectionError)
