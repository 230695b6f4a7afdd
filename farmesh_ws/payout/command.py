"""`farmesh-ws payout publish`: a provider's Petals server proves its payout wallet.

Run next to a Petals server started with ``--identity_path KEY``: this joins the same DHT as a
client, signs a payout statement for ``--wallet`` with KEY (the server's identity, so the
statement is for the server's peer id) and stores it now and every ``--period-s`` seconds
until Ctrl-C / SIGTERM (:class:`~farmesh_ws.payout.dht.StatementPublisher`). Exit codes: 0 on
a signal, 2 for a bad wallet or identity file, 1 if the DHT cannot be joined.
"""

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


def add_payout_parser(commands: Any) -> None:
    """Add the ``payout`` command to the ``farmesh-ws`` subcommands ``commands``."""
    payout = commands.add_parser("payout", help="prove the payout wallet of a Petals server")
    actions = payout.add_subparsers(title="payout commands", metavar="{publish}", required=True)
    publish = actions.add_parser(
        "publish", help="sign and keep publishing a payout statement for a server's peer id"
    )
    publish.add_argument(
        "--identity", type=Path, required=True, help="the server's --identity_path key file"
    )
    publish.add_argument("--wallet", required=True, help="the 0x wallet to be paid to")
    publish.add_argument(
        "--initial-peers",
        required=True,
        help="DHT multiaddrs of the mesh, comma-separated (the server's --initial_peers)",
    )
    publish.add_argument(
        "--host-maddr", default="/ip4/0.0.0.0/tcp/0", help="address this DHT client binds"
    )
    publish.add_argument(
        "--period-s", type=float, default=120.0, help="seconds between re-signed stores"
    )
    publish.add_argument(
        "--expiration-s", type=float, default=240.0, help="seconds each stored statement lives"
    )
    publish.set_defaults(handler=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    from farmesh_ws.payout.wallet import checksum_wallet

    if not 0 < args.period_s < args.expiration_s:
        logger.error("--period-s must be positive and below --expiration-s")
        return 2
    try:
        wallet = checksum_wallet(args.wallet)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    from farmesh_ws.mesh import compat
    from farmesh_ws.payout.dht import StatementPublisher
    from farmesh_ws.payout.identity import IdentityError, load_identity

    try:
        key = load_identity(args.identity)
    except IdentityError as exc:
        logger.error("%s", exc)
        return 2
    compat.apply()
    from hivemind.dht import DHT

    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    peers = [peer for peer in args.initial_peers.split(",") if peer]
    try:
        dht = DHT(initial_peers=peers, client_mode=True, host_maddrs=[args.host_maddr], start=True)
    except Exception as exc:  # noqa: BLE001 - hivemind raises several kinds; one line and exit 1
        logger.error("cannot join the DHT (%s: %s)", type(exc).__name__, exc)
        return 1
    publisher = StatementPublisher(
        dht, key, wallet, period_s=args.period_s, expiration_s=args.expiration_s
    )
    try:
        publisher.start()
        sys.stdout.write(f"publishing: peer {publisher.statement.peer_id} is paid to {wallet}\n")
        sys.stdout.flush()
        stop.wait()
    finally:
        publisher.stop()
        dht.shutdown()
    return 0
