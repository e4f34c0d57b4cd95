"""A dependency-free progress line on stderr, shown only on a terminal unless forced."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """``with Progress("calibrating", total=64) as p: ... p.update(8)``.

    Args:
        label: what is being done.
        total: units of work (images, batches).
        enabled: None shows the line only when the stream is a terminal (so
            logs and CI output stay clean); True/False forces it.
        stream: where to write (stderr).
    """

    def __init__(self, label: str, total: int, enabled: Optional[bool] = None, stream: TextIO = None) -> None:
        self.label = label
        self.total = max(int(total), 0)
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        now = time.monotonic()
        if self.enabled and (now - self._last_draw > 0.1 or self.done >= self.total):
            self._last_draw = now
            width = 30
            filled = int(width * self.done / self.total) if self.total else 0
            elapsed = now - self.started
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                              f"{self.done}/{self.total} {elapsed:.1f}s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
