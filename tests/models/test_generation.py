"""Recommended sampling: read from a folder's generation_config.json as transformers reads it,
read back from /models by the terminal chat, with its --temperature / --top-p overrides."""

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.models.generation import (
    Sampling,
    announced_sampling,
    chat_sampling,
    describe_sampling,
    models_url,
    recommended_sampling,
    sampling_from_config,
    with_overrides,
)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # The bundled folder's: the model card's values, top_k is transformers' default.
        (
            {"do_sample": True, "temperature": 0.2, "top_p": 0.9},
            {"temperature": 0.2, "top_p": 0.9, "top_k": 50},
        ),
        # Greedy unless do_sample is true, whatever else is set.
        ({"bos_token_id": 1, "eos_token_id": 2}, {"temperature": 0.0}),
        ({"do_sample": False, "temperature": 0.7}, {"temperature": 0.0}),
        ({"do_sample": "yes", "temperature": 0.7}, {"temperature": 0.0}),
        ({"do_sample": True, "temperature": 0.0}, {"temperature": 0.0}),
        # transformers' defaults for what is left out; protocol defaults are not repeated.
        ({"do_sample": True}, {"temperature": 1.0, "top_k": 50}),
        (
            {"do_sample": True, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0},
            {"temperature": 1.0},
        ),
        (
            {"do_sample": True, "temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1},
            {"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.1},
        ),
        # Clamped into protocol v1's ranges; a top_p transformers would refuse is dropped.
        (
            {
                "do_sample": True,
                "temperature": 5,
                "top_p": 0.0,
                "top_k": 5000,
                "repetition_penalty": 9,
            },
            {"temperature": 2.0, "top_k": 1000, "repetition_penalty": 2.0},
        ),
        (
            {"do_sample": True, "repetition_penalty": 0.8, "top_p": 1.5},
            {"temperature": 1.0, "top_k": 50},
        ),
        # Values that are not numbers count as absent.
        (
            {"do_sample": True, "temperature": "hot", "top_k": True, "top_p": None},
            {"temperature": 1.0, "top_k": 50},
        ),
    ],
)
def test_sampling_from_config(config: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sampling_from_config(config) == expected


def test_recommended_sampling_reads_the_folder(tmp_path: Path) -> None:
    assert recommended_sampling(tmp_path) == {}  # no file: the protocol's defaults
    path = tmp_path / "generation_config.json"
    path.write_text("{not json")
    assert recommended_sampling(tmp_path) == {}
    path.write_text("[0.2]")
    assert recommended_sampling(tmp_path) == {}
    path.write_text(json.dumps({"do_sample": True, "temperature": 0.3, "top_k": 0}))
    assert recommended_sampling(tmp_path) == {"temperature": 0.3}


def test_announced_sampling_keeps_known_numeric_fields() -> None:
    assert announced_sampling(None) == {}
    assert announced_sampling([0.2]) == {}
    assert announced_sampling(
        {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "seed": 1, "repetition_penalty": "x"}
    ) == {"temperature": 0.2, "top_p": 0.9, "top_k": 50}
    assert announced_sampling({"top_k": 2.5, "temperature": True}) == {}


def test_overrides_and_greedy() -> None:
    recommended: Sampling = {"temperature": 0.2, "top_p": 0.9, "top_k": 50}
    assert with_overrides(recommended) == recommended
    assert with_overrides(recommended, top_p=0.5) == {
        "temperature": 0.2,
        "top_p": 0.5,
        "top_k": 50,
    }
    assert with_overrides(recommended, temperature=0.7) == {
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
    }
    # --temperature 0 is plain greedy decoding: nothing else is sent.
    assert with_overrides(recommended, temperature=0, top_p=0.5) == {"temperature": 0.0}
    assert with_overrides({}) == {"temperature": 0.0}
    assert with_overrides({}, temperature=0.8) == {"temperature": 0.8}
    assert describe_sampling({"temperature": 0.2, "top_p": 0.9, "top_k": 50}) == (
        "temperature 0.2, top_p 0.9, top_k 50"
    )
    assert describe_sampling({"temperature": 0.0}) == "greedy"
    assert describe_sampling({}) == "greedy"


def test_models_url() -> None:
    assert models_url("ws://127.0.0.1:8100/ws") == "http://127.0.0.1:8100/models"
    assert models_url("wss://chat.example:443/ws?x=1") == "https://chat.example:443/models"
    assert models_url("ws://[::1]:8100/") == "http://[::1]:8100/models"


def test_unreachable_models_means_greedy_with_a_reason() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws"
        sampling, problem = chat_sampling(url, "m", 5, temperature=None, top_p=0.5)
        assert sampling == {"temperature": 0.0}
        assert problem is not None
        assert problem.startswith(f"http://127.0.0.1:{port}/models: ")
        assert chat_sampling(url, "m", 5, temperature=0.4, top_p=None)[0] == {"temperature": 0.4}
