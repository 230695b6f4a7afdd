"""A real gateway on port 0 over the scripted mesh: real sockets, no swarm."""

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import openai

from farmesh_ws.auth.credentials import Authenticator
from farmesh_ws.auth.siwe import SiweAuth
from farmesh_ws.config import Settings
from farmesh_ws.engine.allowances import BalanceHolds
from farmesh_ws.engine.events import Observer
from farmesh_ws.ledger.keys import KeyPrincipal
from farmesh_ws.mesh.fake import FAKE_MODEL_ID, FakeBackend
from farmesh_ws.mesh.status import MeshStatusCache
from farmesh_ws.metrics import Metrics
from farmesh_ws.state import StateStore
from farmesh_ws.state.memory import MemoryStateStore
from farmesh_ws.state.registry import SessionRegistry
from farmesh_ws.transport.ws import GatewayServer


async def fake_gateway(
    backend: FakeBackend,
    *,
    observers: Sequence[Observer] = (),
    keys: Mapping[str, KeyPrincipal] | None = None,
    siwe: bool = False,
    holds: BalanceHolds | None = None,
    store: StateStore | None = None,
    **overrides: Any,
) -> GatewayServer:
    """A gateway on ``backend``; ``keys`` maps API keys to their principals (the ledger's key
    store is tested on its own). With ``siwe``, Sign-In with Ethereum (``/auth/nonce``, signed
    messages, session tokens) is the real :class:`SiweAuth` over the gateway's state store, as
    ``serve`` wires it. ``holds``: prepaid holds (none by default); ``store``: a state store
    shared with other gateways (a new in-process one by default). ``auth`` defaults to
    ``off`` (wallet claims billed as named)."""
    overrides.setdefault("auth", "off")
    settings = replace(Settings(port=0, default_model_id=FAKE_MODEL_ID), **overrides)
    status = MeshStatusCache(
        backend.model_ids,
        backend.coverage,
        refresh_s=60,
        discover=backend.discover,
        served_prefixes=frozenset(backend.model_ids),
    )
    await status.refresh()
    known = keys if keys is not None else {}  # not copied: a test may revoke a key

    async def verify(presented_key: str) -> KeyPrincipal | None:
        return known.get(presented_key)

    store = store or MemoryStateStore()
    sign_in = SiweAuth(store, settings) if siwe else None
    server = GatewayServer(
        settings,
        backend,
        status,
        Metrics(),
        observers=observers,
        registry=SessionRegistry(store),
        authenticator=Authenticator(settings, keys=verify, sessions=sign_in, siwe=sign_in),
        nonces=sign_in,
        holds=holds,
    )
    await server.start()
    return server


def openai_client(server: GatewayServer, api_key: str | None) -> openai.AsyncOpenAI:
    """The official SDK on the gateway's HTTP API; no retries, so each error shows at once.
    ``api_key`` None: no Authorization header (each call also passes ``NO_KEY`` as its
    ``extra_headers``, as the SDK asks for an explicitly omitted credential)."""
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.http.port}/v1",
        api_key=api_key or "unused",
        max_retries=0,
        default_headers=NO_KEY if api_key is None else {},
    )


NO_KEY: dict[str, Any] = {"Authorization": openai.Omit()}
