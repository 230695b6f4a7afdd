"""Configuration of the Petals backend, and a model's client half (the part run locally)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farmesh_ws.mesh.chat_turns import ChatTurns
from farmesh_ws.mesh.spot_check import SpotCheckPolicy
from farmesh_ws.mesh.spot_check_run import SpotChecker
from farmesh_ws.payout.bindings import BindingPolicy


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model the gateway can serve: its id, a local folder with its config, tokenizer and
    non-block weights (embeddings, norm, head), and the DHT prefix its servers announce."""

    model_id: str
    path: Path
    dht_prefix: str


@dataclass(frozen=True, slots=True)
class PetalsBackendConfig:
    """``max_concurrent_turns``: worker threads, so turns running at once (more wait for a
    free one); lengths in tokens;
    timeouts and periods in seconds; ``max_retries``: Petals' tries per step and server,
    ``min_backoff_s`` the wait before the second (doubling for each later one);
    ``payout``: how servers' payout bindings are fetched and checked (:mod:`farmesh_ws.payout`);
    ``spot_checks``: how servers' outputs are verified (:mod:`farmesh_ws.mesh.spot_check`)."""

    initial_peers: tuple[str, ...]
    models: tuple[ModelSpec, ...]
    max_concurrent_turns: int = 256
    max_session_length: int = 2048
    max_retries: int = 4
    min_backoff_s: float = 0.25
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    update_period_s: float = 10.0
    ban_timeout_s: float = 15.0
    payout: BindingPolicy = field(default_factory=BindingPolicy)
    spot_checks: SpotCheckPolicy = field(default_factory=SpotCheckPolicy)


class LoadedModel:
    """A model's client half: tokenizer, embeddings, final norm, LM head, sequence manager.

    Loading is blocking (reads the folder, joins the DHT): construct it in a thread.
    """

    def __init__(self, spec: ModelSpec, config: PetalsBackendConfig) -> None:
        import torch
        from petals import AutoDistributedModelForCausalLM
        from transformers import AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.path))
        self.model = AutoDistributedModelForCausalLM.from_pretrained(
            str(spec.path),
            initial_peers=list(config.initial_peers),
            dht_prefix=spec.dht_prefix,
            torch_dtype=torch.float32,
            max_retries=config.max_retries,
            min_backoff=config.min_backoff_s,
            connect_timeout=config.connect_timeout_s,
            request_timeout=config.request_timeout_s,
            update_period=config.update_period_s,
            ban_timeout=config.ban_timeout_s,
            show_route=False,
        )
        self.model.eval()
        self.turns = ChatTurns(self.tokenizer)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self.num_blocks = int(self.model.config.num_hidden_layers)
        self.spot_checker: SpotChecker | None = None
        """Set by the backend once loaded; None: no spot checks."""

    @property
    def sequence_manager(self) -> Any:
        return self.model.model.layers.sequence_manager

    def decode(self, ids: Sequence[int]) -> str:
        """Reply text: special tokens skipped; an incomplete UTF-8 end decodes to U+FFFD."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def embed(self, ids: Any) -> Any:
        """Token ids ``[batch, n]`` to input embeddings ``[batch, n, hidden]``."""
        return self.model.model.embed_tokens(ids)

    def logits(self, hidden: Any) -> Any:
        """Hidden states ``[1, n, hidden]`` from the last block to the last position's
        logits ``[vocab]``."""
        import torch

        with torch.inference_mode():
            last = self.model.model.norm(hidden[:, -1:, :])
            return self.model.lm_head(last)[0, -1]

    def close(self) -> None:
        """Stop the routing thread, the replicated p2p client and the client DHT process."""
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

        manager = self.sequence_manager
        manager.shutdown()
        RemoteExpertWorker.run_coroutine(manager.state.p2p.shutdown())
        manager.dht.shutdown()
