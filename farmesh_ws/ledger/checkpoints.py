"""Crash safety: how many tokens each running turn has delivered, on disk, at least every second.

While a turn streams, its progress is written (atomically: temp file + rename) whenever a
token arrives and the last checkpoint is a second old or more, and removed once the turn's
record is durable. If the process is SIGKILLed, the next start finds the checkpoints of the
dead process and closes each turn as ``interrupted``, billed for the tokens the checkpoint
says were delivered: never more than the client received.
"""

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

from farmesh_ws.ledger.records import TurnRecord

logger = logging.getLogger(__name__)


class TurnCheckpoints:
    def __init__(self, directory: Path, *, interval_s: float = 1.0) -> None:
        self.root = directory
        self.directory = directory / str(os.getpid())
        self.directory.mkdir(parents=True, exist_ok=True)
        self._interval_s = interval_s
        self._last_write: dict[str, float] = {}

    def due(self, session_id: str, request_id: str) -> bool:
        """True when the turn's last checkpoint is ``interval_s`` old (or there is none)."""
        last = self._last_write.get(_key(session_id, request_id), float("-inf"))
        return time.monotonic() - last >= self._interval_s

    def write(self, record: TurnRecord) -> None:
        """Checkpoint a running turn: ``record`` is what it would be billed if it stopped now."""
        key = _key(record.session_id, record.request_id)
        path = self.directory / f"{key}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record.to_json()), encoding="utf-8")
        temporary.replace(path)
        self._last_write[key] = time.monotonic()

    def clear(self, record: TurnRecord) -> None:
        """The turn's final record is durable: forget its checkpoint."""
        key = _key(record.session_id, record.request_id)
        self._last_write.pop(key, None)
        (self.directory / f"{key}.json").unlink(missing_ok=True)

    def orphaned(self) -> list[tuple[Path, TurnRecord]]:
        """Checkpoints left by processes that are gone, as ``interrupted`` turn records."""
        found = []
        for directory in sorted(self.root.iterdir()):
            if not directory.is_dir() or not directory.name.isdigit():
                continue
            if int(directory.name) == os.getpid() or _alive(int(directory.name)):
                continue
            for path in sorted(directory.glob("*.json")):
                record = TurnRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
                found.append((path, replace(record, finish_reason="interrupted")))
        return found


def _key(session_id: str, request_id: str) -> str:
    return f"{session_id}--{request_id.encode().hex()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
