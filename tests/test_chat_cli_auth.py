"""`farmesh-ws chat` with credentials (protocol.md §2.1): --api-key (default $FARMESH_API_KEY)
or --token sent in the handshake, and a hint on `unauthorized` when none was given."""

import argparse
import asyncio
import io

import pytest

from farmesh_ws.chat_cli import (
    UNAUTHORIZED_HINT,
    add_credential_arguments,
    credential_argument,
    run_chat,
)
from tests.test_client_auth import KEY, SESSION_TOKEN, error_frame, scripted_gateway
from tests.test_client_auth_e2e import ALICE_KEY, ALICE_WALLET
from tests.test_client_auth_e2e import gateway as e2e_gateway


def chat_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farmesh-ws chat", exit_on_error=False)
    add_credential_arguments(parser)
    return parser


def test_api_key_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FARMESH_API_KEY", raising=False)
    assert credential_argument(chat_parser().parse_args([])) is None
    assert credential_argument(chat_parser().parse_args(["--api-key", KEY])) == KEY
    assert credential_argument(chat_parser().parse_args(["--token", SESSION_TOKEN])) == (
        SESSION_TOKEN
    )
    monkeypatch.setenv("FARMESH_API_KEY", KEY)
    assert credential_argument(chat_parser().parse_args([])) == KEY
    # An explicit session token wins over the environment's key.
    assert credential_argument(chat_parser().parse_args(["--token", SESSION_TOKEN])) == (
        SESSION_TOKEN
    )
    with pytest.raises(argparse.ArgumentError):
        chat_parser().parse_args(["--api-key", KEY, "--token", SESSION_TOKEN])


async def test_the_credential_goes_in_the_handshake() -> None:
    async with scripted_gateway() as gateway:
        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, gateway.url, max_new_tokens=4, token=KEY, stdin=io.StringIO("/reset\n"),
            stdout=stdout,
        )  # fmt: skip
    assert code == 0, stdout.getvalue()
    assert "[new chat session]" in stdout.getvalue()
    assert gateway.authorizations == [f"Bearer {KEY}"] * 2  # the reset's connection too


async def test_unauthorized_prints_a_hint_unless_a_credential_was_sent() -> None:
    async with scripted_gateway() as gateway:
        gateway.open_error = error_frame("unauthorized", False)
        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, gateway.url, max_new_tokens=4, stdin=io.StringIO(), stdout=stdout
        )
        assert code == 1
        assert stdout.getvalue().splitlines() == [
            "error: scripted unauthorized (unauthorized)",
            UNAUTHORIZED_HINT,
        ]
        assert UNAUTHORIZED_HINT == (
            "hint: this gateway requires an API key: farmesh-ws keys create --wallet 0x… "
            "and pass --api-key"
        )

        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, gateway.url, max_new_tokens=4, token="fms_revoked", stdin=io.StringIO(),
            stdout=stdout,
        )  # fmt: skip
    assert code == 1
    assert stdout.getvalue() == (
        f"error: scripted unauthorized (HTTP 401 from {gateway.url}) (unauthorized)\n"
    )


async def test_a_retry_after_is_shown() -> None:
    async with scripted_gateway() as gateway:
        gateway.errors = [error_frame("quota_exceeded", True, retry_after_s=2.5)]
        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, gateway.url, max_new_tokens=4, stdin=io.StringIO("Hello\n"), stdout=stdout
        )
    assert code == 0
    assert "error: scripted quota_exceeded (quota_exceeded); try again in 2.5 s\n" in (
        stdout.getvalue()
    )


async def test_on_the_real_gateway_the_key_opens_the_chat() -> None:
    async with e2e_gateway("required") as (url, billed):
        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, url, max_new_tokens=4, token=ALICE_KEY, stdin=io.StringIO("Say hi.\n"),
            stdout=stdout,
        )  # fmt: skip
        assert code == 0, stdout.getvalue()
        assert "you> ok\n" in stdout.getvalue()
        assert [wallet for wallet, _ in billed.started] == [ALICE_WALLET]

        stdout = io.StringIO()
        code = await asyncio.to_thread(
            run_chat, url, max_new_tokens=4, stdin=io.StringIO("Say hi.\n"), stdout=stdout
        )
    assert code == 1
    error, hint = stdout.getvalue().splitlines()
    assert error.startswith("error: this gateway requires credentials")
    assert error.endswith("(unauthorized)")
    assert hint == UNAUTHORIZED_HINT
