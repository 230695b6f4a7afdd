"""`farmesh-ws ledger ...` as a user runs it: reports, and one line when the database is down."""

import os
import subprocess
import sys
from pathlib import Path


def _ledger(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farmesh_ws", "ledger", *args],
        env={**os.environ, "FARMESH_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_report_on_a_fresh_ledger_prints_and_exits_0(tmp_path: Path) -> None:
    result = _ledger(tmp_path, "wallets", "--json")
    assert (result.returncode, result.stdout) == (0, "")
    assert (tmp_path / "ledger.sqlite3").exists()


def test_an_unreachable_database_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _ledger(tmp_path, "nodes", POSTGRES_URL="postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("farmesh-ws: ")
