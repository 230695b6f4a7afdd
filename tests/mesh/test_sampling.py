"""Token choice: greedy, top-k/top-p masks, repetition penalty, seeded repeatability."""

import torch

from farmesh_ws.core.types import SamplingParams
from farmesh_ws.mesh.sampling import (
    apply_repetition_penalty,
    filter_top_k_top_p,
    make_generator,
    next_token,
)


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert next_token(logits, SamplingParams(), [], None) == 1


def test_repetition_penalty_lowers_seen_tokens_both_signs() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    penalised = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert penalised.tolist() == [1.0, -4.0, 1.0]


def test_penalty_can_change_the_greedy_choice() -> None:
    logits = torch.tensor([3.0, 2.0])
    assert next_token(logits, SamplingParams(repetition_penalty=2.0), [0], None) == 1


def test_top_k_keeps_k_best() -> None:
    kept = filter_top_k_top_p(torch.tensor([1.0, 4.0, 3.0, 2.0]), 2, 1.0)
    assert torch.isfinite(kept).tolist() == [False, True, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_top_k_top_p(logits, 0, 0.7)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]


def test_top_p_always_keeps_the_best_token() -> None:
    kept = filter_top_k_top_p(torch.tensor([5.0, 0.0]), 0, 0.01)
    assert torch.isfinite(kept).tolist() == [True, False]


def test_seeded_sampling_repeats() -> None:
    logits = torch.zeros(50)
    params = SamplingParams(temperature=1.0, seed=7)
    first = [next_token(logits, params, [], make_generator(7)) for _ in range(1)]
    generator_a, generator_b = make_generator(7), make_generator(7)
    run_a = [next_token(logits, params, [], generator_a) for _ in range(20)]
    run_b = [next_token(logits, params, [], generator_b) for _ in range(20)]
    assert run_a == run_b
    assert run_a[0] == first[0]
    assert len(set(run_a)) > 1
