"""`farmesh-ws swarm`: a local swarm (a DHT plus Petals servers on 127.0.0.1) until Ctrl-C."""

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from farmesh_ws.home import farmesh_home
from farmesh_ws.swarm_layout import SwarmModel

logger = logging.getLogger("farmesh_ws.cli")


def add_swarm_parser(commands: Any) -> None:
    """Add the ``swarm`` command to the CLI's subparsers."""
    swarm = commands.add_parser(
        "swarm", help="run a local swarm (a DHT plus Petals servers on 127.0.0.1)"
    )
    swarm.add_argument("--servers", type=int, default=2, help="servers splitting the blocks")
    swarm.add_argument(
        "--spans", default="", help="explicit block spans, e.g. 0:15,15:30 (overrides --servers)"
    )
    swarm.add_argument("--replicas", type=int, default=1, help="servers per span")
    swarm.add_argument("--dht-port", type=int, default=0, help="DHT port (0: any free port)")
    swarm.add_argument("--num-handlers", type=int, default=2, help="handler processes per server")
    swarm.add_argument(
        "--tiny-model",
        action="store_true",
        help="also serve the tiny built model (one server); writes LOG_DIR/models.toml for "
        "FARMESH_MODELS_FILE",
    )
    swarm.add_argument(
        "--hop-delay-ms",
        type=_non_negative,
        default=0.0,
        help="simulated network delay per hop (ms; README 'A wide-area mesh')",
    )
    swarm.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="per-process log files, and the servers' identity files under identities/",
    )
    swarm.add_argument(
        "--payout-wallet",
        action="append",
        default=[],
        metavar="[NAME=]WALLET",
        help="the 0x wallet servers are paid to: WALLET for every server, NAME=WALLET for one "
        "(server0, server1, ...); repeatable",
    )
    cheat = swarm.add_argument_group(
        'byzantine servers (tests and benchmarks only: README "Verified work")'
    )
    cheat.add_argument(
        "--byzantine",
        action="append",
        default=[],
        metavar="NAME",
        help="make server NAME (server0, server1, ...) perturb its inference outputs; repeatable",
    )
    cheat.add_argument(
        "--byzantine-scale", type=float, default=0.05, help="noise, a fraction of the outputs' RMS"
    )
    cheat.add_argument(
        "--byzantine-fraction", type=float, default=1.0, help="share of steps tampered with"
    )
    cheat.add_argument(
        "--byzantine-after-steps", type=int, default=0, help="honest steps first (per handler)"
    )
    cheat.add_argument(
        "--byzantine-claimed-rps",
        type=float,
        default=0.0,
        help="inference steps/s per block to announce, so routing prefers it (0: none)",
    )
    swarm.set_defaults(handler=_swarm)


def _swarm(args: argparse.Namespace) -> int:
    from farmesh_ws.byzantine import ByzantineSpec
    from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
    from farmesh_ws.models.bundled import prepare_bundled_model
    from farmesh_ws.swarm import LocalSwarm, SwarmConfig, SwarmError, read_num_blocks

    try:
        payout_wallets = parse_payout_wallets(args.payout_wallet)
        cheat = ByzantineSpec(
            scale=args.byzantine_scale,
            fraction=args.byzantine_fraction,
            after_steps=args.byzantine_after_steps,
            claimed_inference_rps=args.byzantine_claimed_rps,
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    model_path = prepare_bundled_model(farmesh_home())
    spans = tuple(span for span in args.spans.split(",") if span)
    log_dir = args.log_dir or farmesh_home() / "swarm-logs"
    config = SwarmConfig(
        model_path=model_path,
        dht_prefix=dht_prefix_for(BUNDLED_MODEL_ID),
        num_blocks=read_num_blocks(model_path),
        log_dir=log_dir,
        num_servers=args.servers,
        spans=spans,
        replicas=args.replicas,
        dht_port=args.dht_port,
        num_handlers=args.num_handlers,
        step_delay_ms=args.hop_delay_ms,
        payout_wallets=payout_wallets,
        byzantine=tuple((name, cheat) for name in args.byzantine),
        more_models=(tiny_swarm_model(log_dir),) if args.tiny_model else (),
    )
    try:
        config.server_spans()
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    swarm = LocalSwarm(config)
    try:
        swarm.start()
        servers = "".join(
            f"{node.name}: {node.peer_id} {(node.model or config).dht_prefix} blocks {node.span} "
            f"payout {node.payout_wallet or 'unbound'}"
            f"{' BYZANTINE' if node.byzantine else ''}\n"
            for node in swarm.servers
        )
        sys.stdout.write(
            f"swarm ready: model {BUNDLED_MODEL_ID}, {len(swarm.servers)} servers\n"
            f"{servers}"
            f"initial peers: {' '.join(swarm.initial_peers)}\n"
            + (f"models file: {log_dir / MODELS_FILE}\n" if args.tiny_model else "")
            + f"logs: {config.log_dir}\n"
        )
        sys.stdout.flush()
        stop.wait()
    except SwarmError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        swarm.stop()
    return 0


MODELS_FILE = "models.toml"


def tiny_swarm_model(log_dir: Path) -> SwarmModel:
    """The tiny built model (seed 0) as a swarm model of one server, and ``log_dir/models.toml``
    naming it for a gateway's ``FARMESH_MODELS_FILE`` (next to the bundled model)."""
    from farmesh_ws.models import dht_prefix_for
    from farmesh_ws.models.tiny import TINY_MODEL_ID, prepare_tiny_model
    from farmesh_ws.swarm import read_num_blocks

    folder = prepare_tiny_model(farmesh_home())
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / MODELS_FILE).write_text(
        f"[[model]]\nid = {json.dumps(TINY_MODEL_ID)}\npath = {json.dumps(str(folder))}\n",
        encoding="utf-8",
    )
    return SwarmModel(folder, dht_prefix_for(TINY_MODEL_ID), read_num_blocks(folder))


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of milliseconds ≥ 0")
    return value


def parse_payout_wallets(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--payout-wallet`` values, ``WALLET`` (every server) or ``NAME=WALLET`` (server
    ``NAME``), as :attr:`SwarmConfig.payout_wallets` pairs with EIP-55 wallets. Raises
    ValueError for a wallet that is not an Ethereum address or a name given twice."""
    from farmesh_ws.payout.wallet import checksum_wallet

    pairs: dict[str, str] = {}
    for value in values:
        name, _, wallet = value.rpartition("=")
        if name in pairs:
            raise ValueError(f"--payout-wallet names {name or 'every server'} twice")
        pairs[name] = checksum_wallet(wallet)
    return tuple(pairs.items())
