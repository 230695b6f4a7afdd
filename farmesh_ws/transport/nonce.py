"""``GET /auth/nonce``: what a Sign-In with Ethereum message must carry (protocol.md §2.1).

Answers ``{"nonce","expires_at","domain","uri","chain_id","statement"}`` with a fresh
single-use nonce; the domain is ``siwe_domain`` when configured, else the request's ``Host``
(EIP-4361 "Verifying a signed message": the domain must be the relying party's own).
404 ``not_found`` when sign-in is not enabled, 503 ``auth_unavailable`` when the state store
cannot keep the nonce.
"""

from http import HTTPStatus
from typing import Any, Protocol

from websockets.http11 import Request

from farmesh_ws.config import Settings
from farmesh_ws.errors import AuthUnavailable


class NonceGrantLike(Protocol):
    @property
    def nonce(self) -> str: ...

    @property
    def expires_at(self) -> float: ...

    @property
    def domain(self) -> str: ...

    @property
    def uri(self) -> str: ...

    @property
    def chain_id(self) -> int: ...

    @property
    def statement(self) -> str: ...


class NonceIssuer(Protocol):
    """Issues sign-in nonces (:class:`farmesh_ws.auth.siwe.SiweAuth`)."""

    async def issue_nonce(self, *, domain: str, uri: str) -> NonceGrantLike: ...


async def nonce_route(
    nonces: NonceIssuer | None, request: Request, settings: Settings
) -> tuple[HTTPStatus, dict[str, Any]]:
    """The status and JSON body answering one ``GET /auth/nonce``."""
    if nonces is None:
        return HTTPStatus.NOT_FOUND, {"error": "not_found", "path": request.path}
    host = request.headers.get("Host") or ""
    domain = settings.siwe_domain or host
    uri = f"https://{domain}/" if settings.siwe_domain else f"http://{host}/"
    try:
        grant = await nonces.issue_nonce(domain=domain, uri=uri)
    except AuthUnavailable as exc:
        return HTTPStatus.SERVICE_UNAVAILABLE, {"error": exc.code, "message": exc.message}
    return HTTPStatus.OK, {
        "nonce": grant.nonce,
        "expires_at": grant.expires_at,
        "domain": grant.domain,
        "uri": grant.uri,
        "chain_id": grant.chain_id,
        "statement": grant.statement,
    }
