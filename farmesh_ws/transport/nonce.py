"""``GET /auth/nonce``: what a Sign-In with Ethereum message must carry (protocol.md §2.1).

Answers ``{"nonce","expires_at","domain","uri","chain_id","statement"}`` with a fresh
single-use nonce; the domain is ``siwe_domain`` when configured, else the request's ``Host``
(EIP-4361 "Verifying a signed message": the domain must be the relying party's own). With
``?address=0x…`` (40 hex digits in any case) it also answers ``address``, the EIP-55 form a
message must carry (wallets answer in lower case; eth-utils computes the checksum, so a page
needs no Keccak of its own). 400 ``invalid_address`` for another ``address``, 404
``not_found`` when sign-in is not enabled, 503 ``auth_unavailable`` when the state store cannot
keep the nonce.
"""

import re
from http import HTTPStatus
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

from eth_utils.address import to_checksum_address
from websockets.http11 import Request

from farmesh_ws.config import Settings
from farmesh_ws.errors import AuthUnavailable, Unauthorized

_HEX_ADDRESS: Final = re.compile(r"0x[0-9a-fA-F]{40}")


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
        return HTTPStatus.NOT_FOUND, {"error": "not_found", "path": request.path.split("?")[0]}
    query = parse_qs(urlsplit(request.path).query)
    address = query.get("address", [None])[-1]
    if address is not None and not _HEX_ADDRESS.fullmatch(address):
        return HTTPStatus.BAD_REQUEST, {"error": "invalid_address"}
    host = request.headers.get("Host") or ""
    domain = settings.siwe_domain or host
    uri = f"https://{domain}/" if settings.siwe_domain else f"http://{host}/"
    try:
        grant = await nonces.issue_nonce(domain=domain, uri=uri)
    except AuthUnavailable as exc:
        return HTTPStatus.SERVICE_UNAVAILABLE, {"error": exc.code, "message": exc.message}
    except Unauthorized as exc:  # no domain a message could name (siwe.py)
        return HTTPStatus.BAD_REQUEST, {"error": exc.code, "message": exc.message}
    body: dict[str, Any] = {
        "nonce": grant.nonce,
        "expires_at": grant.expires_at,
        "domain": grant.domain,
        "uri": grant.uri,
        "chain_id": grant.chain_id,
        "statement": grant.statement,
    }
    if address is not None:
        body["address"] = to_checksum_address(address)
    return HTTPStatus.OK, body
