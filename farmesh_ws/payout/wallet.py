"""Payout wallets: Ethereum addresses in their EIP-55 checksummed form (eth-utils)."""

from eth_utils.address import is_address, to_checksum_address


def checksum_wallet(wallet: str) -> str:
    """``wallet`` in its EIP-55 checksummed form; raises ValueError if it is not a 20-byte hex
    address (any case is accepted)."""
    if not is_address(wallet):
        raise ValueError(f"{wallet!r} is not an Ethereum address (0x and 40 hex digits)")
    return str(to_checksum_address(wallet))
