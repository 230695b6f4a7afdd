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
from typing import IO, Any, TypeVar

from farmesh_ws.byzantine import ByzantineSpec
from farmesh_ws.mesh import compat

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SwarmError(RuntimeError):
    """The local swarm could not start or did not become ready in time."""


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    """How to lay out the local swarm. Spans are "start:end" block ranges (end exclusive)."""

    model_path: Path
    dht_prefix: str
    num_blocks: int
    log_dir: Path
    num_servers: int = 2
    spans: tuple[str, ...] = ()
    replicas: int = 1
    host: str = "127.0.0.1"
    dht_port: int = 0
    num_handlers: int = 2
    inference_max_length: int = 2048
    """Longest inference session a server accepts, in tokens."""
    attn_cache_tokens: int | None = None
    """Attention cache of each server, in tokens of one session over all its blocks (None:
    Petals' default, 4,096 for this model family); must hold every concurrent session's
    ``max_length``."""
    step_delay_ms: float = 0.0
    """Simulated network delay per hop: each inference step a server receives waits this
    many milliseconds (asyncio, other sessions' steps go on) before its compute; 0: none.
    See :mod:`farmesh_ws.mesh.hop_delay`."""
    session_timeout_s: float = 600.0
    step_timeout_s: float = 300.0
    """A server drops an inference session with no step for this long (Petals' default)."""
    update_period_s: float = 10.0
    expiration_s: float = 30.0
    throughput: float = 100.0
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 20.0
    log_level: str = "INFO"
    payout_wallets: tuple[tuple[str, str], ...] = ()
    """(server name, wallet) pairs; the name ``""`` gives every server without its own one."""
    byzantine: tuple[tuple[str, ByzantineSpec], ...] = ()
    """(server name, how it cheats): dishonest servers, for tests (:mod:`farmesh_ws.byzantine`)."""

    @property
    def identity_dir(self) -> Path:
        return self.log_dir / "identities"

    def payout_wallet(self, name: str) -> str | None:
        """The payout wallet of server ``name`` (e.g. ``server0``), or None."""
        wallets = dict(self.payout_wallets)
        return wallets.get(name, wallets.get(""))

    def server_spans(self) -> list[str]:
        """The span of every server to start: explicit spans, or an even split; × replicas."""
        spans = list(self.spans) or even_spans(self.num_blocks, self.num_servers)
        for span in spans:
            parse_span(span, self.num_blocks)
        return spans * self.replicas


def read_num_blocks(model_path: Path) -> int:
    """Number of transformer blocks of a Hugging Face model folder."""
    config = json.loads((model_path / "config.json").read_text())
    return int(config["num_hidden_layers"])


def parse_span(span: str, num_blocks: int) -> tuple[int, int]:
    """Parse and check "start:end"; raise ValueError with a readable message."""
    try:
        start_text, end_text = span.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"span {span!r} is not 'start:end'") from None
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"span {span!r} is outside blocks 0..{num_blocks}")
    return start, end


def even_spans(num_blocks: int, num_servers: int) -> list[str]:
    """Split blocks into contiguous spans as evenly as possible, earlier spans one longer."""
    if not 1 <= num_servers <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_servers} servers")
    base, extra = divmod(num_blocks, num_servers)
    spans, start = [], 0
    for index in range(num_servers):
        end = start + base + (1 if index < extra else 0)
        spans.append(f"{start}:{end}")
        start = end
    return spans


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
            self.wait_until_served()
        except BaseException:
            self.stop()
            raise

    def add_server(
        self, span: str, *, wait: bool = True, byzantine: ByzantineSpec | None = None
    ) -> SwarmNode:
        """Start one more server over ``span``; with ``wait``, until the DHT lists it online;
        with ``byzantine``, a dishonest one (tests only)."""
        parse_span(span, self.config.num_blocks)
        index = self._next_server_index
        self._next_server_index += 1
        return self._start_server(index, span, wait=wait, byzantine=byzantine)

    def restart_server(self, name: str) -> SwarmNode:
        """Stop server ``name`` gracefully and start it again over the same span, with the same
        identity file (so the same peer id) and payout wallet; wait until the DHT lists it."""
        node = self._server(name)
        self._stop_node(node)
        self.servers.remove(node)
        return self._start_server(int(name.removeprefix("server")), node.span, wait=True)

    def _start_server(
        self, index: int, span: str, *, wait: bool, byzantine: ByzantineSpec | None = None
    ) -> SwarmNode:
        name = f"server{index}"
        byzantine = byzantine or dict(self.config.byzantine).get(name)
        node = self._spawn(
            name,
            "server",
            {
                "host": self.config.host,
                "initial_peers": self.initial_peers,
                "dht_prefix": self.config.dht_prefix,
                "model_path": str(self.config.model_path),
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
        """Block until every block has an online server and ``required_peers`` are online."""
        from farmesh_ws.mesh.discovery import model_coverage

        deadline = time.monotonic() + (timeout_s or self.config.start_timeout_s)
        dht = self.client_dht()
        while True:
            coverage = self._in_dht_thread(
                model_coverage, dht, self.config.dht_prefix, self.config.num_blocks
            )
            if coverage.fully_served and set(required_peers) <= coverage.online_peer_ids():
                return
            for node in self.servers:
                if not node.alive and node.peer_id in required_peers:
                    raise SwarmError(f"{node.name} exited; see {node.log_path}")
            if time.monotonic() > deadline:
                raise SwarmError(
                    f"blocks {list(coverage.missing_blocks)} still unserved after the timeout; "
                    f"logs in {self.config.log_dir}"
                )
            time.sleep(0.25)

    def wait_until_forgotten(self, *, timeout_s: float | None = None) -> None:
        """Block until no crashed server of this swarm is still announced online: a SIGKILLed
        server's DHT record lives until it expires (``expiration_s``), and until then clients
        may route through it. Raises ``SwarmError`` after ``timeout_s`` (default: the
        expiration plus ``start_timeout_s``)."""
        from farmesh_ws.mesh.discovery import model_coverage

        dead = {node.peer_id for node in self.servers if not node.alive}
        limit = timeout_s or self.config.expiration_s + self.config.start_timeout_s
        deadline = time.monotonic() + limit
        dht = self.client_dht() if dead else None
        while dead:
            coverage = self._in_dht_thread(
                model_coverage, dht, self.config.dht_prefix, self.config.num_blocks
            )
            dead &= coverage.online_peer_ids()
            if not dead:
                return
            if time.monotonic() > deadline:
                raise SwarmError(f"crashed servers {sorted(dead)} still announced after {limit} s")
            time.sleep(0.25)

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


def _kill_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the node's whole process group (its pid is the group id)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
