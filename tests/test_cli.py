"""The commands as a user runs them: `farmesh-ws serve` and `farmesh-ws swarm` in their own
processes, stopped by SIGTERM / Ctrl-C, leaving no process behind."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from websockets.sync.client import connect

from farmesh_ws.config import Settings
from farmesh_ws.gateway import check_exposure, with_address_hash_key
from farmesh_ws.models import BUNDLED_MODEL_ID
from tests.transport.support import NO_KEY


class Command:
    """A farmesh-ws command in its own process; its stdout lines arrive through a thread."""

    def __init__(self, args: list[str], tmp_path: Path, **env: str) -> None:
        with (tmp_path / "stderr.log").open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "farmesh_ws", *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, **env},
                start_new_session=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; exit code {self.process.poll()}")


def _descendants(process: subprocess.Popen[str]) -> list[psutil.Process]:
    return psutil.Process(process.pid).children(recursive=True)


def _stop_and_check_nothing_is_left(
    process: subprocess.Popen[str], signum: signal.Signals, timeout_s: float = 60
) -> None:
    children = _descendants(process)
    assert children, "the command started no child processes"
    process.send_signal(signum)
    assert process.wait(timeout=timeout_s) == 0
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert [p.pid for p in alive] == []
    assert len(gone) == len(children)


@pytest.fixture
def cleanup() -> Iterator[list[Command]]:
    commands: list[Command] = []
    yield commands
    for command in commands:
        process = command.process
        if process.poll() is None:
            for child in _descendants(process):
                child.kill()
            process.kill()
            process.wait()
        command._reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_swarm_command_prints_peers_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, bundled_model_path: Path, cleanup: list[Command]
) -> None:
    wallet = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    command = Command(
        ["swarm", "--log-dir", str(tmp_path / "logs"), "--payout-wallet", f"server1={wallet}"],
        tmp_path,
    )
    cleanup.append(command)
    command.wait_for_line(r"^swarm ready", 120)
    server0 = command.wait_for_line(r"^server0: ", 5)
    server1 = command.wait_for_line(r"^server1: ", 5)
    model = BUNDLED_MODEL_ID
    assert re.match(rf"^server0: Qm\w+ {model} blocks 0:15 payout unbound$", server0.strip())
    assert re.match(rf"^server1: Qm\w+ {model} blocks 15:30 payout {wallet}$", server1.strip())
    peers = command.wait_for_line(r"^initial peers: ", 5)
    assert re.match(r"^initial peers: /ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", peers.strip())
    logs = sorted(path.name for path in (tmp_path / "logs").iterdir())
    assert logs == ["dht.log", "identities", "server0.log", "server1.log"]
    identities = sorted(path.name for path in (tmp_path / "logs" / "identities").iterdir())
    assert identities == ["server0.key", "server1.key"]
    _stop_and_check_nothing_is_left(command.process, signal.SIGINT)


def test_swarm_refuses_a_payout_wallet_that_is_no_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "farmesh_ws", "swarm", "--payout-wallet", "server0=far1wallet"],
        env={**os.environ, "FARMESH_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "is not an Ethereum address" in result.stderr


def test_payout_publish_proves_a_servers_wallet_in_the_swarms_dht(
    tmp_path: Path, swarm: Any, cleanup: list[Command]
) -> None:
    """A provider's flow: a key file as Petals' --identity_path makes it, then `payout publish`
    next to the server; the gateway's fetch finds a statement that verifies."""
    from hivemind.p2p import P2P, PeerID

    from farmesh_ws.payout.dht import fetch_statements
    from farmesh_ws.payout.statement import PayoutStatement, verify_statement

    identity = tmp_path / "server.key"
    P2P.generate_identity(str(identity))
    peer_id = PeerID.from_identity(identity.read_bytes()).to_base58()
    wallet = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    peers = ",".join(swarm.initial_peers)
    args = ["payout", "publish", "--identity", str(identity), "--wallet", wallet.lower()]
    args += ["--initial-peers", peers, "--host-maddr", "/ip4/127.0.0.1/tcp/0"]
    command = Command(args, tmp_path)
    cleanup.append(command)
    line = command.wait_for_line(r"^publishing: ", 120)
    assert line.strip() == f"publishing: peer {peer_id} is paid to {wallet}"
    found = [
        statement
        for statement in map(PayoutStatement.from_json, fetch_statements(swarm.client_dht(), 10))
        if statement.peer_id == peer_id
    ]
    assert [statement.wallet for statement in found] == [wallet]
    verify_statement(found[0])
    _stop_and_check_nothing_is_left(command.process, signal.SIGTERM)


def test_payout_publish_refuses_a_bad_wallet_or_key(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_bytes(b"not a key")
    for wallet, identity in (("far1", "bad.key"), ("0x" + "ab" * 20, "bad.key")):
        args = ["payout", "publish", "--wallet", wallet, "--identity", str(tmp_path / identity)]
        args += ["--initial-peers", "/ip4/127.0.0.1/tcp/1"]
        result = subprocess.run(
            [sys.executable, "-m", "farmesh_ws", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_chat_connects_to_the_port_serve_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    from farmesh_ws.cli import _build_parser

    monkeypatch.setenv("FARMESH_PORT", "8231")
    assert _build_parser().parse_args(["chat"]).url == "ws://127.0.0.1:8231/ws"
    monkeypatch.delenv("FARMESH_PORT")
    assert _build_parser().parse_args(["chat"]).url == "ws://127.0.0.1:8100/ws"


def test_chat_takes_sampling_overrides() -> None:
    from farmesh_ws.cli import _build_parser

    args = _build_parser().parse_args(["chat", "--temperature", "0", "--top-p", "0.5"])
    assert (args.temperature, args.top_p) == (0.0, 0.5)
    defaults = _build_parser().parse_args(["chat"])
    assert (defaults.temperature, defaults.top_p) == (None, None)  # the model's recommendation


def test_serve_refuses_a_default_model_it_does_not_serve(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "farmesh_ws", "serve", "--port", "0"],
        env={**os.environ, "DEFAULT_MODEL_ID": "no-such-model"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "farmesh-ws: configuration error: DEFAULT_MODEL_ID 'no-such-model' is not served here "
        "(served: SmolLM2-135M-Instruct)"
    ]


@pytest.mark.parametrize(
    ("flags", "mode"),
    [(["--auth", "off"], "off"), (["--auth", "optional"], "optional")],
)
def test_serve_refuses_a_public_bind_without_required_auth(flags: list[str], mode: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "farmesh_ws", "serve", "--host", "0.0.0.0", "--port", "0", *flags],
        env={k: v for k, v in os.environ.items() if not k.startswith("FARMESH_")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"farmesh-ws: configuration error: refusing to serve 0.0.0.0 with auth {mode}"
    )
    assert "--insecure-no-auth" in line


@pytest.mark.parametrize(
    ("host", "overrides", "mode"),
    [
        ("0.0.0.0", {}, "required"),  # a public bind defaults to required
        ("127.0.0.1", {}, "optional"),  # the quick start
        ("::1", {"auth": "off"}, "off"),  # loopback may turn it off
        ("192.0.2.1", {"auth": "off", "insecure_no_auth": True}, "off"),  # told to
    ],
)
def test_binds_that_may_start(host: str, overrides: dict[str, object], mode: str) -> None:
    settings = Settings(host=host).with_overrides(**overrides)
    check_exposure(settings)  # does not raise
    assert settings.auth_mode == mode


def test_serve_runs_the_embedded_default_and_stops_cleanly_on_sigterm(
    tmp_path: Path, bundled_model_path: Path, cleanup: list[Command]
) -> None:
    wallet = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    command = Command(
        ["serve", "--port", "0"],
        tmp_path,
        FARMESH_SHUTDOWN_GRACE_S="5",
        FARMESH_LOCAL_PAYOUT_WALLET=wallet.lower(),
    )
    cleanup.append(command)
    ready = command.wait_for_line(r"^farmesh-ws ready: ws://127\.0\.0\.1:\d+/ws", 180)
    url = ready.split()[2]
    command.wait_for_line(r"wscat -c ws://", 5)
    with connect(url) as ws:
        ws.send(json.dumps({"type": "open"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "opened"
        ws.send(json.dumps({"type": "turn", "request_id": "1", "text": "Hi!", "max_new_tokens": 4}))
        frames = []
        while not frames or frames[-1]["type"] != "contribution":
            frames.append(json.loads(ws.recv(timeout=60)))
    kinds = [frame["type"] for frame in frames]
    assert kinds[0] == "token"
    assert "done" in kinds
    payouts = {(node["payout_wallet"], node["payout_bound"]) for node in frames[-1]["nodes"]}
    assert payouts == {(wallet, True)}  # every local server proves FARMESH_LOCAL_PAYOUT_WALLET
    found = re.search(r"OpenAI API: (http://127\.0\.0\.1:(\d+)/v1)$", ready)
    assert found is not None, ready
    assert found.group(2) != url.split(":")[2].split("/")[0]  # its own port
    with openai.OpenAI(
        base_url=found.group(1), api_key="unused", max_retries=0, default_headers=NO_KEY
    ) as client:
        reply = client.chat.completions.create(
            model=BUNDLED_MODEL_ID,
            messages=[{"role": "user", "content": "Hi!"}],
            max_tokens=4,
            extra_headers=NO_KEY,
        )
    assert reply.usage is not None
    assert reply.usage.completion_tokens >= 1
    assert reply.model_extra is not None
    assert {node["payout_wallet"] for node in reply.model_extra["farmesh"]["nodes"]} == {wallet}
    _stop_and_check_nothing_is_left(command.process, signal.SIGTERM)


def test_the_address_hash_key_survives_a_restart(tmp_path: Path) -> None:
    """Anonymous quotas and rate limits are keyed by hashed addresses: a restart must hash an
    address as before, so the key is kept in FARMESH_HOME (owner-only) unless configured."""
    first = with_address_hash_key(Settings(), tmp_path)
    again = with_address_hash_key(Settings(), tmp_path)
    assert len(first.address_hash_key) == 64
    assert again.address_hash_key == first.address_hash_key
    assert (tmp_path / "address-hash.key").stat().st_mode & 0o777 == 0o600
    configured = with_address_hash_key(Settings(address_hash_key="set"), tmp_path)
    assert configured.address_hash_key == "set"
