"""Who a request comes from, as proven by credentials (ARCHITECTURE.md §3: "Identity comes
from credentials, never from a claim").

A :class:`Principal` is made by the gateway's authentication (:mod:`farmesh_ws.auth`) from an
API key, a Sign-In with Ethereum (EIP-4361) session, or no credentials at all, and travels with
every request into the engine. Its ``quota_key`` names the bucket every cap and the rate limit
count against: the key or the signed wallet, and for anonymous use the hashed client address.
"""

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum

from farmesh_ws.errors import WalletMismatch


class PrincipalKind(StrEnum):
    """``key``: an API key bound to a wallet; ``wallet``: a wallet proven by an EIP-4361
    signature; ``anonymous``: no credentials, allowed by ``FARMESH_AUTH=optional``; ``open``:
    ``FARMESH_AUTH=off``, where a message's ``user_wallet`` is trusted as it is (insecure)."""

    KEY = "key"
    WALLET = "wallet"
    ANONYMOUS = "anonymous"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-principal overrides of the configured caps (protocol.md §9), e.g. an API key's own
    quota (``farmesh-ws keys create --max-sessions N``); None keeps the configured value.
    ``requests_per_minute`` is a rate, the others counts of things held at once."""

    max_connections: int | None = None
    max_requests: int | None = None
    max_sessions: int | None = None
    max_reserved_tokens: int | None = None
    requests_per_minute: float | None = None


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Principal:
    """``subject``: the key id, the signed wallet address, or ``anonymous`` / ``open``;
    ``wallet``: the one wallet this principal may bill (None for anonymous and open);
    ``address_hash``: the keyed hash of the client's network address (:func:`hash_address`);
    ``limits``: this principal's own caps, where it has any."""

    kind: PrincipalKind
    subject: str
    wallet: str | None
    address_hash: str
    limits: Limits = NO_LIMITS

    @property
    def principal_id(self) -> str:
        """``key:fk_…``, ``wallet:0x…``, ``anonymous`` or ``open``: what the ledger records."""
        if self.kind in (PrincipalKind.ANONYMOUS, PrincipalKind.OPEN):
            return self.kind.value
        return f"{self.kind.value}:{self.subject}"

    @property
    def anonymous(self) -> bool:
        """True when no credentials back this principal (anonymous or auth off)."""
        return self.kind in (PrincipalKind.ANONYMOUS, PrincipalKind.OPEN)

    @property
    def quota_key(self) -> str:
        """The bucket for caps and the rate limit: the principal, or per address when anonymous."""
        if self.anonymous:
            return f"{self.kind.value}:{self.address_hash}"
        return self.principal_id

    def billed_wallet(self, claim: str | None) -> str | None:
        """The wallet a request bills when its message names ``claim`` (or nothing).

        A proven wallet bills itself; naming another is refused. Anonymous use bills no wallet,
        so naming one is refused too (sign in or use a key to bill it). With auth off the claim
        is taken as it is. ``0x`` addresses compare without case (EIP-55 checksums are case).
        Raises :class:`~farmesh_ws.errors.WalletMismatch`.
        """
        if self.kind is PrincipalKind.OPEN:
            return claim
        if claim is None or (self.wallet is not None and same_wallet(claim, self.wallet)):
            return self.wallet
        if self.wallet is None:
            raise WalletMismatch(
                "anonymous requests cannot bill a wallet; authenticate with an API key or "
                "Sign-In with Ethereum"
            )
        raise WalletMismatch(f"user_wallet is not the wallet of {self.principal_id}")


def same_wallet(a: str, b: str) -> bool:
    """Equal wallets; hex addresses (``0x`` + 40 hex digits) compare without case."""
    if _is_hex_address(a) and _is_hex_address(b):
        return a.lower() == b.lower()
    return a == b


def _is_hex_address(wallet: str) -> bool:
    body = wallet[2:]
    return (
        wallet[:2] in ("0x", "0X")
        and len(body) == 40
        and all(c in "0123456789abcdefABCDEF" for c in body)
    )


def hash_address(address: str, key: bytes) -> str:
    """HMAC-SHA256 of a client address under ``key``, first 16 hex digits (64 bits).

    Keyed, because a plain hash of an IPv4 address is reversed by trying all 2³² of them;
    16 digits keep collisions between real clients negligible for per-address caps.
    """
    return hmac.new(key, address.encode(), hashlib.sha256).hexdigest()[:16]
