"""A local Far Mesh on 127.0.0.1: one DHT bootstrap node plus N Petals servers.

This is the embedded default (no ``FAR_MESH_DHT_BOOTSTRAP``) and what the tests run against.
Each server runs with a persistent libp2p identity, ``LOG_DIR/identities/serverN.key``, so a
restarted swarm or server keeps its peer id; a server given a payout wallet publishes a
signed payout statement for it (:mod:`farmesh_ws.payout`).
Every node is a child process in its own process group (``python -m farmesh_ws.swarm_node``),
logging to its own file. Stopping sends SIGTERM (a graceful shutdown in the node) and, after a
grace period, SIGKILL to the whole group, so nothing is orphaned. ``kill_server`` SIGKILLs a
group at once to simulate a crashed GPU node.
"""

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from farmesh_ws.byzantine import ByzantineSpec
from farmesh_ws.mesh import compat
from farmesh_ws.swarm_layout import (
    SwarmConfig,
    SwarmModel,
    even_spans,
    parse_span,
    read_num_blocks,
)

__all__ = [
    "LocalSwarm",
    "SwarmConfig",
    "SwarmError",
    "SwarmModel",
    "SwarmNode",
    "even_spans",
    "parse_span",
    "read_num_blocks",
]

if TYPE_CHECKING:
    from farmesh_ws.mesh.discovery import ModelCoverage

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SwarmError(RuntimeError):
    """The local swarm could not start or did not become ready in time."""


@dataclass(slots=True)
class SwarmNode:
    """One child process of the swarm."""

    name: str
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path
    peer_id: str = ""
    span: str = ""
    maddrs: list[str] = field(default_factory=list)
    payout_wallet: str | None = None
    byzantine: bool = False
    model: SwarmModel | None = None
    """The model it serves, if not the swarm's main one."""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalSwarm:
    """Start, grow, break and stop a local swarm. Blocking API; use from a thread in async code."""

    def __init__(self, config: SwarmConfig) -> None:
        self.config = config
        self.dht_node: SwarmNode | None = None
        self.servers: list[SwarmNode] = []
        self._client_dht: Any = None
        self._next_server_index = 0

    @property
    def initial_peers(self) -> list[str]:
        if self.dht_node is None:
            raise SwarmError("the swarm is not started")
        return list(self.dht_node.maddrs)

    def __enter__(self) -> "LocalSwarm":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the DHT, then every server, and wait until every block is served."""
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.dht_node = self._spawn(
                "dht",
                "dht",
                {"host": self.config.host, "port": self.config.dht_port},
            )
            logger.info("DHT ready at %s", " ".join(self.initial_peers))
            for span in self.config.server_spans():
                self.add_server(span, wait=False)
            for model in self.config.more_models:
                for span in model.server_spans():
                    self.add_server(span, wait=False, model=model)
            self.wait_until_served()
        except BaseException:
            self.stop()
            raise

    def add_server(
        self,
        span: str,
        *,
        wait: bool = True,
        byzantine: ByzantineSpec | None = None,
        model: SwarmModel | None = None,
    ) -> SwarmNode:
        """Start one more server over ``span`` of ``model`` (None: the main model); with
        ``wait``, until the DHT lists it online; with ``byzantine``, a dishonest one (tests
        only)."""
        parse_span(span, (model or self.config.main_model).num_blocks)
        index = self._next_server_index
        self._next_server_index += 1
        return self._start_server(index, span, wait=wait, byzantine=byzantine, model=model)

    def restart_server(self, name: str) -> SwarmNode:
        """Stop server ``name`` gracefully and start it again over the same span, with the same
        identity file (so the same peer id) and payout wallet; wait until the DHT lists it."""
        node = self._server(name)
        self._stop_node(node)
        self.servers.remove(node)
        index = int(name.removeprefix("server"))
        return self._start_server(index, node.span, wait=True, model=node.model)

    def _start_server(
        self,
        index: int,
        span: str,
        *,
        wait: bool,
        byzantine: ByzantineSpec | None = None,
        model: SwarmModel | None = None,
    ) -> SwarmNode:
        name = f"server{index}"
        byzantine = byzantine or dict(self.config.byzantine).get(name)
        served = model or self.config.main_model
        node = self._spawn(
            name,
            "server",
            {
                "host": self.config.host,
                "initial_peers": self.initial_peers,
                "dht_prefix": served.dht_prefix,
                "model_path": str(served.model_path),
                "public_name": f"farmesh-local-{index}",
                "block_indices": span,
                "throughput": self.config.throughput,
                "num_handlers": self.config.num_handlers,
                "inference_max_length": self.config.inference_max_length,
                "attn_cache_tokens": self.config.attn_cache_tokens,
                "step_delay_ms": self.config.step_delay_ms,
                "session_timeout_s": self.config.session_timeout_s,
                "step_timeout_s": self.config.step_timeout_s,
                "update_period_s": self.config.update_period_s,
                "expiration_s": self.config.expiration_s,
                "identity_path": str(self.config.identity_dir / f"{name}.key"),
                "payout_wallet": self.config.payout_wallet(name),
                "byzantine": byzantine.as_options() if byzantine else None,
            },
        )
        node.span = span
        node.model = model
        node.byzantine = byzantine is not None
        self.servers.append(node)
        logger.info("%s (%s) serving blocks %s", name, node.peer_id, span)
        if wait:
            self.wait_until_served(required_peers=[node.peer_id])
        return node

    def stop_server(self, name: str) -> SwarmNode:
        """Stop server ``name`` gracefully (it leaves the DHT) and forget it."""
        node = self._server(name)
        self._stop_node(node)
        self.servers.remove(node)
        return node

    def kill_server(self, name: str) -> SwarmNode:
        """SIGKILL a server's whole process group, as a crash would; it stays announced
        in the DHT until its record expires (``expiration_s``)."""
        node = self._server(name)
        _kill_group(node.process, signal.SIGKILL)
        node.process.wait()
        logger.info("killed %s (%s)", name, node.peer_id)
        return node

    def wait_until_served(
        self, *, required_peers: Sequence[str] = (), timeout_s: float | None = None
    ) -> None:
        """Block until every block of every model has an online server and ``required_peers``
        are online."""
        deadline = time.monotonic() + (timeout_s or self.config.start_timeout_s)
        while True:
            coverages = self._coverages()
            missing = {c.dht_prefix: list(c.missing_blocks) for c in coverages if c.missing_blocks}
            offline = set(required_peers) - _online(coverages)
            if not missing and not offline:
                return
            for node in self.servers:
                if not node.alive and node.peer_id in required_peers:
                    raise SwarmError(f"{node.name} exited; see {node.log_path}")
            if time.monotonic() > deadline:
                raise SwarmError(
                    f"after the timeout, blocks unserved {missing}, servers offline "
                    f"{sorted(offline)}; logs in {self.config.log_dir}"
                )
            time.sleep(0.25)

    def wait_until_forgotten(self, *, timeout_s: float | None = None) -> None:
        """Block until no crashed server of this swarm is still announced online: a SIGKILLed
        server's DHT record lives until it expires (``expiration_s``), and until then clients
        may route through it. Raises ``SwarmError`` after ``timeout_s`` (default: the
        expiration plus ``start_timeout_s``)."""
        dead = {node.peer_id for node in self.servers if not node.alive}
        limit = timeout_s or self.config.expiration_s + self.config.start_timeout_s
        deadline = time.monotonic() + limit
        while dead:
            dead &= _online(self._coverages())
            if not dead:
                return
            if time.monotonic() > deadline:
                raise SwarmError(f"crashed servers {sorted(dead)} still announced after {limit} s")
            time.sleep(0.25)

    def _coverages(self) -> list["ModelCoverage"]:
        """Every model's coverage, straight from the DHT (blocking)."""
        from farmesh_ws.mesh.discovery import model_coverage

        dht = self.client_dht()
        models = {model.dht_prefix: model for model in self.config.models}
        models.update((n.model.dht_prefix, n.model) for n in self.servers if n.model is not None)
        return [
            self._in_dht_thread(model_coverage, dht, model.dht_prefix, model.num_blocks)
            for model in models.values()
        ]

    def client_dht(self) -> Any:
        """A client-mode DHT joined to this swarm (for coverage queries), created once."""
        if self._client_dht is None:
            compat.apply()
            from hivemind.dht import DHT

            self._client_dht = self._in_dht_thread(
                DHT,
                initial_peers=self.initial_peers,
                client_mode=True,
                start=True,
                host_maddrs=[f"/ip4/{self.config.host}/tcp/0"],
            )
        return self._client_dht

    def _in_dht_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking DHT call in a worker thread. hivemind's futures call
        ``asyncio.get_event_loop()``, which in the main thread creates an event loop that
        nobody closes; in a worker thread it creates none."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="farmesh-swarm-dht") as pool:
            return pool.submit(fn, *args, **kwargs).result()

    def stop(self) -> None:
        """Stop every server, then the DHT; nothing is left running."""
        if self._client_dht is not None:
            self._in_dht_thread(self._client_dht.shutdown)
            self._client_dht = None
        for node in reversed(self.servers):
            self._stop_node(node)
        if self.dht_node is not None:
            self._stop_node(self.dht_node)

    def _server(self, name: str) -> SwarmNode:
        for node in self.servers:
            if node.name == name:
                return node
        raise KeyError(f"no server named {name!r}")

    def _spawn(self, name: str, role: str, options: dict[str, Any]) -> SwarmNode:
        log_path = self.config.log_dir / f"{name}.log"
        options = {**options, "log_level": self.config.log_level}
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "farmesh_ws.swarm_node", role, json.dumps(options)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        node = SwarmNode(name=name, role=role, process=process, log_path=log_path)
        try:
            ready = self._read_ready_line(node)
        except BaseException:
            self._stop_node(node)
            raise
        node.peer_id = str(ready["peer_id"])
        node.payout_wallet = ready.get("payout_wallet")
        node.maddrs = [str(maddr) for maddr in ready.get("maddrs", [])]
        return node

    def _read_ready_line(self, node: SwarmNode) -> dict[str, Any]:
        stdout: IO[bytes] | None = node.process.stdout
        if stdout is None:
            raise SwarmError(f"{node.name} has no stdout pipe")
        ready, _, _ = select.select([stdout], [], [], self.config.start_timeout_s)
        line = stdout.readline() if ready else b""
        if not line:
            raise SwarmError(f"{node.name} did not start; see {node.log_path}")
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def _stop_node(self, node: SwarmNode) -> None:
        if node.alive:
            node.process.send_signal(signal.SIGTERM)
            try:
                node.process.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM; killing its process group", node.name)
        _kill_group(node.process, signal.SIGKILL)
        node.process.wait()
        if node.process.stdout is not None:
            node.process.stdout.close()


def _online(coverages: Sequence["ModelCoverage"]) -> set[str]:
    return {peer for coverage in coverages for peer in coverage.online_peer_ids()}


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the node's whole process group (its pid is the group id)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
