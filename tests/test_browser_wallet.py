"""The page's "Sign in with wallet" in headless Chromium (protocol.md §2.1): an injected EIP-1193
``window.ethereum`` whose ``personal_sign`` is signed for real by an eth-account key made in the
test; the gateway verifies the EIP-4361 message, the page keeps the session token."""

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from playwright.async_api import Browser, Page, WebSocket, expect

from tests.test_browser_page import (
    CHROMIUM,
    BrowserThread,
    finished_reply,
    running_chromium,
    send_turn,
)
from tests.test_browser_signin import STORAGE
from tests.test_client_auth_e2e import SiweStandIn, siwe_gateway

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


# A wallet extension's provider, as far as the page uses it; signing goes to the test.
WALLET = """
window.walletCalls = [];
window.ethereum = {
  async request({ method, params }) {
    window.walletCalls.push({ method, params });
    if (method === "eth_requestAccounts") return [%(address)s];
    if (method === "personal_sign") return await window.walletSign(params[0], params[1]);
    throw new Error(`unsupported method ${method}`);
  },
};
"""


async def test_sign_in_with_wallet(chromium: BrowserThread) -> None:
    account: LocalAccount = Account.create()
    wallets_asked: list[str] = []

    def wallet_sign(message_hex: str, address: str) -> str:
        wallets_asked.append(address)
        signed = account.sign_message(encode_defunct(hexstr=message_hex))
        return "0x" + bytes(signed.signature).hex()

    async with siwe_gateway("required", reply="Hi there.") as (server, siwe, billed):

        async def scenario(browser: Browser) -> list[list[dict[str, Any]]]:
            page = await browser.new_page()
            connections: list[list[dict[str, Any]]] = []

            def watch(ws: WebSocket) -> None:
                frames: list[dict[str, Any]] = []
                connections.append(frames)
                ws.on("framesent", lambda payload: frames.append(json.loads(payload)))

            page.on("websocket", watch)
            await page.expose_function("walletSign", wallet_sign)
            # Wallets answer in lower case; the page checksums the address (EIP-55).
            await page.add_init_script(WALLET % {"address": json.dumps(account.address.lower())})
            await page.goto(f"http://127.0.0.1:{server.port}/")
            await expect(page.get_by_test_id("error-code")).to_have_text("unauthorized")
            await page.get_by_test_id("wallet-signin").click()
            await expect_wallet_signed_in(page, account)
            calls = await page.evaluate("window.walletCalls")
            assert [call["method"] for call in calls] == ["eth_requestAccounts", "personal_sign"]
            assert calls[1]["params"][1] == account.address  # checksummed (EIP-55)
            token = await page.evaluate(STORAGE)
            assert token in siwe.sessions
            turn = await send_turn(page, "Say hi.")
            assert await finished_reply(turn) == "Hi there."

            await page.reload()  # the session token, without signing again
            await expect_wallet_signed_in(page, account)
            assert await page.evaluate("window.walletCalls") == []  # the wallet was not asked
            await page.close()
            return connections

        assert chromium.browser is not None
        connections = await chromium.run(scenario(chromium.browser))
        assert wallets_asked == [account.address]
        (signed,) = siwe.messages
        assert signed.address == account.address
        assert signed.domain == f"127.0.0.1:{server.port}"
        assert signed.statement == SiweStandIn.STATEMENT
        first = [frames[0] for frames in connections]
        assert [frame["type"] for frame in first] == ["open", "auth", "auth"]
        assert set(first[1]) == {"type", "siwe"}
        assert first[1]["siwe"]["message"].startswith(
            f"127.0.0.1:{server.port} wants you to sign in with your Ethereum account:\n"
            f"{account.address}\n"
        )
        assert first[2] == {"type": "auth", "token": next(iter(siwe.sessions))}
        assert [wallet for wallet, _ in billed.started] == [account.address]


async def expect_wallet_signed_in(page: Page, account: LocalAccount) -> None:
    await expect(page.get_by_test_id("identity")).to_have_attribute("data-state", "signed-in")
    await expect(page.get_by_test_id("principal")).to_have_text(f"wallet:{account.address}")
    await expect(page.get_by_test_id("wallet")).to_have_text(account.address)
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "open")
    await expect(page.get_by_test_id("error")).to_be_hidden()
