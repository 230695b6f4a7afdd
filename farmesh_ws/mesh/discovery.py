"""What the mesh announces: models, the servers holding each model's blocks, and coverage.

Petals servers announce every block under ``<dht_prefix>.<index>`` and their model under
the ``_petals.models`` key (subkey = dht_prefix). These calls block on the DHT process, so
async callers run them in a worker thread and cache the result (``/models`` and
``/mesh/status`` must never wait on the DHT).

Import only after ``compat.apply()``.
"""

import re
from dataclasses import dataclass
from typing import Any

MODELS_KEY = "_petals.models"
DHT_QUERY_TIMEOUT_S = 10.0
MAX_ANNOUNCED_MODELS = 32
"""Models :func:`discover` looks at, at most: the DHT is written by anyone."""
MAX_ANNOUNCED_BLOCKS = 1024
"""An announced model with more blocks is ignored (real models have a few hundred at most)."""
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,100}")


@dataclass(frozen=True, slots=True)
class ServerSpan:
    """One server's announced span of blocks for a model."""

    peer_id: str
    public_name: str | None
    start: int
    end: int
    state: str
    throughput: float
    cache_tokens_left: int | None


@dataclass(frozen=True, slots=True)
class ModelCoverage:
    """Which servers hold which blocks of one model, and which blocks nobody serves."""

    dht_prefix: str
    num_blocks: int
    servers: tuple[ServerSpan, ...]
    missing_blocks: tuple[int, ...]

    @property
    def fully_served(self) -> bool:
        return not self.missing_blocks and self.num_blocks > 0

    def online_peer_ids(self) -> frozenset[str]:
        return frozenset(span.peer_id for span in self.servers if span.state == "ONLINE")


def block_uids(dht_prefix: str, num_blocks: int) -> list[str]:
    return [f"{dht_prefix}.{index}" for index in range(num_blocks)]


def model_coverage(
    dht: Any, dht_prefix: str, num_blocks: int, *, timeout_s: float = DHT_QUERY_TIMEOUT_S
) -> ModelCoverage:
    """Query the DHT for every block of a model (blocking, at most ``timeout_s``; a DHT that
    is shut down meanwhile would otherwise leave the caller waiting forever)."""
    from petals.data_structures import ServerState
    from petals.utils.dht import compute_spans, get_remote_module_infos

    infos = get_remote_module_infos(
        dht, block_uids(dht_prefix, num_blocks), latest=True, return_future=True
    ).result(timeout=timeout_s)
    missing = tuple(
        index
        for index, info in enumerate(infos)
        if not any(server.state == ServerState.ONLINE for server in info.servers.values())
    )
    spans = compute_spans(infos, min_state=ServerState.OFFLINE)
    servers = tuple(
        ServerSpan(
            peer_id=peer_id.to_base58(),
            public_name=span.server_info.public_name,
            start=span.start,
            end=span.end,
            state=span.server_info.state.name,
            throughput=float(span.server_info.throughput),
            cache_tokens_left=span.server_info.cache_tokens_left,
        )
        for peer_id, span in sorted(spans.items(), key=lambda item: (item[1].start, str(item[0])))
    )
    return ModelCoverage(dht_prefix, num_blocks, servers, missing)


def announced_models(dht: Any, *, timeout_s: float = DHT_QUERY_TIMEOUT_S) -> dict[str, int]:
    """Map each announced dht_prefix to its number of blocks (blocking, at most ``timeout_s``)."""
    entry = dht.get(MODELS_KEY, latest=True, return_future=True).result(timeout=timeout_s)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    models = {}
    for prefix, record in entry.value.items():
        value = getattr(record, "value", None)
        if isinstance(prefix, str) and isinstance(value, dict) and _SAFE_PREFIX.fullmatch(prefix):
            num_blocks = value.get("num_blocks")
            if isinstance(num_blocks, int) and 0 < num_blocks <= MAX_ANNOUNCED_BLOCKS:
                models[prefix] = num_blocks
    return dict(sorted(models.items())[:MAX_ANNOUNCED_MODELS])


def discover(dht: Any, *, skip: frozenset[str] = frozenset()) -> list[ModelCoverage]:
    """Coverage of every model the DHT announces but those in ``skip`` (blocking; at most
    :data:`MAX_ANNOUNCED_MODELS` models of at most :data:`MAX_ANNOUNCED_BLOCKS` blocks, with
    DHT-safe prefixes of at most 100 characters)."""
    return [
        model_coverage(dht, prefix, num_blocks)
        for prefix, num_blocks in announced_models(dht).items()
        if prefix not in skip
    ]
