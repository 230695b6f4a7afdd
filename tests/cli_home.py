"""A user's FARMESH_HOME for the ledger commands, on SQLite or on a fresh PostgreSQL database."""

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from farmesh_ws.ledger.store import database_url
from tests.ledger.conftest import _fresh_postgres_database


@dataclass(frozen=True)
class CliHome:
    """A FARMESH_HOME and the database settings a user would export with it; ``run`` runs
    ``farmesh-ws <command> ...`` there."""

    path: Path
    env: dict[str, str]
    url: str  # what the gateway connects to
    command: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "farmesh_ws", self.command, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )


async def cli_homes(database: str, path: Path, command: str) -> AsyncIterator[CliHome]:
    """The home for ``database`` (``sqlite`` or ``postgresql``), for a fixture to yield from."""
    env = {k: v for k, v in os.environ.items() if k not in ("POSTGRES_URL", "DATABASE_URL")}
    env["FARMESH_HOME"] = str(path)
    if database == "sqlite":
        yield CliHome(path, env, database_url("", path), command)
        return
    async for url in _fresh_postgres_database():
        env["POSTGRES_URL"] = url.replace("postgresql+asyncpg://", "postgresql://")
        yield CliHome(path, env, url, command)
