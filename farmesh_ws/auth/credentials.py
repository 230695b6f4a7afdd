"""Credentials to a :class:`~farmesh_ws.core.principal.Principal` (protocol.md §2.1).

:class:`Authenticator` is the one place a surface turns what a client presented (an API key
``fmk_…``, a Sign-In with Ethereum session token ``fms_…``, a signed EIP-4361 message, or
nothing) into the principal every request of that connection carries. It does not decide
what a principal may do: that is the engine's admission.

Errors: :class:`~farmesh_ws.errors.Unauthorized` for a credential that is malformed, unknown,
revoked or expired (and for no credential where ``auth`` is ``required``);
:class:`~farmesh_ws.errors.AuthUnavailable` when the ledger or state store cannot answer.
"""

import logging
import secrets
from dataclasses import dataclass
from typing import Protocol

from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal, PrincipalKind, hash_address
from farmesh_ws.errors import AuthUnavailable, Unauthorized
from farmesh_ws.ledger.keys import KEY_PREFIX, KeyPrincipal
from farmesh_ws.ledger.store import LedgerUnavailable

logger = logging.getLogger(__name__)

SESSION_TOKEN_PREFIX = "fms_"


class KeyVerifier(Protocol):
    """Looks up an API key (:func:`farmesh_ws.ledger.keys.authenticate` over a ledger)."""

    async def __call__(self, presented_key: str) -> KeyPrincipal | None: ...


@dataclass(frozen=True, slots=True)
class Credential:
    """A principal proven by ``token`` (an API key or session token), valid until
    ``expires_at`` (Unix s; None: until revoked). ``issued``: a sign-in just made the token, so
    the client must be given it."""

    principal: Principal
    token: str
    expires_at: float | None
    issued: bool = False


class SessionTokens(Protocol):
    """Sign-In with Ethereum sessions (:class:`farmesh_ws.auth.siwe.SiweAuth`)."""

    async def authenticate_token(self, token: str) -> tuple[str, float] | None: ...


class SiweSignIn(Protocol):
    async def sign_in(self, message: str, signature: str, *, domain: str) -> "SiweSessionLike": ...


class SiweSessionLike(Protocol):
    @property
    def token(self) -> str: ...

    @property
    def wallet(self) -> str: ...

    @property
    def expires_at(self) -> float: ...


class Authenticator:
    """Makes principals for one gateway process under ``settings.auth_mode``."""

    def __init__(
        self,
        settings: Settings,
        *,
        keys: KeyVerifier | None = None,
        sessions: SessionTokens | None = None,
        siwe: SiweSignIn | None = None,
    ) -> None:
        self.mode = settings.auth_mode
        self._keys = keys
        self._sessions = sessions
        self._siwe = siwe
        configured = settings.address_hash_key.encode()
        self._address_key = configured or secrets.token_bytes(32)

    def address_hash(self, address: str) -> str:
        return hash_address(address, self._address_key)

    def without_credentials(self, address: str) -> Principal | None:
        """The principal of a client that presented nothing: ``open`` (auth off),
        ``anonymous`` (optional), or None when credentials are required."""
        if self.mode == "required":
            return None
        kind = PrincipalKind.OPEN if self.mode == "off" else PrincipalKind.ANONYMOUS
        return Principal(kind, kind.value, None, self.address_hash(address))

    async def from_header(
        self, token: str | None, address: str
    ) -> tuple[Principal | None, Credential | None]:
        """The principal (and credential) of what an ``Authorization: Bearer`` header carried.

        No token: :meth:`without_credentials`. A token in one of this gateway's formats must
        be valid (:meth:`from_token`). A token in no format of ours (an OpenAI SDK's placeholder
        key such as ``sk-none``) counts as none where credentials are optional, and is refused
        where they are required. Raises Unauthorized, AuthUnavailable.
        """
        ours = token is not None and token.startswith((KEY_PREFIX, SESSION_TOKEN_PREFIX))
        if token is None or (not ours and self.mode != "required"):
            return self.without_credentials(address), None
        credential = await self.from_token(token, address)
        return credential.principal, credential

    async def from_token(self, token: str, address: str) -> Credential:
        """The principal of an API key or session token; raises Unauthorized/AuthUnavailable."""
        address_hash = self.address_hash(address)
        if token.startswith(KEY_PREFIX) and self._keys is not None:
            try:
                found = await self._keys(token)
            except LedgerUnavailable:
                raise AuthUnavailable("API keys cannot be checked right now; retry") from None
            if found is not None:
                principal = Principal(
                    PrincipalKind.KEY, found.key_id, found.wallet, address_hash, found.limits
                )
                return Credential(principal, token, None)
            raise Unauthorized("unknown or revoked API key")
        if token.startswith(SESSION_TOKEN_PREFIX) and self._sessions is not None:
            session = await self._sessions.authenticate_token(token)
            if session is not None:
                wallet, expires_at = session
                principal = Principal(PrincipalKind.WALLET, wallet, wallet, address_hash)
                return Credential(principal, token, expires_at)
            raise Unauthorized("unknown or expired session token; sign in again")
        raise Unauthorized(
            f"not a credential this gateway accepts (API keys start {KEY_PREFIX}, "
            f"session tokens {SESSION_TOKEN_PREFIX})"
        )

    async def sign_in(
        self, message: str, signature: str, *, domain: str, address: str
    ) -> Credential:
        """Verify an EIP-4361 message and its signature; raises Unauthorized/AuthUnavailable."""
        if self._siwe is None:
            raise Unauthorized("Sign-In with Ethereum is not enabled on this gateway")
        session = await self._siwe.sign_in(message, signature, domain=domain)
        principal = Principal(
            PrincipalKind.WALLET, session.wallet, session.wallet, self.address_hash(address)
        )
        return Credential(principal, session.token, session.expires_at, issued=True)


def bearer_token(authorization: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <token>`` header (RFC 6750 §2.1), or None
    if there is no header; raises Unauthorized for another scheme or an empty token."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise Unauthorized("the Authorization header must be 'Bearer <API key or session token>'")
    return token
