"""Who may open a WebSocket, decided at the HTTP handshake (protocol.md §2.1, §9).

:class:`HandshakeGate` counts open connections (``max_connections``), per client address
(``max_connections_per_address``, IPv6 per /64) and those still owing credentials
(``max_pending_auth_per_address``), reads an ``Authorization: Bearer`` credential into a
principal, and takes the principal's connection slot. A refusal is an HTTP status and a JSON
``{"error": code, "message": ...}``: 401 ``unauthorized`` (with ``WWW-Authenticate: Bearer``,
RFC 6750 §3), 429 ``quota_exceeded``, 503 ``too_many_connections`` or ``auth_unavailable``.
"""

import asyncio
import ipaddress
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request

from farmesh_ws.auth.connection import ConnectionIdentity
from farmesh_ws.auth.credentials import Authenticator, Credential, bearer_token
from farmesh_ws.config import Settings
from farmesh_ws.core.principal import Principal
from farmesh_ws.engine.quotas import Quotas
from farmesh_ws.errors import AuthUnavailable, FarmeshError, QuotaExceeded, Unauthorized


@dataclass(frozen=True, slots=True)
class Refusal:
    status: HTTPStatus
    code: str
    message: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Admitted:
    """A handshake let through: its principal (None: credentials owed), address and host."""

    principal: Principal | None
    address: str
    domain: str
    credential: Credential | None


class HandshakeGate:
    """Per-address counters and handshake credentials for one gateway process."""

    def __init__(self, settings: Settings, authenticator: Authenticator, quotas: Quotas) -> None:
        self._settings = settings
        self.authenticator = authenticator
        self._quotas = quotas
        self._open: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._admitted: dict[ServerConnection, Admitted] = {}
        self._pending_connections: set[ServerConnection] = set()
        self._handled: set[ServerConnection] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self.total = 0
        """Connections admitted (or being admitted) and not closed yet, on every path."""

    async def check(self, connection: ServerConnection, request: Request) -> Refusal | None:
        """Admit a handshake or say why not; an admitted one is counted until it closes. The
        connection is counted (in all and for its address) before the credential lookup, so
        concurrent handshakes cannot all pass the caps while each waits on the ledger."""
        address = client_address(connection)
        settings = self._settings
        if self.total >= settings.max_connections:
            return Refusal(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "too_many_connections",
                f"this gateway holds its {settings.max_connections} connections; retry later",
            )
        if self._open[address] >= settings.max_connections_per_address:
            return Refusal(
                HTTPStatus.TOO_MANY_REQUESTS,
                "quota_exceeded",
                f"at most {settings.max_connections_per_address} connections per address",
            )
        self.total += 1
        self._open[address] += 1
        refusal = await self._admit(connection, request, address)
        if refusal is not None:
            self._forget_address(address)
            return refusal
        watcher = asyncio.create_task(self._forget_when_closed(connection))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return None

    async def _admit(
        self, connection: ServerConnection, request: Request, address: str
    ) -> Refusal | None:
        settings = self._settings
        try:
            token = bearer_token(request.headers.get("Authorization"))
            principal, credential = await self.authenticator.from_header(token, address)
        except (Unauthorized, AuthUnavailable) as exc:
            return _refusal(exc)
        if principal is None:
            if self._pending[address] >= settings.max_pending_auth_per_address:
                return Refusal(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    "quota_exceeded",
                    f"at most {settings.max_pending_auth_per_address} unauthenticated "
                    "connections per address",
                )
            self._pending[address] += 1
            self._pending_connections.add(connection)
        else:
            try:
                self._quotas.connect(principal)
            except QuotaExceeded as exc:
                return _refusal(exc)
        domain = request.headers.get("Host") or ""
        self._admitted[connection] = Admitted(principal, address, domain, credential)
        return None

    def identity(self, connection: ServerConnection) -> ConnectionIdentity:
        """The identity of an admitted connection, for its handler, which owns the principal's
        connection slot from now on (:meth:`ConnectionIdentity.close`)."""
        admitted = self._admitted[connection]
        self._handled.add(connection)
        return ConnectionIdentity(
            self.authenticator,
            self._quotas,
            principal=admitted.principal,
            address=admitted.address,
            domain=admitted.domain,
            credential=admitted.credential,
            recheck_s=self._settings.credential_recheck_s,
            on_authenticated=lambda: self._done_pending(connection),
        )

    async def _forget_when_closed(self, connection: ServerConnection) -> None:
        await connection.wait_closed()
        self._done_pending(connection)
        admitted = self._admitted.pop(connection)
        if connection not in self._handled and admitted.principal is not None:
            self._quotas.disconnect(admitted.principal)  # the handler never ran
        self._handled.discard(connection)
        self._forget_address(admitted.address)

    def _forget_address(self, address: str) -> None:
        self.total -= 1
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]

    def _done_pending(self, connection: ServerConnection) -> None:
        """A connection that owed credentials authenticated or closed (counted once)."""
        if connection not in self._pending_connections:
            return
        self._pending_connections.discard(connection)
        address = self._admitted[connection].address
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]


def client_address(connection: ServerConnection) -> str:
    """The client's IP address; an IPv6 one as its /64, which one subscriber usually holds
    whole (RFC 6177), so that a client cannot take a fresh per-address quota per address."""
    remote = connection.remote_address
    return normalized_address(str(remote[0]) if remote else None)


def normalized_address(host: str | None) -> str:
    """A client's IP address as :func:`client_address` counts it (IPv6: its /64)."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _refusal(error: FarmeshError) -> Refusal:
    if isinstance(error, Unauthorized):
        return Refusal(
            HTTPStatus.UNAUTHORIZED, error.code, error.message, (("WWW-Authenticate", "Bearer"),)
        )
    if isinstance(error, QuotaExceeded):
        return Refusal(HTTPStatus.TOO_MANY_REQUESTS, error.code, error.message)
    return Refusal(HTTPStatus.SERVICE_UNAVAILABLE, error.code, error.message)
