"""Sign-In with Ethereum (EIP-4361) sessions, over the shared state store (protocol.md §2.1).

:meth:`SiweAuth.issue_nonce` hands out a single-use nonce and the values the message must
carry; :meth:`SiweAuth.sign_in` checks a signed message and returns a session token
``fms_<43 characters>``; :meth:`SiweAuth.authenticate_token` turns that token back into its
wallet on every gateway sharing the store. Parsing and signature recovery are the ``siwe``
library's (EIP-191 recovery through ``eth-account``); nothing cryptographic is written here.

What :meth:`~SiweAuth.sign_in` checks, citing EIP-4361:

- *Relying Party Implementer Steps, Verifying a signed message*: the message "MUST be checked for
  conformance to the ABNF" (*ABNF Message Format*). siwe's regular-expression parser encodes that
  grammar and its model validates each field (EIP-55 ``address``, RFC 3986 ``uri``, RFC 3339
  times, ``nonce`` of at least 8 alphanumerics, ``version`` 1); the message must then be exactly
  the one those fields serialise to, with a ``statement`` of the ABNF's characters only, and at
  most 2048 characters. siwe's ABNF parser itself is not used: its time grows faster than the
  message (a 1000-character URI took 3 s here), which any client could spend on the event loop.
- The same step: "checked against expected term values after parsing": ``domain`` equals
  ``siwe_domain`` (else the ``Host`` the client connected to; *Security Considerations,
  Verification of domain binding*), ``chain-id`` equals ``siwe_chain_id`` (*Message Field
  Descriptions*: the EIP-155 chain the session is bound to).
- *Message Field Descriptions*, ``expiration-time``, ``not-before``, ``issued-at``: an
  ``Expiration Time`` is required here and must be in the future, ``Not Before`` must have
  passed, and ``Issued At`` may be ahead of this clock by at most :data:`CLOCK_SKEW_S`.
- *Security Considerations, Preventing replay attacks*: the ``nonce`` must be one this gateway
  issued (for the same domain), and it is taken from the store before any other check, so it is
  used up even by a sign-in that fails.
- *Signing and Verifying with Ethereum Accounts*: EIP-191 recovery must give the message's
  ``address``. Contract accounts (EIP-1271) would need an Ethereum node and are refused.
- *Creating sessions*: the session is bound to the address alone, and lasts
  ``siwe_session_ttl_s`` but never past the message's ``Expiration Time``.

The store keeps a session under the SHA-256 of its token, never the token (the rationale of
:mod:`farmesh_ws.ledger.keys`: a random 256-bit secret needs no slow hash), so looking it up by
that digest needs no constant-time comparison. Refusals raise
:class:`~farmesh_ws.errors.Unauthorized` with one line that repeats neither the signature nor
the message; a state store that raises raises :class:`~farmesh_ws.errors.AuthUnavailable`.
"""

import asyncio
import hashlib
import re
import secrets
import time
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from eth_keys.exceptions import BadSignature

from farmesh_ws.config import Settings
from farmesh_ws.errors import AuthUnavailable, Unauthorized
from farmesh_ws.state.base import StateStore

with warnings.catch_warnings():
    # siwe imports web3, which imports websockets.legacy (deprecated in websockets 14) for a
    # provider this module never uses.
    warnings.filterwarnings("ignore", "websockets.legacy is deprecated", DeprecationWarning)
    import siwe  # type: ignore[import-untyped]

TOKEN_PREFIX = "fms_"
STATEMENT = "Sign in to farmesh-ws to use the mesh."
CLOCK_SKEW_S = 60.0
"""How far a client's ``Issued At`` may be ahead of this gateway's clock."""
MAX_MESSAGE_CHARS = 2048
_MAX_DOMAIN_CHARS = 253  # RFC 1035 §2.3.4, written as text

_TOKEN = re.compile(r"fms_[A-Za-z0-9_-]{43}")
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
# ABNF ``statement = *( reserved / unreserved / " " )`` (RFC 3986 §2.2, §2.3).
_STATEMENT = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;= ]*")
_NONCE_KEY = "siwe-nonce:"
_SESSION_KEY = "siwe-session:"


@dataclass(frozen=True, slots=True)
class NonceGrant:
    """What ``GET /auth/nonce`` answers: a nonce valid until ``expires_at`` (Unix s) and the
    values the signed message must carry."""

    nonce: str
    expires_at: float
    domain: str
    uri: str
    chain_id: int
    statement: str


@dataclass(frozen=True, slots=True)
class SiweSession:
    """A signed-in wallet (EIP-55 checksummed) and its bearer token, valid until
    ``expires_at`` (Unix s). The token is returned here only; the store keeps its digest."""

    token: str
    wallet: str
    expires_at: float


class SiweAuth:
    """Nonces, sign-ins and session tokens of one gateway process; ``now`` is the Unix clock."""

    def __init__(
        self, store: StateStore, settings: Settings, *, now: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._settings = settings
        self._now = now

    async def issue_nonce(self, *, domain: str, uri: str) -> NonceGrant:
        """A fresh nonce for a message to ``siwe_domain`` (else ``domain``, the ``Host`` the
        client asked) and ``uri``, kept ``siwe_nonce_ttl_s``. Raises AuthUnavailable."""
        expected = self._expected_domain(domain)
        nonce = siwe.generate_nonce()
        ttl_s = self._settings.siwe_nonce_ttl_s
        async with _guarded():
            await self._store.put_value(_NONCE_KEY + nonce, expected, ttl_s)
        return NonceGrant(
            nonce=nonce,
            expires_at=self._now() + ttl_s,
            domain=expected,
            uri=uri,
            chain_id=self._settings.siwe_chain_id,
            statement=STATEMENT,
        )

    async def sign_in(self, message: str, signature: str, *, domain: str) -> SiweSession:
        """Check a signed EIP-4361 message (see the module docstring) and start a session.

        ``domain`` is the ``Host`` the client connected to, the expected domain unless
        ``siwe_domain`` is set. Raises Unauthorized, or AuthUnavailable if the store fails.
        """
        parsed = _parse(message)
        async with _guarded():
            issued_for = await self._store.take_value(_NONCE_KEY + parsed.nonce)
        now = self._now()
        expected = self._expected_domain(domain)
        if parsed.domain != expected:
            raise Unauthorized(f"the sign-in message must be for the domain {expected}")
        if issued_for is None:
            raise Unauthorized("unknown, expired or used nonce; get a new one from /auth/nonce")
        if issued_for != expected:
            raise Unauthorized("the nonce was issued for another domain")
        chain_id = self._settings.siwe_chain_id
        if parsed.chain_id != chain_id:
            raise Unauthorized(f"the sign-in message must be for Chain ID {chain_id}")
        expires_at = _check_times(parsed, now)
        if not _SIGNATURE.fullmatch(signature):
            raise Unauthorized("the signature must be 0x and 130 hex digits (65 bytes)")
        if parsed.statement != STATEMENT or urlsplit(parsed.uri).netloc != expected:
            raise Unauthorized(
                f"the sign-in message must carry this gateway's statement and a URI on {expected}"
            )
        try:  # a recovery takes milliseconds of CPU: off the event loop
            await asyncio.to_thread(
                parsed.verify,
                signature,
                domain=expected,
                nonce=parsed.nonce,
                timestamp=datetime.fromtimestamp(now, UTC),
            )
        except (siwe.VerificationError, BadSignature):  # BadSignature: no key recovers from it
            raise Unauthorized("the signature does not recover to the message's address") from None
        expires_at = min(now + self._settings.siwe_session_ttl_s, expires_at)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        wallet = str(parsed.address)
        async with _guarded():
            await self._store.put_value(
                _SESSION_KEY + _digest(token), f"{wallet} {expires_at!r}", expires_at - now
            )
        return SiweSession(token=token, wallet=wallet, expires_at=expires_at)

    async def authenticate_token(self, token: str) -> tuple[str, float] | None:
        """``(wallet, expires_at)`` of a live session token, else None (malformed, unknown or
        expired; a malformed one costs no store call). Raises AuthUnavailable."""
        if not _TOKEN.fullmatch(token):
            return None
        async with _guarded():
            stored = await self._store.get_value(_SESSION_KEY + _digest(token))
        if stored is None:
            return None
        wallet, _, expires_at = stored.partition(" ")
        if float(expires_at) <= self._now():
            return None
        return wallet, float(expires_at)

    def _expected_domain(self, domain: str) -> str:
        """``siwe_domain``, else the ``Host`` the client named, only on a loopback bind.

        Off loopback a client chooses its ``Host``, so a message a wallet signed for any other
        site (whose domain that site's users see and trust) would pass the domain check here;
        the gateway must know its own domain (EIP-4361, Security Considerations, "Verification
        of domain binding"). Raises Unauthorized.
        """
        if self._settings.siwe_domain:
            return self._settings.siwe_domain
        if not self._settings.loopback_bind:
            raise Unauthorized("Sign-In with Ethereum needs FARMESH_SIWE_DOMAIN on this gateway")
        if not 0 < len(domain) <= _MAX_DOMAIN_CHARS:
            raise Unauthorized("the Host header is not a domain a message can name")
        return domain


def _parse(message: str) -> Any:
    """The ``siwe.SiweMessage`` of a conforming message; raises Unauthorized."""
    if len(message) > MAX_MESSAGE_CHARS:
        raise Unauthorized(f"the sign-in message is longer than {MAX_MESSAGE_CHARS} characters")
    try:
        parsed = siwe.SiweMessage.from_message(message, abnf=False)
    except ValueError:  # a mismatch, or a field its model refuses (pydantic's is a ValueError)
        parsed = None
    if (
        parsed is None
        or parsed.prepare_message() != message
        or not _STATEMENT.fullmatch(parsed.statement or "")
    ):
        raise Unauthorized("not an EIP-4361 sign-in message")
    return parsed


def _check_times(parsed: Any, now: float) -> float:
    """The message's ``Expiration Time`` (Unix s) once every time in it allows a sign-in
    ``now``; raises Unauthorized."""
    if parsed.expiration_time is None:
        raise Unauthorized("the sign-in message needs an Expiration Time")
    expires_at = _unix(parsed.expiration_time)
    if expires_at <= now:
        raise Unauthorized("the sign-in message has expired")
    if parsed.not_before is not None and _unix(parsed.not_before) >= now:
        raise Unauthorized("the sign-in message is not valid yet (Not Before)")
    if _unix(parsed.issued_at) > now + CLOCK_SKEW_S:
        raise Unauthorized("the sign-in message's Issued At is in the future")
    return expires_at


def _unix(timestamp: str) -> float:
    """An RFC 3339 time (always with an offset, as the grammar requires) in Unix seconds."""
    return datetime.fromisoformat(timestamp).timestamp()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


@asynccontextmanager
async def _guarded() -> AsyncIterator[None]:
    """A state store that raises (rather than degrading) as AuthUnavailable, naming only the
    exception type."""
    try:
        yield
    except Exception as exc:
        raise AuthUnavailable(
            f"sign-in state cannot be reached right now ({type(exc).__name__}); retry"
        ) from exc
