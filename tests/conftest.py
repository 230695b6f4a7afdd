"""Shared fixtures: the bundled model, one local swarm and one mesh backend per test session."""

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from farmesh_ws.home import farmesh_home

PAYOUT_WALLET = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
GOLDEN_PATH = Path(__file__).resolve().parent / "data" / "smollm2-135m-instruct-q4_1.json"


@pytest.fixture(scope="session")
def golden() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDEN_PATH.read_text())
    return data


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    from farmesh_ws.models.bundled import prepare_bundled_model

    return prepare_bundled_model(farmesh_home(), progress=False)


@pytest.fixture(scope="session")
def swarm(bundled_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Two servers splitting the 30 blocks (0:15, 15:30), as the embedded default does;
    server0 proves the payout wallet ``PAYOUT_WALLET``, server1 none (tests/test_payout_swarm.py).

    Tests that kill or add servers must leave every block served when they finish.
    """
    from farmesh_ws.models import BUNDLED_MODEL_ID, dht_prefix_for
    from farmesh_ws.swarm import LocalSwarm, SwarmConfig, read_num_blocks

    config = SwarmConfig(
        model_path=bundled_model_path,
        dht_prefix=dht_prefix_for(BUNDLED_MODEL_ID),
        num_blocks=read_num_blocks(bundled_model_path),
        log_dir=tmp_path_factory.mktemp("swarm-logs"),
        update_period_s=5.0,
        expiration_s=20.0,
        payout_wallets=(("server0", PAYOUT_WALLET),),
    )
    with LocalSwarm(config) as local_swarm:
        yield local_swarm


@pytest.fixture(scope="session")
async def gateway(backend: Any) -> AsyncIterator[Any]:
    """A gateway on port 0 over the shared backend, at price 0.0001 $FAR per token."""
    from tests.helpers import start_gateway

    server = await start_gateway(backend)
    yield server
    await server.shutdown()


@pytest.fixture(scope="session")
async def backend(swarm: Any, bundled_model_path: Path) -> AsyncIterator[Any]:
    from farmesh_ws.mesh.petals import PetalsBackend
    from tests.helpers import swarm_backend_config

    mesh = await PetalsBackend.start(swarm_backend_config(swarm, bundled_model_path))
    yield mesh
    await mesh.aclose()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "disruptive: kills or adds swarm servers; runs after every other test"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the tests that break the shared swarm last, so others see a clean swarm."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
