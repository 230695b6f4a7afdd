"""The `farmesh-ws` command. Logging is configured here and nowhere else."""

import argparse
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farmesh_ws.transport.ws import GatewayServer

from farmesh_ws import __version__
from farmesh_ws.chat_cli import add_credential_arguments
from farmesh_ws.home import farmesh_home
from farmesh_ws.logcontext import LogContextFilter
from farmesh_ws.payout.command import add_payout_parser
from farmesh_ws.swarm_command import add_swarm_parser

logger = logging.getLogger("farmesh_ws.cli")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(log_context)s%(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(LogContextFilter())
    logging.getLogger("databases").setLevel(logging.WARNING)
    # websockets logs every handshake header and frame at DEBUG: Authorization: Bearer keys,
    # auth messages and user text. Never that, whatever the level.
    logging.getLogger("websockets").setLevel(logging.INFO)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    result: int = args.handler(args)
    return result


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farmesh-ws", description=__doc__)
    parser.add_argument("--version", action="version", version=f"farmesh-ws {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(title="commands")

    model = commands.add_parser("model", help="manage the bundled model")
    model_commands = model.add_subparsers(title="model commands")
    prepare = model_commands.add_parser(
        "prepare", help="convert the bundled GGUF into a Hugging Face folder (idempotent)"
    )
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(handler=_model_prepare)

    add_swarm_parser(commands)

    serve = commands.add_parser(
        "serve", help="run the WebSocket gateway (embedded local mesh unless a bootstrap is set)"
    )
    serve.add_argument("--host", default=None, help="listen address (FARMESH_HOST)")
    serve.add_argument("--port", type=int, default=None, help="listen port (FARMESH_PORT)")
    serve.add_argument("--model", default=None, help="default model id (DEFAULT_MODEL_ID)")
    serve.add_argument(
        "--price-per-token", default=None, help="$FAR per token, decimal (PRICE_PER_TOKEN_FAR)"
    )
    serve.add_argument(
        "--bootstrap",
        default=None,
        help="DHT multiaddrs of a real mesh, comma-separated (FAR_MESH_DHT_BOOTSTRAP)",
    )
    serve.add_argument(
        "--local-servers", type=int, default=None, help="servers of the embedded swarm"
    )
    serve.add_argument(
        "--auth",
        choices=("required", "optional", "off"),
        default=None,
        help="FARMESH_AUTH (default: optional on 127.0.0.1, required on other addresses)",
    )
    serve.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow --auth optional/off on a non-loopback address (anyone there can use it)",
    )
    serve.set_defaults(handler=_serve)

    chat = commands.add_parser("chat", help="chat with a running gateway in the terminal")
    local = f"ws://127.0.0.1:{os.environ.get('FARMESH_PORT') or 8100}/ws"
    chat.add_argument(
        "--url", default=local, help="the gateway's WebSocket URL (default: %(default)s)"
    )
    chat.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per reply at most (default: the gateway's default for the model)",
    )
    chat.add_argument("--system-prompt", default=None, help="system prompt of the session")
    chat.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature, 0 = greedy (default: the model's recommendation in /models)",
    )
    chat.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling top_p (default: the model's recommendation in /models)",
    )
    add_credential_arguments(chat)
    chat.set_defaults(handler=_chat)

    ledger = commands.add_parser(
        "ledger", help="query the usage and payment ledger, manage prepaid balances"
    )
    reports = ledger.add_subparsers(
        title="ledger commands",
        dest="report",
        metavar="{nodes,wallets,sessions,credit,balances,charges}",
        required=True,
    )
    for report, summary in (
        ("nodes", "earnings per node"),
        ("wallets", "spend per wallet"),
        ("sessions", "recent sessions"),
    ):
        view = reports.add_parser(report, help=summary)
        view.add_argument("--json", action="store_true", help="one JSON object per line")
        view.add_argument("--limit", type=int, default=20, help="sessions to show")
        view.set_defaults(handler=_ledger)
    credit = reports.add_parser("credit", help="add $FAR to a wallet's prepaid balance")
    credit.add_argument("wallet", metavar="WALLET", help="the wallet to credit, e.g. 0x...")
    credit.add_argument("amount", metavar="AMOUNT", help="$FAR, a decimal with at most 8 places")
    credit.add_argument("--note", default=None, help="why (kept with the credit)")
    credit.set_defaults(handler=_balances)
    balances = reports.add_parser("balances", help="prepaid balances, held and available")
    balances.add_argument("--wallet", default=None, help="only this wallet")
    balances.add_argument("--json", action="store_true", help="one JSON object per line")
    balances.set_defaults(handler=_balances)
    charges = reports.add_parser("charges", help="a wallet's charges by key or signed wallet")
    charges.add_argument("--wallet", required=True, help="the wallet charged")
    charges.add_argument("--json", action="store_true", help="one JSON object per line")
    charges.set_defaults(handler=_balances)

    add_payout_parser(commands)

    keys = commands.add_parser("keys", help="manage API keys (bound to a wallet, stored hashed)")
    key_commands = keys.add_subparsers(
        title="keys commands", dest="action", metavar="{create,list,revoke}", required=True
    )
    create = key_commands.add_parser("create", help="create a key; it is printed once only")
    create.add_argument("--wallet", required=True, help="the wallet it bills to, e.g. 0x...")
    create.add_argument("--name", default=None, help="a label for the key")
    quota = create.add_argument_group("the key's own caps (default: the gateway's, protocol.md §9)")
    quota.add_argument("--max-connections", type=int, default=None, help="open connections")
    quota.add_argument("--max-requests", type=int, default=None, help="running requests")
    quota.add_argument("--max-sessions", type=int, default=None, help="open sessions")
    quota.add_argument(
        "--max-reserved-tokens", type=int, default=None, help="context tokens reserved at once"
    )
    quota.add_argument("--requests-per-minute", type=float, default=None, help="request rate")
    listing = key_commands.add_parser("list", help="keys and their status (never the secrets)")
    listing.add_argument("--wallet", default=None, help="only this wallet's keys")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    revoke = key_commands.add_parser("revoke", help="revoke a key: it stops authenticating")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key id, fk_ and 16 hex digits")
    keys.set_defaults(handler=_keys)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from farmesh_ws.config import ConfigError, load_settings
    from farmesh_ws.config_values import parse_decimal, parse_list
    from farmesh_ws.gateway import check_exposure, check_servable

    try:
        settings = load_settings().with_overrides(
            host=args.host,
            port=args.port,
            default_model_id=args.model,
            price_per_token_far=(
                parse_decimal(args.price_per_token) if args.price_per_token else None
            ),
            dht_bootstrap=parse_list(args.bootstrap) if args.bootstrap else None,
            local_servers=args.local_servers,
            auth=args.auth,
            insecure_no_auth=args.insecure_no_auth,
        )
        check_servable(settings)
        check_exposure(settings)
    except (ConfigError, ValueError) as exc:
        sys.stderr.write(f"farmesh-ws: configuration error: {exc}\n")
        return 2
    logging.getLogger().setLevel(settings.log_level)
    from farmesh_ws.gateway import serve_until_stopped

    def on_ready(server: "GatewayServer") -> None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host  # any address
        url = f"ws://{host}:{server.port}/ws"
        key = ""
        if settings.auth_mode == "required":
            key = ' -H "Authorization: Bearer <key from farmesh-ws keys create>"'
        sys.stdout.write(
            f"farmesh-ws ready: {url}  (HTTP: http://{host}:{server.port}/health)  "
            f"OpenAI API: http://{host}:{server.http.port}/v1\n"
            f"try: npx wscat -c {url}{key}   then send "
            '{"type":"open"} and {"type":"turn","request_id":"1","text":"Hello!"}\n'
        )
        sys.stdout.flush()

    asyncio.run(serve_until_stopped(settings, on_ready))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from farmesh_ws.chat_cli import credential_argument, run_chat

    return run_chat(
        args.url,
        max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        temperature=args.temperature,
        top_p=args.top_p,
        token=credential_argument(args),
    )


def _ledger(args: argparse.Namespace) -> int:
    from farmesh_ws.ledger.report import print_report

    def report(database_url: str) -> Coroutine[Any, Any, None]:
        return print_report(
            database_url,
            farmesh_home(),
            args.report,
            as_json=args.json,
            limit=args.limit,
            out=sys.stdout,
        )

    return _run_on_ledger(report, refused=())


def _balances(args: argparse.Namespace) -> int:
    from farmesh_ws.ledger.balances import BalanceRequestError
    from farmesh_ws.ledger.balances_command import run_balances_command

    def command(database_url: str) -> Coroutine[Any, Any, None]:
        return run_balances_command(database_url, farmesh_home(), args, out=sys.stdout)

    return _run_on_ledger(command, refused=(BalanceRequestError,))


def _keys(args: argparse.Namespace) -> int:
    from farmesh_ws.ledger.keys import KeyRequestError
    from farmesh_ws.ledger.keys_command import run_keys_command

    def command(database_url: str) -> Coroutine[Any, Any, None]:
        return run_keys_command(database_url, farmesh_home(), args, out=sys.stdout, err=sys.stderr)

    return _run_on_ledger(command, refused=(KeyRequestError,))


def _run_on_ledger(
    command: Callable[[str], Coroutine[Any, Any, None]], *, refused: tuple[type[Exception], ...]
) -> int:
    """Run a ledger command on the configured database: exit 2 for a configuration error or a
    ``refused`` request, 1 when the database is unreachable, else 0 (one line on stderr)."""
    import asyncio

    from farmesh_ws.config import ConfigError, load_settings
    from farmesh_ws.ledger.store import LedgerUnavailable

    try:
        settings = load_settings()
    except ConfigError as exc:
        sys.stderr.write(f"farmesh-ws: configuration error: {exc}\n")
        return 2
    try:
        asyncio.run(command(settings.database_url))
    except refused as exc:
        sys.stderr.write(f"farmesh-ws: {exc}\n")
        return 2
    except LedgerUnavailable as exc:
        sys.stderr.write(f"farmesh-ws: {exc}\n")
        return 1
    return 0


def _model_prepare(args: argparse.Namespace) -> int:
    from farmesh_ws.models.bundled import prepare_bundled_model
    from farmesh_ws.models.errors import ModelPreparationError

    try:
        path = prepare_bundled_model(farmesh_home(), progress=not args.quiet)
    except ModelPreparationError as exc:
        logger.error("%s", exc)
        return 1
    sys.stdout.write(f"{path}\n")
    return 0
