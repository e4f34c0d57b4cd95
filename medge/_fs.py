"""File-system helpers shared by the build and run sides."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Union


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, memoryview]) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    A temporary file in the same folder is written, flushed to disk, then renamed over ``path``; on any
    failure it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
