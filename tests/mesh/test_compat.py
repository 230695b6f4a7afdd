"""Each compat fix, shown to be needed (the check fails on stock Petals/hivemind) and to work."""

import ast
import asyncio
import concurrent.futures
import importlib
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any
from weakref import WeakMethod

import psutil
import pytest

from farmesh_ws.mesh import compat


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def _names_petals_imports_from_hivemind() -> set[str]:
    spec = importlib.util.find_spec("petals")
    assert spec is not None
    assert spec.origin is not None
    names = set()
    for path in Path(spec.origin).parent.rglob("*.py"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Petals has invalid escape sequences
            tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "hivemind":
                names.update(alias.name for alias in node.names)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "hivemind"
            ):
                names.add(node.attr)
    return names


def test_stock_petals_does_not_import_on_this_hivemind() -> None:
    result = _run_python("import petals")
    assert result.returncode != 0
    assert "ImportError" in result.stderr


def test_petals_imports_after_apply() -> None:
    result = _run_python(
        "from farmesh_ws.mesh import compat\n"
        "compat.apply()\n"
        "import petals\n"
        "print(petals.__version__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.2.0.post1"


def test_every_name_petals_takes_from_hivemind_exists() -> None:
    compat.apply()
    import hivemind

    missing = sorted(
        name for name in _names_petals_imports_from_hivemind() if not hasattr(hivemind, name)
    )
    assert missing == []


async def _daemon_flags_and_listening_ips() -> tuple[str, list[str]]:
    from hivemind.p2p import P2P

    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        daemon = psutil.Process(p2p._child.pid)
        listening = [
            c.laddr.ip for c in daemon.net_connections(kind="inet") if c.status == "LISTEN"
        ]
        return " ".join(daemon.cmdline()), listening
    finally:
        await p2p.shutdown()


def test_p2p_daemon_runs_without_nat_port_mapping_or_autonat() -> None:
    compat.apply()
    # On its own loop in a thread: hivemind installs uvloop's event loop policy on import,
    # which cannot spawn p2pd from a plain asyncio loop made before (the tests' loop, if an
    # earlier test started it before hivemind was imported).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        args, listening = pool.submit(asyncio.run, _daemon_flags_and_listening_ips()).result()
    assert "-natPortMap=0" in args
    assert "-autonat=0" in args
    assert listening
    assert all(ip == "127.0.0.1" for ip in listening)


def test_server_start_makes_no_version_request() -> None:
    compat.apply()
    run_server = importlib.import_module("petals.cli.run_server")
    attempts: list[tuple[str, object]] = []
    recording = threading.Event()

    def audit(event: str, args: tuple[object, ...]) -> None:
        if recording.is_set() and event in {"socket.connect", "socket.getaddrinfo"}:
            attempts.append((event, args))

    sys.addaudithook(audit)
    recording.set()
    try:
        run_server.validate_version()
    finally:
        recording.clear()
    assert attempts == []


def _routing(dead: Any, alive: Any) -> tuple[Any, Any]:
    """A sequence manager (and its routing info) over 4 blocks, each served by ``dead``
    (preferred: more throughput) and ``alive``."""
    from hivemind.dht.node import Blacklist
    from petals.client.routing.sequence_info import RemoteSequenceInfo
    from petals.client.routing.sequence_manager import (
        RemoteSequenceManager,
        SequenceManagerState,
        _SequenceManagerUpdateThread,
    )
    from petals.data_structures import RemoteModuleInfo, ServerInfo, ServerState

    uids = [f"model.{index}" for index in range(4)]
    info = RemoteSequenceInfo.make_empty(uids)
    info.update_(
        [
            RemoteModuleInfo(
                uid,
                {
                    dead: ServerInfo(ServerState.ONLINE, 10.0, start_block=0, end_block=4),
                    alive: ServerInfo(ServerState.ONLINE, 1.0, start_block=0, end_block=4),
                },
            )
            for uid in uids
        ]
    )
    manager = RemoteSequenceManager.__new__(RemoteSequenceManager)
    manager.state = SequenceManagerState(sequence_info=info, banned_peers=Blacklist(15, 2.0))
    manager.lock_changes = threading.Lock()
    manager._thread = _SequenceManagerUpdateThread(60, WeakMethod(manager.on_request_success))
    return manager, info


def test_failed_peer_leaves_routing_at_once() -> None:
    """Fix 1: after a failure, routing must no longer offer the failed peer's span."""
    compat.apply()
    from hivemind.p2p import PeerID

    dead, alive = PeerID(b"\x00" * 34), PeerID(b"\x01" * 34)
    manager, info = _routing(dead, alive)

    manager.on_request_failure(dead)

    peers_per_block = [{span.peer_id for span in spans} for spans in info.spans_containing_block]
    assert peers_per_block == [{alive}] * 4
    assert [span.peer_id for span in info.spans_by_priority] == [alive]


def test_an_unreachable_replacement_is_banned_by_name() -> None:
    """Fix 4: opening a server session that cannot be reached names its peer, so the failure
    Petals reports without a peer (``on_request_failure(None)``) still bans it."""
    compat.apply()
    from hivemind.p2p import PeerID
    from petals.client.inference_session import _ServerInferenceSession

    dead, alive = PeerID(b"\x02" * 34), PeerID(b"\x03" * 34)
    manager, info = _routing(dead, alive)

    class UnreachableP2P:
        async def iterate_protobuf_handler(self, *args: Any) -> Any:
            raise ConnectionError("failed to dial: all dials failed")

    span = types.SimpleNamespace(peer_id=dead)
    config = types.SimpleNamespace(connect_timeout=5.0)
    opening = _ServerInferenceSession.create(config, UnreachableP2P(), span, "m.0", {})
    try:
        asyncio.run(opening)
    except ConnectionError:
        manager.on_request_failure(None)  # as InferenceSession.step reports it
    assert dead in manager.state.banned_peers
    assert [span.peer_id for span in info.spans_by_priority] == [alive]


def _bare_server_session(**state: object) -> Any:
    from petals.client.inference_session import _ServerInferenceSession

    session = _ServerInferenceSession.__new__(_ServerInferenceSession)
    session.stepped = False
    session.closed = False
    session._inputs_queue = object()
    session._outputs_stream = object()
    vars(session).update(state)
    return session


def test_a_failed_close_still_marks_the_session_closed() -> None:
    compat.apply()

    async def broken_pipe() -> None:
        raise BrokenPipeError

    session = _bare_server_session()
    session._aclose_stream = broken_pipe
    with pytest.raises(BrokenPipeError):
        session.close()
    assert session.closed
    assert session._outputs_stream is None


def test_close_on_the_event_loop_thread_does_not_deadlock() -> None:
    """What the garbage collector does when it finalises a session on hivemind's thread."""
    compat.apply()
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

    session = _bare_server_session()

    async def close_on_loop_thread() -> bool:
        session.close()
        return bool(session.closed)

    future = RemoteExpertWorker.run_coroutine(close_on_loop_thread(), return_future=True)
    assert future.result(timeout=10) is True
