"""A dishonest Petals server, for tests and benchmarks only (``farmesh-ws swarm --byzantine``).

It serves its blocks like any server, but perturbs the hidden states its inference steps
return (what a client pays for), and may announce a throughput it does not have so that
routing prefers it. Its stateless forward (``rpc_forward``, what spot checks call on
replicas) stays honest, so it never frames another node: what is tested is whether the
coordinator catches a node lying about the work it is paid for (:mod:`farmesh_ws.mesh.spot_check`).
"""

import random
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ByzantineSpec:
    """``scale``: Gaussian noise added to a tampered step's outputs, as a fraction of their
    RMS; ``fraction``: the share of steps tampered with (drawn per step); ``after_steps``:
    honest steps first (counted per connection-handler process, as Petals forks
    ``num_handlers`` of them); ``claimed_inference_rps``: steps per second per block to
    announce (0: announce none, as honest local servers do); ``seed`` of the draws."""

    scale: float = 0.05
    fraction: float = 1.0
    after_steps: int = 0
    claimed_inference_rps: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError("byzantine scale must be positive")
        if not 0 < self.fraction <= 1:
            raise ValueError("byzantine fraction must be above 0 and at most 1")
        if self.after_steps < 0 or self.claimed_inference_rps < 0:
            raise ValueError("byzantine after_steps and claimed rps must not be negative")

    def as_options(self) -> dict[str, Any]:
        """JSON-friendly fields, for a swarm node's options."""
        return asdict(self)


def install(spec: ByzantineSpec) -> None:
    """Tamper with this server's inference outputs (call before the server starts its
    connection handlers, which inherit it)."""
    from petals.server import handler

    original = handler.iterate_rpc_inference
    draws = random.Random(spec.seed)
    steps = [0]

    async def iterate_rpc_inference(*args: Any, **kwargs: Any) -> Any:
        async for output_tensors, can_push in original(*args, **kwargs):
            steps[0] += 1
            if steps[0] > spec.after_steps and draws.random() < spec.fraction:
                tampered = _perturbed(output_tensors[0], spec.scale, draws)
                output_tensors = [tampered, *output_tensors[1:]]
            yield output_tensors, can_push

    handler.iterate_rpc_inference = iterate_rpc_inference


def announce(server: Any, spec: ByzantineSpec) -> None:
    """Make ``server`` (a Petals ``Server``, before ``run``) announce the claimed throughput."""
    if spec.claimed_inference_rps > 0:
        server.server_info.inference_rps = spec.claimed_inference_rps


def _perturbed(serialized: Any, scale: float, draws: random.Random) -> Any:
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    tensor = deserialize_torch_tensor(serialized)
    generator = torch.Generator().manual_seed(draws.randrange(2**31))
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    rms = tensor.float().pow(2).mean().sqrt()
    tampered = (tensor.float() + noise * rms * scale).to(tensor.dtype)
    return serialize_torch_tensor(tampered, serialized.compression)
