"""An asyncio client for farmesh_ws (protocol.md, version 1), for agents and tools.

::

    async with FarmeshClient.connect("ws://127.0.0.1:8100/ws") as client:
        chat = await client.open_chat(system_prompt="You are terse.")
        async for event in chat.send("What is the capital of France?", max_new_tokens=64):
            if isinstance(event, TokenEvent):
                print(event.text, end="")
        reply = await chat.ask("And of Germany?")  # the whole reply at once
        print(reply.text, reply.done.usage.cost_far)

A gateway that requires credentials (protocol.md §2.1) takes an API key or a session token at
the handshake, ``FarmeshClient.connect(url, token="fmk_…")``, or later on the connection,
``await client.authenticate("fmk_…")``; ``await client.sign_in_with_ethereum(account)`` signs
in with an eth-account key and returns an :class:`Identity` whose ``token`` serves later
connections. Refusals raise one exception class per error code (:class:`Unauthorized`,
:class:`QuotaExceeded` with its ``retry_after_s``, …).

One :class:`FarmeshClient` is one WebSocket connection, holding at most one chat session
(protocol.md §2). A single reader task decodes every frame and routes it by ``request_id`` to
the :class:`ReplyStream` that asked, so the caller never reads the socket itself; message types
this client does not know are ignored (§10). Money is ``Decimal`` end to end, as on the wire.
Every wait on the server is bounded by the client's ``timeout``.
"""

from farmesh_ws.client.connecting import connect
from farmesh_ws.client.connection import DEFAULT_TIMEOUT_S, FarmeshClient, Sampling
from farmesh_ws.client.errors import (
    AuthUnavailable,
    ConnectFailed,
    ConnectionLost,
    FarmeshClientError,
    InsufficientBalance,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    WalletMismatch,
)
from farmesh_ws.client.events import (
    ChatInfo,
    ContributionEvent,
    DoneEvent,
    Event,
    Identity,
    NodeShare,
    Reply,
    TokenEvent,
    Usage,
)
from farmesh_ws.client.stream import Chat, ReplyStream

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AuthUnavailable",
    "Chat",
    "ChatInfo",
    "ConnectFailed",
    "ConnectionLost",
    "ContributionEvent",
    "DoneEvent",
    "Event",
    "FarmeshClient",
    "FarmeshClientError",
    "Identity",
    "InsufficientBalance",
    "NodeShare",
    "QuotaExceeded",
    "RateLimited",
    "Reply",
    "ReplyStream",
    "RequestTimeout",
    "Sampling",
    "TokenEvent",
    "Unauthorized",
    "Usage",
    "WalletMismatch",
    "connect",
]
