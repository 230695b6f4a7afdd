"""The page's "Sign in with wallet" in headless Chromium (protocol.md §2.1): an injected EIP-1193
``window.ethereum`` whose ``personal_sign`` is signed for real by an eth-account key made in the
test; the gateway checksums the wallet's address (the page hashes nothing itself), its real
Sign-In with Ethereum verifies the EIP-4361 message, and the page keeps the session token."""

import json
from collections.abc import AsyncIterator

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount
from playwright.async_api import Browser, Page, expect

from farmesh_ws.auth.siwe import STATEMENT
from tests.test_browser_page import (
    CHROMIUM,
    BrowserThread,
    finished_reply,
    running_chromium,
    send_turn,
)
from tests.test_browser_signin import STORAGE, Traffic
from tests.test_client_auth_e2e import siwe_gateway

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

    async with siwe_gateway("required", reply="Hi there.") as (server, billed):
        domain = f"127.0.0.1:{server.port}"

        async def scenario(browser: Browser) -> tuple[Traffic, str]:
            page = await browser.new_page()
            traffic = Traffic(page)
            await page.expose_function("walletSign", wallet_sign)
            # Wallets answer in lower case; the gateway answers the EIP-55 checksummed form.
            await page.add_init_script(WALLET % {"address": json.dumps(account.address.lower())})
            await page.goto(f"http://{domain}/")
            await expect(page.get_by_test_id("error-code")).to_have_text("unauthorized")
            await page.get_by_test_id("wallet-signin").click()
            await expect_wallet_signed_in(page, account)
            calls = await page.evaluate("window.walletCalls")
            assert [call["method"] for call in calls] == ["eth_requestAccounts", "personal_sign"]
            assert calls[1]["params"][1] == account.address  # checksummed (EIP-55)
            token = await page.evaluate(STORAGE)
            turn = await send_turn(page, "Say hi.")
            assert await finished_reply(turn) == "Hi there."

            await page.reload()  # the session token, without signing again
            await expect_wallet_signed_in(page, account)
            assert await page.evaluate("window.walletCalls") == []  # the wallet was not asked
            await page.close()
            return traffic, token

        assert chromium.browser is not None
        traffic, token = await chromium.run(scenario(chromium.browser))
        assert traffic.problems == []
        assert wallets_asked == [account.address]
        nonce_urls = [url for url in traffic.urls if "/auth/nonce" in url]
        assert nonce_urls == [f"http://{domain}/auth/nonce?address={account.address.lower()}"]
        assert token.startswith("fms_")
        assert all(token not in url and "fms_" not in url for url in traffic.urls)
        first = [frames[0] for frames in traffic.connections]
        assert [frame["type"] for frame in first] == ["open", "auth", "auth"]
        assert set(first[1]) == {"type", "siwe"}
        # The message the gateway verified: the checksummed address, the gateway's statement.
        assert first[1]["siwe"]["message"].startswith(
            f"{domain} wants you to sign in with your Ethereum account:\n{account.address}\n\n"
            f"{STATEMENT}\n\nURI: http://{domain}/\nVersion: 1\nChain ID: 1\nNonce: "
        )
        assert first[2] == {"type": "auth", "token": token}
        assert [wallet for wallet, _ in billed.started] == [account.address]


async def test_an_address_the_gateway_refuses_is_not_signed(chromium: BrowserThread) -> None:
    """The page checks no address itself: the gateway's ``invalid_address`` is shown and the
    wallet is never asked to sign."""
    async with siwe_gateway("required") as (server, billed):

        async def scenario(browser: Browser) -> list[str]:
            page = await browser.new_page()
            await page.add_init_script(WALLET % {"address": json.dumps("0x1234")})
            await page.goto(f"http://127.0.0.1:{server.port}/")
            await expect(page.get_by_test_id("error-code")).to_have_text("unauthorized")
            await page.get_by_test_id("wallet-signin").click()
            await expect(page.get_by_test_id("error-code")).to_have_text("invalid_address")
            await expect(page.get_by_test_id("identity")).to_have_text("not signed in")
            methods = [call["method"] for call in await page.evaluate("window.walletCalls")]
            await page.close()
            return methods

        assert chromium.browser is not None
        assert await chromium.run(scenario(chromium.browser)) == ["eth_requestAccounts"]
        assert billed.started == []


async def expect_wallet_signed_in(page: Page, account: LocalAccount) -> None:
    await expect(page.get_by_test_id("identity")).to_have_attribute("data-state", "signed-in")
    await expect(page.get_by_test_id("principal")).to_have_text(f"wallet:{account.address}")
    await expect(page.get_by_test_id("wallet")).to_have_text(account.address)
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "open")
    await expect(page.get_by_test_id("error")).to_be_hidden()
