"""Payout identity: which wallet a Petals server's work is paid to, proven by its libp2p key.

- :mod:`.wallet`: payout wallets in EIP-55 form;
- :mod:`.statement`: the signed statement binding a wallet to a peer id, and its verification;
- :mod:`.identity`: the persistent identity file a server's p2p daemon runs with;
- :mod:`.dht`: where statements are published (one DHT key) and how they are fetched;
- :mod:`.bindings`: the coordinator's cache of verified bindings, read by attribution;
- :mod:`.command`: ``farmesh-ws payout publish``, for a provider's own Petals server.
"""
