"""The one boundary where Petals, hivemind and torch exceptions become farmesh errors."""

import concurrent.futures

from farmesh_ws.errors import (
    ContextOverflow,
    FarmeshError,
    MeshError,
    MeshTimeout,
    MeshUnavailable,
)

# What Petals 2.2.0.post1's server raises as ``AllocationFailed`` when its attention cache
# cannot hold a new session (petals/server/memory_cache.py). hivemind sends the server's
# ``str(exc)`` back, and the client raises it as the text of a ``P2PHandlerError``.
_ALLOCATION_FAILED = ("attention cache is full", "Could not allocate")


def translate_error(exc: BaseException) -> FarmeshError:
    """Map a Petals/hivemind/torch exception to a typed farmesh error (the one boundary).

    Returns ``exc`` itself if it already is a :class:`FarmeshError`, else a new
    :class:`MeshError` subclass whose ``__cause__`` is ``exc`` (as ``raise error from exc``
    would set it): :class:`MeshUnavailable` for a full attention cache on a server (its
    message says "attention cache is full"), missing blocks or a failed peer;
    :class:`MeshTimeout`; :class:`ContextOverflow` when the remote session is full;
    else a retryable :class:`MeshError`. Messages never include ``exc``'s text.
    """
    if isinstance(exc, FarmeshError):
        return exc
    error = _classify(exc)
    error.__cause__ = exc
    return error


def _classify(exc: BaseException) -> MeshError:
    from petals.client.routing.sequence_manager import MissingBlocksError

    if _is_allocation_failure(exc):
        return MeshUnavailable(
            "a server's attention cache is full; try again later or with a smaller max_length"
        )
    if isinstance(exc, MissingBlocksError):
        return MeshUnavailable("no server in the mesh currently serves part of this model")
    if isinstance(exc, TimeoutError | concurrent.futures.TimeoutError):
        return MeshTimeout("the mesh did not answer in time")
    if isinstance(exc, ValueError) and "Maximum length exceeded" in str(exc):
        return ContextOverflow("Maximum length exceeded: the session's max_length is reached")
    if _is_p2p_failure(exc):
        return MeshUnavailable("a mesh server failed and no replacement answered")
    return MeshError("the mesh failed to run this step", retryable=True)


def _is_allocation_failure(exc: BaseException) -> bool:
    from hivemind.p2p import P2PHandlerError

    text = str(exc)
    return isinstance(exc, P2PHandlerError) and any(part in text for part in _ALLOCATION_FAILED)


def _is_p2p_failure(exc: BaseException) -> bool:
    from hivemind.p2p import P2PDaemonError, P2PHandlerError
    from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure

    return isinstance(exc, ControlFailure | P2PHandlerError | P2PDaemonError | ConnectionError)
