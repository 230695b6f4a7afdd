"""Where farmesh_ws keeps its files: prepared models, swarm logs, the SQLite ledger.

One directory, `FARMESH_HOME`, defaulting to the user's cache directory, so a fresh
machine needs no configuration and a test run or container can point it elsewhere.
"""

import os
from pathlib import Path

import platformdirs

HOME_ENV = "FARMESH_HOME"


def farmesh_home() -> Path:
    """Return the farmesh_ws home directory, creating it if needed."""
    configured = os.environ.get(HOME_ENV)
    home = Path(configured) if configured else Path(platformdirs.user_cache_dir("farmesh-ws"))
    home.mkdir(parents=True, exist_ok=True)
    return home
