"""translate_error on constructed Petals/hivemind exceptions (no swarm needed)."""

import concurrent.futures

import pytest

from farmesh_ws.errors import (
    ContextOverflow,
    FarmeshError,
    MeshError,
    MeshTimeout,
    MeshUnavailable,
    SessionClosed,
)
from farmesh_ws.mesh import compat
from farmesh_ws.mesh.petals import translate_error

PEER = "12D3KooWCpWi6PmNrLMXCXWL3rQxsCUeawURceVWpKf16UHY4oRZ"


@pytest.fixture(autouse=True, scope="module")
def _petals_importable() -> None:
    compat.apply()


def _as_the_client_sees_it(server_exc: Exception) -> Exception:
    """A server handler's exception as hivemind raises it in the client: its text only."""
    from hivemind.p2p import P2PHandlerError

    return P2PHandlerError(f"Failed to call handler `rpc_inference` at {PEER}: {server_exc}")


def _allocation_failures() -> list[Exception]:
    """What Petals' server MemoryCache raises when a session does not fit in its cache."""
    from petals.server.memory_cache import AllocationFailed, MemoryCache

    failures: list[Exception] = []
    full = MemoryCache(max_size_bytes=100)
    full.current_size_bytes = 100
    too_small = MemoryCache(max_size_bytes=10)
    for cache, size in ((full, 50), (too_small, 50)):
        with pytest.raises(AllocationFailed) as raised:
            cache._wait_until_available(size, timeout=0)
        failures.append(raised.value)
    return failures


def test_a_full_attention_cache_is_mesh_unavailable_with_the_phrase_the_page_matches() -> None:
    failures = _allocation_failures()
    assert "attention cache is full" in str(failures[0])
    assert "Could not allocate" in str(failures[1])
    for server_exc in failures:
        exc = _as_the_client_sees_it(server_exc)
        error = translate_error(exc)
        assert type(error) is MeshUnavailable
        assert error.retryable
        assert "attention cache is full" in error.message
        assert error.__cause__ is exc
        assert PEER not in error.message


def _other_failures() -> list[tuple[BaseException, type[MeshError]]]:
    from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
    from petals.client.routing.sequence_manager import MissingBlocksError

    return [
        (MissingBlocksError([15, 16]), MeshUnavailable),
        (ControlFailure("connect failed"), MeshUnavailable),
        (ConnectionResetError("Connection lost"), MeshUnavailable),
        (_as_the_client_sees_it(RuntimeError("boom")), MeshUnavailable),
        (concurrent.futures.TimeoutError(), MeshTimeout),
        (ValueError("Maximum length exceeded: prefix 10 + current 5 exceeds 12"), ContextOverflow),
        (RuntimeError("shape mismatch"), MeshError),
    ]


def test_every_translated_error_keeps_the_original_as_its_cause() -> None:
    for exc, expected in _other_failures():
        error = translate_error(exc)
        assert type(error) is expected, exc
        assert error.__cause__ is exc
        assert error.__suppress_context__


def test_our_own_errors_pass_through_unchanged() -> None:
    closed = SessionClosed("the session is closed")
    assert translate_error(closed) is closed
    bug = FarmeshError("a bug")
    assert translate_error(bug) is bug
