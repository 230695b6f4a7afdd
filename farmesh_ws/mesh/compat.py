"""Import-time fixes that Petals 2.2.0.post1 needs on hivemind 1.1.12 and on a closed network.

Call :func:`apply` before the first ``import petals`` in every process that uses Petals
(the gateway, every swarm node, the tests). It is idempotent and thread-safe.

The fixes, each with a test in ``tests/mesh/test_compat.py``:

* ``hivemind_names``: hivemind 1.1.12 stopped re-exporting its submodules' names at the top
  level; Petals still does ``from hivemind import PeerID, get_logger, ...``.
* ``loopback_p2p``: ``P2P.create`` defaults to UPnP/NAT-PMP port mapping and AutoNAT, which
  send packets to the LAN; a local swarm must stay on 127.0.0.1.
* ``no_version_check``: every Petals server start asks PyPI for the latest release.
* ``safe_close``: closing a server session blocks on hivemind's event-loop thread; when the
  garbage collector finalises a session *on that thread* (a session left open by a failed
  close sits in a reference cycle), the thread waits on itself and every later Petals call
  hangs. Closing now never blocks on that thread and always marks the session closed.
* ``failover``: three bugs that stop a session from surviving a dead server (Petals issue
  #587), see :mod:`farmesh_ws.mesh.failover_fixes`.
"""

import functools
import importlib
import os
import threading
from typing import Any

_REEXPORTED_MODULES = (
    "hivemind.compression",
    "hivemind.dht",
    "hivemind.p2p",
    "hivemind.utils",
    "hivemind.utils.asyncio",
    "hivemind.utils.mpfuture",
    "hivemind.utils.nested",
    "hivemind.utils.tensor_descr",
    "hivemind.utils.timed_storage",
)

_lock = threading.Lock()
_applied = False


def apply() -> None:
    """Apply every fix once; later calls return at once."""
    global _applied
    with _lock:
        if _applied:
            return
        _quiet_offline_environment()
        restore_hivemind_names()
        force_loopback_p2p()
        disable_version_check()
        make_session_close_safe()
        from farmesh_ws.mesh import failover_fixes

        failover_fixes.apply()
        _applied = True


def _quiet_offline_environment() -> None:
    """No hub downloads, and Petals leaves the root logger alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PETALS_LOGGING", "False")


def restore_hivemind_names() -> list[str]:
    """Put the names hivemind's submodules export back onto the ``hivemind`` module.

    Only names that are missing are added, so a hivemind that still exports them is left
    alone. Returns the names added.
    """
    hivemind = importlib.import_module("hivemind")
    added = []
    for module_name in _REEXPORTED_MODULES:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [
            name for name in vars(module) if not name.startswith("_")
        ]
        for name in public:
            if not hasattr(hivemind, name) and hasattr(module, name):
                setattr(hivemind, name, getattr(module, name))
                added.append(name)
    return added


def force_loopback_p2p() -> None:
    """Make ``P2P.create`` default to no NAT port mapping and no AutoNAT."""
    from hivemind.p2p import P2P

    original = P2P.__dict__["create"].__func__
    if getattr(original, "_farmesh_loopback", False):
        return

    @functools.wraps(original)
    async def create(cls: type, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("nat_port_map", False)
        kwargs.setdefault("auto_nat", False)
        return await original(cls, *args, **kwargs)

    create._farmesh_loopback = True  # type: ignore[attr-defined]
    P2P.create = classmethod(create)


def disable_version_check() -> None:
    """Replace Petals' PyPI version check with a no-op wherever it is bound."""
    version: Any = importlib.import_module("petals.utils.version")
    version.validate_version = _skip_version_check
    run_server: Any = importlib.import_module("petals.cli.run_server")
    run_server.validate_version = _skip_version_check


def _skip_version_check() -> None:
    """The gateway pins its Petals release; asking PyPI at every start only leaks traffic."""


def make_session_close_safe() -> None:
    """Wrap ``_ServerInferenceSession.close``: mark closed even if closing fails, and skip the
    blocking close when called on hivemind's event-loop thread (garbage collection)."""
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals.client.inference_session import _ServerInferenceSession

    original = _ServerInferenceSession.close
    if getattr(original, "_farmesh_safe_close", False):
        return

    @functools.wraps(original)
    def close(self: Any) -> None:
        if self._outputs_stream is None:
            return
        try:
            if threading.current_thread() is not RemoteExpertWorker._event_thread:
                original(self)
        finally:
            self._outputs_stream = self._inputs_queue = None
            self.closed = True

    close._farmesh_safe_close = True  # type: ignore[attr-defined]
    _ServerInferenceSession.close = close
