"""The layout of a local swarm: which models, which servers over which blocks, and how they
run (:class:`SwarmConfig`); pure data and parsing, no processes."""

import json
from dataclasses import dataclass
from pathlib import Path

from farmesh_ws.byzantine import ByzantineSpec


@dataclass(frozen=True, slots=True)
class SwarmModel:
    """One more model a swarm serves next to its main one (:class:`SwarmConfig`'s): a model
    folder Petals servers load, the DHT prefix they announce, and one server per span
    (default: one server holding every block)."""

    model_path: Path
    dht_prefix: str
    num_blocks: int
    spans: tuple[str, ...] = ()

    def server_spans(self) -> list[str]:
        spans = list(self.spans) or [f"0:{self.num_blocks}"]
        for span in spans:
            parse_span(span, self.num_blocks)
        return spans


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    """How to lay out the local swarm. Spans are "start:end" block ranges (end exclusive)."""

    model_path: Path
    dht_prefix: str
    num_blocks: int
    log_dir: Path
    num_servers: int = 2
    spans: tuple[str, ...] = ()
    replicas: int = 1
    host: str = "127.0.0.1"
    dht_port: int = 0
    num_handlers: int = 2
    inference_max_length: int = 2048
    """Longest inference session a server accepts, in tokens."""
    attn_cache_tokens: int | None = None
    """Attention cache of each server, in tokens of one session over all its blocks (None:
    Petals' default, 4,096 for this model family); must hold every concurrent session's
    ``max_length``."""
    step_delay_ms: float = 0.0
    """Simulated network delay per hop: each inference step a server receives waits this
    many milliseconds (asyncio, other sessions' steps go on) before its compute; 0: none.
    See :mod:`farmesh_ws.mesh.hop_delay`."""
    session_timeout_s: float = 600.0
    step_timeout_s: float = 300.0
    """A server drops an inference session with no step for this long (Petals' default)."""
    update_period_s: float = 10.0
    expiration_s: float = 30.0
    throughput: float = 100.0
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 20.0
    log_level: str = "INFO"
    payout_wallets: tuple[tuple[str, str], ...] = ()
    """(server name, wallet) pairs; the name ``""`` gives every server without its own one."""
    byzantine: tuple[tuple[str, ByzantineSpec], ...] = ()
    """(server name, how it cheats): dishonest servers, for tests (:mod:`farmesh_ws.byzantine`)."""
    more_models: tuple[SwarmModel, ...] = ()
    """Other models served by the same DHT, each by servers of its own (after the main
    model's); the settings above apply to all."""

    @property
    def identity_dir(self) -> Path:
        return self.log_dir / "identities"

    def payout_wallet(self, name: str) -> str | None:
        """The payout wallet of server ``name`` (e.g. ``server0``), or None."""
        wallets = dict(self.payout_wallets)
        return wallets.get(name, wallets.get(""))

    @property
    def main_model(self) -> SwarmModel:
        return SwarmModel(self.model_path, self.dht_prefix, self.num_blocks)

    @property
    def models(self) -> tuple[SwarmModel, ...]:
        """Every model served: the main one first."""
        return (self.main_model, *self.more_models)

    def server_spans(self) -> list[str]:
        """The span of every server of the main model to start: explicit spans, or an even
        split; × replicas."""
        spans = list(self.spans) or even_spans(self.num_blocks, self.num_servers)
        for span in spans:
            parse_span(span, self.num_blocks)
        return spans * self.replicas


def read_num_blocks(model_path: Path) -> int:
    """Number of transformer blocks of a Hugging Face model folder."""
    config = json.loads((model_path / "config.json").read_text())
    return int(config["num_hidden_layers"])


def parse_span(span: str, num_blocks: int) -> tuple[int, int]:
    """Parse and check "start:end"; raise ValueError with a readable message."""
    try:
        start_text, end_text = span.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"span {span!r} is not 'start:end'") from None
    if not 0 <= start < end <= num_blocks:
        raise ValueError(f"span {span!r} is outside blocks 0..{num_blocks}")
    return start, end


def even_spans(num_blocks: int, num_servers: int) -> list[str]:
    """Split blocks into contiguous spans as evenly as possible, earlier spans one longer."""
    if not 1 <= num_servers <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks over {num_servers} servers")
    base, extra = divmod(num_blocks, num_servers)
    spans, start = [], 0
    for index in range(num_servers):
        end = start + base + (1 if index < extra else 0)
        spans.append(f"{start}:{end}")
        start = end
    return spans
