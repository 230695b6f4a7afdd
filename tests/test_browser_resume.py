"""The browser page resumes its chat by itself when the network drops (protocol.md §2.2):
headless Chromium through a proxy the test cuts, over the scripted mesh."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Locator, Page, expect

from farmesh_ws.mesh.fake import FakeBackend
from tests.engine.support import release
from tests.test_browser_page import (
    CHROMIUM,
    BrowserThread,
    finished_reply,
    running_chromium,
    send_turn,
)
from tests.transport.proxy import CuttableProxy
from tests.transport.support import fake_gateway

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")

REPLY = "Still here after the network came back."


@pytest.fixture
async def chromium() -> AsyncIterator[BrowserThread]:
    async with running_chromium() as runner:
        yield runner


async def test_a_turn_cut_by_a_network_drop_ends_whole_in_the_page(
    chromium: BrowserThread,
) -> None:
    gate = asyncio.Semaphore(0)
    gateway = await fake_gateway(FakeBackend(reply=REPLY, gate=gate))
    proxy = CuttableProxy(gateway.port)
    await proxy.start()
    browser = chromium.browser
    assert browser is not None
    try:

        async def start() -> tuple[Page, Locator]:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{proxy.port}/")
            status = page.get_by_test_id("conn-status")
            await expect(status).to_have_attribute("data-state", "open")
            turn = await send_turn(page, "hi")
            await expect(turn.get_by_test_id("reply")).to_have_text(REPLY[:3])
            return page, turn

        release(gate, 3)
        page, turn = await chromium.run(start())
        proxy.cut()
        release(gate, len(REPLY) + 2)
        text = await chromium.run(finished_reply(turn))
        assert text == REPLY
        connections = gateway.metrics.registry.get_sample_value("farmesh_connections_total")
        assert connections == 2  # the page's second connection resumed the same session
        await chromium.run(page.close())
    finally:
        await proxy.aclose()
        await gateway.shutdown()
