"""One connection's identity over its life (protocol.md §2.1), for every WebSocket path.

A connection starts with the principal of its handshake (an ``Authorization: Bearer``
credential, or none: anonymous or open, by mode) or, where credentials are required and none
came, with no principal until an ``auth`` message proves one. Each principal counts one
connection against its cap (:meth:`~farmesh_ws.engine.quotas.Quotas.connect`) while it is the
connection's. Raises only :class:`~farmesh_ws.errors.FarmeshError` subclasses.
"""

import time
from collections.abc import Callable

from farmesh_ws.auth.credentials import Authenticator, Credential
from farmesh_ws.core.principal import Principal
from farmesh_ws.engine.quotas import Quotas
from farmesh_ws.errors import InvalidRequest, Unauthorized


class ConnectionIdentity:
    """``principal`` is None while a ``required`` connection has not authenticated.
    ``address``: the client's network address; ``domain``: the host it connected to (the
    EIP-4361 domain a sign-in must name unless ``siwe_domain`` is set); ``on_authenticated``
    runs when a connection that had no principal gets one; ``credential`` is what proved
    ``principal`` at the handshake, looked up again every ``recheck_s``."""

    def __init__(
        self,
        authenticator: Authenticator,
        quotas: Quotas,
        *,
        principal: Principal | None,
        address: str,
        domain: str,
        credential: Credential | None = None,
        recheck_s: float = 30.0,
        on_authenticated: Callable[[], None] | None = None,
    ) -> None:
        self._authenticator = authenticator
        self._quotas = quotas
        self.principal = principal
        self._credential = credential
        self._recheck_s = recheck_s
        self._checked_at = time.monotonic()
        self._address = address
        self._domain = domain
        self._on_authenticated = on_authenticated

    @property
    def authenticated(self) -> bool:
        """True once credentials proved a principal (not anonymous or open)."""
        return self.principal is not None and not self.principal.anonymous

    def require(self) -> Principal:
        """The principal, or Unauthorized while credentials are still owed."""
        if self.principal is None:
            raise Unauthorized(
                'this gateway requires credentials: send {"type":"auth","token":"<API key>"} '
                "first, or connect with an Authorization: Bearer header"
            )
        return self.principal

    async def authenticate(
        self, *, token: str | None, message: str | None, signature: str | None
    ) -> Credential:
        """An ``auth`` message: a token, or a signed EIP-4361 message. Returns the credential
        (with a new session token after a sign-in). Raises InvalidRequest once authenticated,
        Unauthorized, AuthUnavailable or QuotaExceeded."""
        if self.authenticated:
            raise InvalidRequest("this connection is already authenticated")
        if token is not None and message is None:
            credential = await self._authenticator.from_token(token, self._address)
        elif token is None and message is not None and signature is not None:
            credential = await self._authenticator.sign_in(
                message, signature, domain=self._domain, address=self._address
            )
        else:
            raise InvalidRequest('send exactly one of "token" and "siwe"')
        principal = credential.principal
        self._quotas.connect(principal)
        if self.principal is not None:
            self._quotas.disconnect(self.principal)
        elif self._on_authenticated is not None:
            self._on_authenticated()
        self.principal = principal
        self._credential, self._checked_at = credential, time.monotonic()
        return credential

    async def current(self) -> Principal:
        """The principal, its credential still good: a session token not past its expiry, and
        every ``credential_recheck_s`` the key or token looked up again (a revoked key stops
        working on open connections too). Raises Unauthorized, AuthUnavailable."""
        principal = self.require()
        credential = self._credential
        if credential is None:
            return principal
        if credential.expires_at is not None and time.time() >= credential.expires_at:
            raise Unauthorized("the session token expired; sign in again")
        if time.monotonic() - self._checked_at >= self._recheck_s:
            await self._authenticator.from_token(credential.token, self._address)
            self._checked_at = time.monotonic()
        return principal

    def close(self) -> None:
        """The connection ended: its principal's connection slot is free again."""
        if self.principal is not None:
            self._quotas.disconnect(self.principal)
            self.principal = None
