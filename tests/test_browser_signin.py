"""The page's sign-in area in headless Chromium, on the real gateway over the scripted mesh
(protocol.md §2.1): a pasted API key sent as the first `auth` message and kept in
sessionStorage (never in a URL), the principal and wallet shown, refusals shown clearly, and
anonymous use where the gateway allows it."""

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocket, expect

from farmesh_ws.mesh.fake import FakeBackend
from farmesh_ws.transport.ws import GatewayServer
from tests.test_browser_page import (
    CHROMIUM,
    BrowserThread,
    finished_reply,
    running_chromium,
    send_turn,
)
from tests.test_client_auth_e2e import ALICE_KEY, ALICE_WALLET, KEYS
from tests.transport.support import fake_gateway

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")

STORAGE = "sessionStorage.getItem('farmesh.credential')"


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


@contextlib.asynccontextmanager
async def gateway(mode: str, **overrides: Any) -> AsyncIterator[GatewayServer]:
    server = await fake_gateway(FakeBackend(reply="Hi there."), keys=KEYS, auth=mode, **overrides)
    try:
        yield server
    finally:
        await server.shutdown()


class Traffic:
    """What the page sends: every URL it requests, each connection's JSON frames, problems."""

    def __init__(self, page: Page) -> None:
        self.urls: list[str] = []
        self.connections: list[list[dict[str, Any]]] = []
        self.problems: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("websocket", self._watch)
        page.on("pageerror", lambda error: self.problems.append(f"pageerror: {error}"))
        page.on(
            "console",
            lambda msg: self.problems.append(msg.text) if msg.type == "error" else None,
        )

    def _watch(self, ws: WebSocket) -> None:
        self.urls.append(ws.url)
        frames: list[dict[str, Any]] = []
        self.connections.append(frames)
        ws.on("framesent", lambda payload: frames.append(json.loads(payload)))


async def new_page(browser: Browser, port: int) -> tuple[Page, Traffic]:
    page = await browser.new_page(viewport={"width": 1000, "height": 900})
    traffic = Traffic(page)
    await page.goto(f"http://127.0.0.1:{port}/")
    return page, traffic


async def sign_in_with_key(page: Page, key: str) -> None:
    await page.get_by_test_id("credential").fill(key)
    await page.get_by_test_id("credential-use").click()


async def expect_signed_in(page: Page) -> None:
    await expect(page.get_by_test_id("identity")).to_have_attribute("data-state", "signed-in")
    await expect(page.get_by_test_id("principal")).to_have_text("key:fk_a11ce0000000a11ce")
    await expect(page.get_by_test_id("wallet")).to_have_text(ALICE_WALLET)
    await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "open")


async def test_a_pasted_key_signs_in_on_a_gateway_that_requires_it(
    chromium: BrowserThread,
) -> None:
    async with gateway("required") as server:

        async def scenario(browser: Browser) -> Traffic:
            page, traffic = await new_page(browser, server.port)
            # Without credentials the page says what to do.
            await expect(page.get_by_test_id("error-code")).to_have_text("unauthorized")
            await expect(page.get_by_test_id("error-message")).to_contain_text(
                "this gateway requires sign-in: paste an API key or session token"
            )
            await expect(page.get_by_test_id("identity")).to_have_text("not signed in")
            await expect(page.get_by_test_id("conn-status")).to_have_text("sign-in required")
            await expect(page.get_by_test_id("send")).to_be_disabled()

            await sign_in_with_key(page, ALICE_KEY)
            await expect_signed_in(page)
            await expect(page.get_by_test_id("error")).to_be_hidden()
            await expect(page.get_by_test_id("credential")).to_have_value("")
            assert await page.evaluate(STORAGE) == ALICE_KEY
            turn = await send_turn(page, "Say hi.")
            assert await finished_reply(turn) == "Hi there."

            # A reload presents the kept key again before opening the session.
            await page.reload()
            await expect_signed_in(page)
            turn = await send_turn(page, "Again.")
            assert await finished_reply(turn) == "Hi there."

            await page.get_by_test_id("sign-out").click()
            await expect(page.get_by_test_id("identity")).to_have_text("not signed in")
            await expect(page.get_by_test_id("error-code")).to_have_text("unauthorized")
            assert await page.evaluate(STORAGE) is None
            await page.close()
            return traffic

        assert chromium.browser is not None
        traffic = await chromium.run(scenario(chromium.browser))
    assert traffic.problems == []
    assert all(ALICE_KEY not in url and "fmk_" not in url for url in traffic.urls)
    first_frames = [frames[0] for frames in traffic.connections]
    auth = {"type": "auth", "token": ALICE_KEY}
    assert [frame["type"] for frame in first_frames] == ["open", "auth", "auth", "open"]
    assert first_frames[1] == first_frames[2] == auth
    for frames in traffic.connections[1:3]:
        assert [frame["type"] for frame in frames][:2] == ["auth", "open"]


async def test_a_refused_key_is_forgotten_and_anonymous_use_goes_on(
    chromium: BrowserThread,
) -> None:
    """On a loopback gateway (auth optional) the page chats without credentials; a key the
    gateway refuses is shown as unauthorized and dropped; a spent free quota says when to
    retry."""
    async with gateway("optional", anonymous_tokens_per_day=100) as server:

        async def scenario(browser: Browser) -> Traffic:
            page, traffic = await new_page(browser, server.port)
            await expect(page.get_by_test_id("conn-status")).to_have_attribute("data-state", "open")
            await expect(page.get_by_test_id("identity")).to_have_text("not signed in")
            turn = await send_turn(page, "Say hi.")
            assert await finished_reply(turn) == "Hi there."

            await sign_in_with_key(page, "fmk_fk_0000000000000000_" + "x" * 43)
            await expect(page.get_by_test_id("error-code")).to_have_text("unauthorized")
            await expect(page.get_by_test_id("error-message")).to_have_text(
                "unknown or revoked API key"
            )
            await expect(page.get_by_test_id("identity")).to_have_text("not signed in")
            assert await page.evaluate(STORAGE) is None
            await expect(page.get_by_test_id("separator")).to_have_count(1)
            await expect(page.get_by_test_id("send")).to_be_enabled()  # anonymous again

            refused = await send_turn(page, "Tell me a long story. " * 10)
            await expect(refused).to_have_attribute("data-state", "error")
            await expect(page.get_by_test_id("error-code")).to_have_text("quota_exceeded")
            await expect(page.get_by_test_id("error-message")).to_contain_text("free quota")
            await expect(page.get_by_test_id("error-retry")).to_have_text(
                re.compile(r"^retry in \d+(\.\d)? s$")
            )
            await page.close()
            return traffic

        assert chromium.browser is not None
        traffic = await chromium.run(scenario(chromium.browser))
    assert traffic.problems == []
