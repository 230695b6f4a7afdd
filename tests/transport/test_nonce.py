"""``GET /auth/nonce`` through real sockets (protocol.md §2.1): the nonce and the message's
values, and with ``?address=`` that address in its EIP-55 checksummed form, so a browser page
needs no Keccak of its own."""

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from eth_account import Account
from eth_utils.address import to_checksum_address

from farmesh_ws.auth.siwe import STATEMENT
from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.transport.support import fake_gateway

# One of EIP-55's test vectors (mixed case: it differs from its lower and upper case).
EIP55 = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"


@pytest.fixture
async def server() -> AsyncIterator[GatewayServer]:
    gateway = await fake_gateway(FakeBackend(), siwe=True, auth="required")
    yield gateway
    await gateway.shutdown()


def _get(port: int, query: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/auth/nonce{query}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, json.loads(refused.read())


async def get_nonce(server: GatewayServer, query: str = "") -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(_get, server.port, query)


async def test_a_nonce_and_the_values_a_message_carries(server: GatewayServer) -> None:
    status, body = await get_nonce(server)
    assert status == 200
    domain = f"127.0.0.1:{server.port}"
    assert set(body) == {"nonce", "expires_at", "domain", "uri", "chain_id", "statement"}
    assert (body["domain"], body["uri"], body["chain_id"]) == (domain, f"http://{domain}/", 1)
    assert body["statement"] == STATEMENT
    _, again = await get_nonce(server)
    assert again["nonce"] != body["nonce"]  # single-use: a fresh one each time


@pytest.mark.parametrize("case", [str.lower, str.upper])
async def test_an_address_comes_back_checksummed(server: GatewayServer, case: Any) -> None:
    """Wallets answer in lower case; the answer is the EIP-55 form a message must carry."""
    status, body = await get_nonce(server, f"?address=0x{case(EIP55[2:])}")
    assert status == 200
    assert body["address"] == EIP55 == to_checksum_address(EIP55.lower())
    assert body["nonce"]
    made = Account.create().address  # and any other address, as eth-utils checksums it
    _, body = await get_nonce(server, f"?address=0x{case(made[2:])}")
    assert body["address"] == made == to_checksum_address(made.lower())


@pytest.mark.parametrize(
    "address",
    [
        "0x",
        EIP55[2:],  # no 0x
        EIP55[:-1],  # 39 hex digits
        EIP55 + "0",  # 41
        "0X" + EIP55[2:],
        EIP55[:-1] + "g",
        "0x" + "%20" * 40,
        "vitalik.eth",
    ],
)
async def test_a_malformed_address_is_refused(server: GatewayServer, address: str) -> None:
    assert await get_nonce(server, f"?address={address}") == (400, {"error": "invalid_address"})


async def test_without_sign_in_there_is_no_nonce() -> None:
    gateway = await fake_gateway(FakeBackend(), auth="required")
    try:
        status, body = await get_nonce(gateway, f"?address={EIP55}")
    finally:
        await gateway.shutdown()
    assert (status, body) == (404, {"error": "not_found", "path": "/auth/nonce"})


async def test_nonces_are_rate_limited_per_address() -> None:
    """Each nonce is kept until it expires: one address cannot fill the store with them."""
    gateway = await fake_gateway(FakeBackend(), siwe=True, siwe_nonces_per_minute=2)
    try:
        first = await asyncio.to_thread(_get, gateway.port, "")  # the burst is 1
        second = await asyncio.to_thread(_get, gateway.port, "")
    finally:
        await gateway.shutdown()
    assert first[0] == 200
    assert second == (429, {"error": "rate_limited"})
