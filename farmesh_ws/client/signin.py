"""Sign-In with Ethereum for the client (EIP-4361, protocol.md §2.1): a single-use nonce from
the gateway's ``GET /auth/nonce``, the EIP-4361 message made from it (``siwe``), signed by an
eth-account key (EIP-191 ``personal_sign``).

``siwe`` and ``eth_account`` are imported when a sign-in happens, not with the client: they
take seconds to import and most clients never sign in.
"""

import asyncio
import http.client
import urllib.error
import urllib.parse
import urllib.request
import warnings
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

import msgspec

from farmesh_ws import __version__
from farmesh_ws import protocol as p
from farmesh_ws.client.errors import ConnectFailed, FarmeshClientError, http_refusal

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

NONCE_PATH: Final = "/auth/nonce"
MAX_REPLY_BYTES: Final = 65536


class Nonce(msgspec.Struct, frozen=True, kw_only=True):
    """What ``GET /auth/nonce`` answers: a single-use nonce valid until ``expires_at`` (Unix
    s) and the values the signed message must carry."""

    nonce: str
    expires_at: float
    domain: str
    uri: str
    chain_id: int
    statement: str | None = None


def nonce_url(ws_url: str) -> str:
    """The gateway's ``/auth/nonce`` address from its WebSocket URL: same host and port."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, NONCE_PATH, "", ""))


async def fetch_nonce(ws_url: str, *, timeout_s: float) -> Nonce:
    """A fresh nonce from the gateway at ``ws_url``. Raises :class:`ConnectFailed` if the
    gateway cannot be reached, the error of the gateway's ``{"error": code}`` if it refuses
    (e.g. ``auth_unavailable``), ``protocol_error`` for an answer of the wrong shape."""
    url = nonce_url(ws_url)
    body = await asyncio.to_thread(_get, url, timeout_s)
    try:
        return msgspec.json.decode(body, type=Nonce)
    except msgspec.MsgspecError as exc:
        raise FarmeshClientError("protocol_error", f"malformed answer from {url}: {exc}") from None


def _get(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(
        url, headers={"User-Agent": f"farmesh-ws-client/{__version__}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body: bytes = reply.read(MAX_REPLY_BYTES)
            return body
    except urllib.error.HTTPError as exc:
        try:
            code, message = http_refusal(exc.read(MAX_REPLY_BYTES)) or ("http_error", "")
        finally:
            exc.close()
        where = f"GET {url} answered HTTP {exc.code}"
        raise FarmeshClientError.from_code(
            code, f"{message} ({where})" if message else where
        ) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # unreachable, timeout
        raise ConnectFailed(f"cannot get a sign-in nonce from {url}: {exc}") from None


def message_text(
    nonce: Nonce, address: str, *, issued_at: datetime, expiration_time: datetime
) -> str:
    """The EIP-4361 message for ``address`` (EIP-55) with the gateway's nonce, domain, URI,
    chain id and statement. Raises ``protocol_error`` if those cannot make one."""
    import pydantic

    with warnings.catch_warnings():
        # siwe imports web3, which imports websockets.legacy (deprecated): not the caller's
        # business.
        warnings.simplefilter("ignore", DeprecationWarning)
        from siwe import ISO8601Datetime, SiweMessage  # type: ignore[import-untyped]

    try:
        message = SiweMessage(
            domain=nonce.domain,
            address=address,
            statement=nonce.statement,
            uri=nonce.uri,
            version="1",
            chain_id=nonce.chain_id,
            nonce=nonce.nonce,
            issued_at=ISO8601Datetime.from_datetime(issued_at),
            expiration_time=ISO8601Datetime.from_datetime(expiration_time),
        )
    except pydantic.ValidationError as exc:
        raise FarmeshClientError(
            "protocol_error", f"the gateway's nonce cannot make a sign-in message: {exc}"
        ) from None
    text: str = message.prepare_message()
    return text


def sign(account: "LocalAccount", message: str) -> p.SiweProof:
    """``message`` signed by ``account`` as ``personal_sign`` does (EIP-191, version 0x45),
    for ``{"type":"auth","siwe":…}``."""
    from eth_account.messages import encode_defunct

    signed = account.sign_message(encode_defunct(text=message))
    return p.SiweProof(message=message, signature="0x" + bytes(signed.signature).hex())


async def signed_sign_in(
    ws_url: str, account: "LocalAccount", *, timeout_s: float, valid_for_s: float
) -> p.SiweProof:
    """A nonce from the gateway, the message made with it for ``account``, valid from now
    for ``valid_for_s`` seconds (the session token never outlives it), and its signature."""
    nonce = await fetch_nonce(ws_url, timeout_s=timeout_s)
    issued_at = datetime.now(UTC)
    text = message_text(
        nonce,
        account.address,
        issued_at=issued_at,
        expiration_time=issued_at + timedelta(seconds=valid_for_s),
    )
    return sign(account, text)
