"""Test helpers: a Unix clock the test moves, and a wallet that signs EIP-4361 messages."""

from dataclasses import dataclass, field
from datetime import UTC, datetime

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_account.signers.local import LocalAccount

from farmesh_ws.auth.siwe import NonceGrant, SiweAuth, SiweSession
from farmesh_ws.config import Settings
from farmesh_ws.state import StateStore

HOST = "127.0.0.1:8100"
URI = f"http://{HOST}"


class Clock:
    """Unix seconds, moved only by the test (SiweAuth's ``now``, the memory store's clock)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def iso(unix_s: float) -> str:
    """RFC 3339 in UTC with milliseconds, as wallets write ``Issued At``."""
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass
class Wallet:
    account: LocalAccount = field(default_factory=Account.create)

    @property
    def address(self) -> str:
        return str(self.account.address)

    def sign(self, message: str) -> str:
        signed = self.account.sign_message(encode_defunct(text=message))
        return "0x" + bytes(signed.signature).hex()


def message_for(
    grant: NonceGrant,
    address: str,
    *,
    now: float,
    valid_for_s: float | None = 600,
    **fields: object,
) -> str:
    """The EIP-4361 message a client builds from ``grant``; ``fields`` override any field."""
    # Imported here, after farmesh_ws.auth.siwe has imported siwe without web3's warning.
    from siwe import SiweMessage  # type: ignore[import-untyped]

    values: dict[str, object] = {
        "domain": grant.domain,
        "address": address,
        "statement": grant.statement,
        "uri": grant.uri,
        "version": "1",
        "chain_id": grant.chain_id,
        "nonce": grant.nonce,
        "issued_at": iso(now),
    }
    if valid_for_s is not None:
        values["expiration_time"] = iso(now + valid_for_s)
    values.update(fields)
    text: str = SiweMessage(**values).prepare_message()
    return text


class Gateway:
    """A SiweAuth with its clock, and the client's side of a sign-in."""

    def __init__(self, store: StateStore, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.auth = SiweAuth(store, settings, now=clock)

    async def signed(
        self, wallet: Wallet, *, valid_for_s: float | None = 600, **fields: object
    ) -> tuple[str, str]:
        """A nonce from this gateway, and a message with it signed by ``wallet``."""
        grant = await self.auth.issue_nonce(domain=HOST, uri=URI)
        text = message_for(
            grant, wallet.address, now=self.clock.now, valid_for_s=valid_for_s, **fields
        )
        return text, wallet.sign(text)

    async def sign_in(self, wallet: Wallet, *, valid_for_s: float = 600) -> SiweSession:
        text, signature = await self.signed(wallet, valid_for_s=valid_for_s)
        return await self.auth.sign_in(text, signature, domain=HOST)
