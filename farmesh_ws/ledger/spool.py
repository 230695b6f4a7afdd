"""A durable local spool for ledger records the database could not take.

One JSON line per record, appended and fsynced before the writer moves on, so a record is on
disk even if the process dies right after. Replaying is safe to repeat: the database ignores a
turn it already holds, so every record ends up stored exactly once.
"""

import json
import os
from pathlib import Path

from farmesh_ws.ledger.records import TurnRecord


class Spool:
    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / f"{name}.jsonl"

    def append(self, records: list[TurnRecord]) -> None:
        with self.path.open("a", encoding="utf-8") as spool:
            for record in records:
                spool.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            spool.flush()
            os.fsync(spool.fileno())

    def pending_files(self) -> list[Path]:
        """Every spool file in the directory (ours and those left by dead processes)."""
        return sorted(self.directory.glob("*.jsonl"))

    @staticmethod
    def read(path: Path) -> list[TurnRecord]:
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(TurnRecord.from_json(json.loads(line)))
        return records

    def __len__(self) -> int:
        total = 0
        for path in self.pending_files():
            with path.open(encoding="utf-8") as spool:
                total += sum(1 for line in spool if line.strip())
        return total
