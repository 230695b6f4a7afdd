"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling,
with an optional repetition penalty. A seeded ``torch.Generator`` makes sampling repeatable."""

from collections.abc import Sequence

import torch

from farmesh_ws.core.types import SamplingParams


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: Sequence[int], penalty: float
) -> torch.Tensor:
    """Make tokens already in the context less likely (CTRL's rule: divide positive logits,
    multiply negative ones)."""
    if penalty == 1.0 or not seen_ids:
        return logits
    ids = torch.tensor(sorted(set(seen_ids)), dtype=torch.long)
    chosen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k tokens and outside the top-p probability mass."""
    if 0 < top_k < logits.numel():
        kth_best = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the best one always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: Sequence[int],
    generator: torch.Generator | None,
) -> int:
    """Pick the next token id from one position's logits (shape ``[vocab]``)."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty)
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probabilities = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator).item())
