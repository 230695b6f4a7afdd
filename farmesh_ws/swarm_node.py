"""Entry point of one local swarm process: the DHT bootstrap node or one Petals server.

Started by :mod:`farmesh_ws.swarm` as ``python -m farmesh_ws.swarm_node ROLE JSON``. The process
applies the compat fixes before Petals is imported, writes exactly one JSON "ready" line to
stdout (the parent waits for it), logs to stderr (the parent points that at a log file), and
turns SIGTERM into a graceful shutdown so no DHT process, handler or p2pd is orphaned.
"""

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from farmesh_ws import byzantine
from farmesh_ws.byzantine import ByzantineSpec
from farmesh_ws.mesh import compat, hop_delay, hop_trace

logger = logging.getLogger(__name__)


def _announce(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _sigterm_as_keyboard_interrupt() -> None:
    """SIGTERM → KeyboardInterrupt in this process only; forked children keep the default."""
    main_pid = os.getpid()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def run_dht(options: dict[str, Any]) -> None:
    """Run the bootstrap DHT node until SIGTERM."""
    from hivemind.dht import DHT

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    port = int(options.get("port", 0))
    dht = DHT(host_maddrs=[f"/ip4/{options['host']}/tcp/{port}"], start=True)
    try:
        _announce(
            role="dht",
            peer_id=dht.peer_id.to_base58(),
            maddrs=[str(maddr) for maddr in dht.get_visible_maddrs()],
        )
        stop.wait()
    finally:
        dht.shutdown()


def run_server(options: dict[str, Any]) -> None:
    """Run one Petals server over a span of blocks until SIGTERM, with the persistent identity
    ``identity_path`` (hivemind creates it if missing); with ``payout_wallet``, publish its
    payout statement every ``update_period_s``; with ``step_delay_ms`` > 0, every inference
    step it receives waits that long first (:mod:`farmesh_ws.mesh.hop_delay`)."""
    from petals.server.server import Server

    from farmesh_ws.payout.dht import StatementPublisher
    from farmesh_ws.payout.identity import load_identity

    _sigterm_as_keyboard_interrupt()
    identity_path = Path(options["identity_path"])
    identity_path.parent.mkdir(parents=True, exist_ok=True)
    hop_trace.install_from_env(server_node=options["public_name"])
    if options.get("byzantine"):
        byzantine.install(ByzantineSpec(**options["byzantine"]))
    if float(options.get("step_delay_ms", 0)) > 0:
        hop_delay.install(float(options["step_delay_ms"]) / 1000)
    server = Server(
        initial_peers=options["initial_peers"],
        dht_prefix=options["dht_prefix"],
        converted_model_name_or_path=options["model_path"],
        public_name=options["public_name"],
        block_indices=options["block_indices"],
        throughput=float(options["throughput"]),
        num_handlers=int(options["num_handlers"]),
        inference_max_length=int(options["inference_max_length"]),
        attn_cache_tokens=options.get("attn_cache_tokens"),
        session_timeout=float(options["session_timeout_s"]),
        step_timeout=float(options.get("step_timeout_s", 300.0)),
        update_period=float(options["update_period_s"]),
        expiration=float(options["expiration_s"]),
        device="cpu",
        torch_dtype="float32",
        host_maddrs=[f"/ip4/{options['host']}/tcp/0"],
        reachable_via_relay=False,
        use_relay=False,
        use_auto_relay=False,
        skip_reachability_check=True,
        identity_path=str(identity_path),
    )
    if options.get("byzantine"):
        spec = ByzantineSpec(**options["byzantine"])
        byzantine.announce(server, spec)
        logger.warning("this server is byzantine (tests only): %s", spec)
    publisher = None
    try:
        if options.get("payout_wallet"):
            publisher = StatementPublisher(
                server.dht,
                load_identity(identity_path),
                options["payout_wallet"],
                period_s=float(options["update_period_s"]),
                expiration_s=float(options["expiration_s"]),
            )
            if publisher.statement.peer_id != server.dht.peer_id.to_base58():
                raise RuntimeError("the identity file does not give this server's peer id")
            publisher.start()
        _announce(
            role="server",
            peer_id=server.dht.peer_id.to_base58(),
            payout_wallet=publisher.statement.wallet if publisher else None,
        )
        server.run()
    except KeyboardInterrupt:
        logger.info("shutting down on SIGTERM")
    finally:
        if publisher is not None:
            publisher.stop()
        server.shutdown()


def main(argv: list[str]) -> int:
    role, raw_options = argv
    options = json.loads(raw_options)
    logging.basicConfig(
        level=options.get("log_level", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    compat.apply()
    if role == "dht":
        run_dht(options)
    elif role == "server":
        run_server(options)
    else:
        raise SystemExit(f"unknown swarm role {role!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
