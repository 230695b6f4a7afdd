"""Sign-In with Ethereum (EIP-4361) against the memory store and a real Redis: real keys,
messages built and signed the way a wallet does, every refusal and the session tokens."""

import asyncio
import dataclasses
import hashlib
import re

import pytest

from farmesh_ws.auth.siwe import STATEMENT, SiweAuth
from farmesh_ws.config import Settings
from farmesh_ws.errors import AuthUnavailable, Unauthorized
from farmesh_ws.state import MemoryStateStore
from tests.auth.support import HOST, URI, Gateway, Wallet, iso, message_for


async def refused(gateway: Gateway, text: str, signature: str, match: str) -> None:
    """The sign-in is refused with a reason matching ``match`` that repeats no signature."""
    with pytest.raises(Unauthorized, match=match) as refusal:
        await gateway.auth.sign_in(text, signature, domain=HOST)
    assert signature[2:12] not in str(refusal.value)
    assert "\n" not in str(refusal.value)


async def test_nonce_grant(gateway: Gateway) -> None:
    grant = await gateway.auth.issue_nonce(domain=HOST, uri=URI)
    assert re.fullmatch(r"[A-Za-z0-9]{8,}", grant.nonce)
    assert grant.expires_at == gateway.clock.now + 300
    assert (grant.domain, grant.uri, grant.chain_id, grant.statement) == (HOST, URI, 1, STATEMENT)
    other = await gateway.auth.issue_nonce(domain=HOST, uri=URI)
    assert other.nonce != grant.nonce


async def test_configured_domain_wins_over_the_host(gateway: Gateway) -> None:
    settings = dataclasses.replace(gateway.settings, siwe_domain="mesh.example")
    auth = SiweAuth(gateway.store, settings, now=gateway.clock)
    grant = await auth.issue_nonce(domain=HOST, uri="https://mesh.example")
    assert grant.domain == "mesh.example"
    wallet = Wallet()
    text = message_for(grant, wallet.address, now=gateway.clock.now)
    session = await auth.sign_in(text, wallet.sign(text), domain=HOST)
    assert session.wallet == wallet.address


async def test_sign_in_then_the_token_authenticates(gateway: Gateway) -> None:
    wallet = Wallet()
    session = await gateway.sign_in(wallet)
    assert session.wallet == wallet.address  # EIP-55 checksummed
    assert re.fullmatch(r"fms_[A-Za-z0-9_-]{43}", session.token)
    assert session.expires_at == gateway.clock.now + 600  # the message expires before the TTL
    assert await gateway.auth.authenticate_token(session.token) == (
        wallet.address,
        session.expires_at,
    )
    # Another gateway process sharing the store.
    peer = SiweAuth(gateway.store, gateway.settings, now=gateway.clock)
    assert await peer.authenticate_token(session.token) == (wallet.address, session.expires_at)


async def test_session_lasts_at_most_the_configured_ttl(gateway: Gateway) -> None:
    session = await gateway.sign_in(Wallet(), valid_for_s=7 * 86400)
    assert session.expires_at == gateway.clock.now + 3600


async def test_the_store_keeps_only_the_token_digest(gateway: Gateway) -> None:
    session = await gateway.sign_in(Wallet())
    assert await gateway.store.get_value(f"siwe-session:{session.token}") is None
    digest = hashlib.sha256(session.token.encode()).hexdigest()
    stored = await gateway.store.get_value(f"siwe-session:{digest}")
    assert stored == f"{session.wallet} {session.expires_at!r}"


async def test_wrong_domain(gateway: Gateway) -> None:
    wallet = Wallet()
    text, signature = await gateway.signed(wallet, domain="evil.example")
    await refused(gateway, text, signature, "must be for the domain 127.0.0.1:8100")


async def test_nonce_issued_for_another_host(gateway: Gateway) -> None:
    wallet = Wallet()
    grant = await gateway.auth.issue_nonce(domain="other.example", uri=URI)
    text = message_for(grant, wallet.address, now=gateway.clock.now, domain=HOST)
    await refused(gateway, text, wallet.sign(text), "issued for another domain")


async def test_wrong_chain_id(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet(), chain_id=5)
    await refused(gateway, text, signature, "must be for Chain ID 1")


async def test_reused_nonce(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet())
    await gateway.auth.sign_in(text, signature, domain=HOST)
    await refused(gateway, text, signature, "unknown, expired or used nonce")


async def test_concurrent_sign_ins_with_one_nonce(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet())
    results = await asyncio.gather(
        *(gateway.auth.sign_in(text, signature, domain=HOST) for _ in range(5)),
        return_exceptions=True,
    )
    assert sum(not isinstance(result, BaseException) for result in results) == 1
    assert sum(isinstance(result, Unauthorized) for result in results) == 4


async def test_unknown_nonce(gateway: Gateway) -> None:
    wallet = Wallet()
    grant = await gateway.auth.issue_nonce(domain=HOST, uri=URI)
    text = message_for(grant, wallet.address, now=gateway.clock.now, nonce="Made0Up0Nonce")
    await refused(gateway, text, wallet.sign(text), "unknown, expired or used nonce")


async def test_a_failed_sign_in_uses_up_its_nonce(gateway: Gateway) -> None:
    wallet = Wallet()
    grant = await gateway.auth.issue_nonce(domain=HOST, uri=URI)
    wrong = message_for(grant, wallet.address, now=gateway.clock.now, chain_id=5)
    await refused(gateway, wrong, wallet.sign(wrong), "Chain ID")
    right = message_for(grant, wallet.address, now=gateway.clock.now)
    await refused(gateway, right, wallet.sign(right), "used nonce")


async def test_expired_message(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet(), valid_for_s=60)
    gateway.clock.advance(60)
    await refused(gateway, text, signature, "has expired")


async def test_missing_expiration(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet(), valid_for_s=None)
    assert "Expiration Time" not in text
    await refused(gateway, text, signature, "needs an Expiration Time")


async def test_not_before_in_the_future(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet(), not_before=iso(gateway.clock.now + 30))
    await refused(gateway, text, signature, "not valid yet")


async def test_not_before_passed(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet(), not_before=iso(gateway.clock.now - 1))
    await gateway.auth.sign_in(text, signature, domain=HOST)


async def test_issued_at_in_the_future(gateway: Gateway) -> None:
    ahead = gateway.clock.now + 120
    text, signature = await gateway.signed(Wallet(), issued_at=iso(ahead))
    await refused(gateway, text, signature, "Issued At is in the future")
    # Within the allowed skew a client's clock may run ahead.
    text, signature = await gateway.signed(Wallet(), issued_at=iso(gateway.clock.now + 30))
    await gateway.auth.sign_in(text, signature, domain=HOST)


async def test_signature_by_another_key(gateway: Gateway) -> None:
    text, _ = await gateway.signed(Wallet())
    await refused(gateway, text, Wallet().sign(text), "does not recover to the message's address")


async def test_tampered_message(gateway: Gateway) -> None:
    text, signature = await gateway.signed(Wallet())
    match = re.search(r"Expiration Time: (\S+Z)", text)  # tamper with one digit of it
    assert match is not None
    stamp = match.group(1)
    tampered = text.replace(stamp, stamp[:-2] + ("8" if stamp[-2] == "9" else "9") + "Z")
    assert tampered != text
    await refused(gateway, tampered, signature, "does not recover")


async def test_a_message_written_for_another_site_is_refused(gateway: Gateway) -> None:
    """Signed for this domain and nonce, but with another site's statement or URI: a wallet
    shows the statement, so only this gateway's own is accepted."""
    wallet = Wallet()
    for old, new in (
        ("Sign in to farmesh-ws to use the mesh.", "Sign in to Evil NFT Marketplace."),
        (f"URI: {URI}", "URI: https://evil.example/"),
    ):
        grant = await gateway.auth.issue_nonce(domain=HOST, uri=URI)
        text = message_for(grant, wallet.address, now=gateway.clock.now).replace(old, new)
        await refused(gateway, text, wallet.sign(text), "statement and a URI")


async def test_signed_for_another_address(gateway: Gateway) -> None:
    """A message naming a victim's address, signed by the attacker's own key."""
    victim, attacker = Wallet(), Wallet()
    grant = await gateway.auth.issue_nonce(domain=HOST, uri=URI)
    text = message_for(grant, victim.address, now=gateway.clock.now)
    await refused(gateway, text, attacker.sign(text), "does not recover")


@pytest.mark.parametrize(
    "signature",
    ["0x" + "00" * 65, "0x" + "ff" * 65, "0x" + "5a" * 64 + "1b", "0x" + "5a" * 64 + "07"],
)
async def test_signature_no_key_recovers_from(gateway: Gateway, signature: str) -> None:
    text, _ = await gateway.signed(Wallet())
    await refused(gateway, text, signature, "does not recover")


@pytest.mark.parametrize("signature", ["", "0x", "0x" + "ab" * 64, "zz" * 66, "0x" + "g" * 130])
async def test_malformed_signature(gateway: Gateway, signature: str) -> None:
    text, _ = await gateway.signed(Wallet())
    with pytest.raises(Unauthorized, match="130 hex digits"):
        await gateway.auth.sign_in(text, signature, domain=HOST)


async def test_not_a_sign_in_message(gateway: Gateway) -> None:
    wallet = Wallet()
    text, signature = await gateway.signed(wallet)
    for bad in ("", "hello", text + "\n", text.replace("Chain ID: 1", "Chain ID: 01")):
        await refused(gateway, bad, wallet.sign(bad), "not an EIP-4361 sign-in message")
    await refused(gateway, text + "x" * 2048, signature, "longer than 2048 characters")
    unicode = text.replace("the mesh.", "the mesh \u2713")
    await refused(gateway, unicode, wallet.sign(unicode), "not an EIP-4361 sign-in message")


async def test_long_fields_are_parsed_quickly(gateway: Gateway) -> None:
    """siwe's ABNF parser took seconds on a 1000-character URI; the checks here must not."""
    wallet = Wallet()
    text, _ = await gateway.signed(wallet, uri=URI + "/" + "a" * 1700)
    async with asyncio.timeout(1):
        await gateway.auth.sign_in(text, wallet.sign(text), domain=HOST)


@pytest.mark.parametrize(
    "token",
    ["", "fms_", "fms_short", "fmk_" + "a" * 43, "fms_" + "a" * 42 + "!", "fms_" + "a" * 44],
)
async def test_malformed_token_costs_no_store_call(gateway: Gateway, token: str) -> None:
    auth = SiweAuth(_Unreachable(), gateway.settings, now=gateway.clock)
    assert await auth.authenticate_token(token) is None


async def test_unknown_token(gateway: Gateway) -> None:
    assert await gateway.auth.authenticate_token("fms_" + "A" * 43) is None


async def test_expired_token(gateway: Gateway) -> None:
    settings = dataclasses.replace(gateway.settings, siwe_session_ttl_s=5)
    gateway = Gateway(gateway.store, settings, gateway.clock)
    session = await gateway.sign_in(Wallet())
    assert session.expires_at == gateway.clock.now + 5
    gateway.clock.advance(4.9)
    assert await gateway.auth.authenticate_token(session.token) is not None
    gateway.clock.advance(0.1)
    assert await gateway.auth.authenticate_token(session.token) is None


async def test_expired_nonce(gateway: Gateway) -> None:
    settings = dataclasses.replace(gateway.settings, siwe_nonce_ttl_s=0.05)
    gateway = Gateway(gateway.store, settings, gateway.clock)
    text, signature = await gateway.signed(Wallet())
    gateway.clock.advance(0.06)  # the memory store's clock
    await asyncio.sleep(0.06)  # Redis's
    await refused(gateway, text, signature, "unknown, expired or used nonce")


async def test_a_failing_store_is_auth_unavailable(gateway: Gateway) -> None:
    auth = SiweAuth(_Unreachable(), gateway.settings, now=gateway.clock)
    with pytest.raises(AuthUnavailable, match=r"\(OSError\); retry"):
        await auth.issue_nonce(domain=HOST, uri=URI)
    text, signature = await gateway.signed(Wallet())
    with pytest.raises(AuthUnavailable):
        await auth.sign_in(text, signature, domain=HOST)
    with pytest.raises(AuthUnavailable):
        await auth.authenticate_token("fms_" + "A" * 43)


class _Unreachable(MemoryStateStore):
    """A store whose values cannot be reached (a store that raises instead of degrading)."""

    async def put_value(self, key: str, value: str, ttl_s: float) -> None:
        raise OSError("unreachable")

    async def get_value(self, key: str) -> str | None:
        raise OSError("unreachable")

    async def take_value(self, key: str) -> str | None:
        raise OSError("unreachable")


async def test_off_loopback_the_domain_must_be_configured() -> None:
    """A client chooses its Host, so off loopback only FARMESH_SIWE_DOMAIN can say which domain
    messages must name (else a signature made for any other site would do)."""
    public = SiweAuth(MemoryStateStore(), Settings(host="0.0.0.0"))
    with pytest.raises(Unauthorized, match="FARMESH_SIWE_DOMAIN"):
        await public.issue_nonce(domain="evil.example", uri="https://evil.example/")
    named = SiweAuth(MemoryStateStore(), Settings(host="0.0.0.0", siwe_domain="mesh.example"))
    grant = await named.issue_nonce(domain="evil.example", uri="https://mesh.example/")
    assert grant.domain == "mesh.example"
