"""JSON-lines journals of what the simulated HIS received and sent (read live by the tests).

Lines never carry a patient's name or identifier: only control ids, message types, ACK codes, the
gateway's placer appointment id, schedule ids and slot starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any


class Journal:
    """Appends one JSON object per line and flushes after each line."""

    def __init__(self, path: str | Path | None = None, *, stream: IO[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._stream = stream
        #: the entries, kept in memory only when there is no file (in-process tests)
        self.entries: list[dict[str, Any]] = []

    def open(self) -> None:
        if self._stream is None and self.path is not None:
            self._stream = open(self.path, "a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        if self.path is None and self._stream is None:
            self.entries.append(entry)
            return
        if self._stream is None:
            self.open()
        if self._stream is not None:
            self._stream.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self.path is not None:
            self._stream.close()
            self._stream = None
