"""TensorRT helpers shared by the build side (``medge.convert.engine``) and the run side.

- :func:`import_flavour`: import ``tensorrt`` or ``tensorrt_rtx`` lazily, with
  a MissingDependency naming the pip extra when it is not installed.
- :func:`make_logger`: an ``ILogger`` that records errors and warnings (for
  error messages) and forwards everything to Python logging.
- :func:`gc_paused`: the context every call into TensorRT runs in.

Why the cyclic GC is paused around TensorRT calls: TensorRT calls back into
Python (the logger) while holding its own locks. A cyclic-GC pass started in
such a callback can finalise another TensorRT object whose destructor takes the
same lock: a self-deadlock (seen with tensorrt-rtx 1.7: createInferBuilder ->
PyLogger::log -> gc -> ~IBuilder -> pthread_mutex_lock). Destructors log too,
so TensorRT objects are also released inside :func:`gc_paused`, explicitly
and in reverse order of creation.

Nothing here imports TensorRT at import time.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
from typing import Any, Iterable, Iterator, Optional

from .errors import BackendUnavailable, ConversionError, MissingDependency

__all__ = [
    "FLAVOURS",
    "EXTRAS",
    "LABELS",
    "MIN_TENSORRT",
    "import_flavour",
    "make_logger",
    "gc_paused",
    "summarise",
    "version_tuple",
]

_LOG = logging.getLogger(__name__)

FLAVOURS = ("tensorrt", "tensorrt_rtx")
#: pip extra that installs each flavour's module.
EXTRAS = {"tensorrt": "tensorrt", "tensorrt_rtx": "rtx"}
#: How each flavour is named in messages.
LABELS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
#: Strongly typed networks and the kept API surface start at 10.12.
MIN_TENSORRT = (10, 12)


def version_tuple(text: str) -> tuple:
    """(major, minor) of a version string: "10.13.0.35" -> (10, 13); junk parts count as 0."""
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def import_flavour(flavour: str, purpose: str = "Building a {label} engine") -> Any:
    """Import and return the module of ``flavour`` ("tensorrt" or "tensorrt_rtx").

    Args:
        flavour: "tensorrt" or "tensorrt_rtx".
        purpose: what the module is needed for, for the MissingDependency
            message; ``{label}`` is replaced by "TensorRT" / "TensorRT-RTX".

    Raises:
        ConversionError: ``flavour`` is not one of FLAVOURS.
        MissingDependency: the module is not installed (names the pip extra).
        BackendUnavailable: full TensorRT is older than 10.12.
    """
    if flavour not in FLAVOURS:
        raise ConversionError(f"unknown engine flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    try:
        if flavour == "tensorrt":
            import tensorrt as trt
        else:
            import tensorrt_rtx as trt
    except ImportError as exc:
        raise MissingDependency(flavour, EXTRAS[flavour], purpose.format(label=LABELS[flavour])) from exc
    if flavour == "tensorrt":
        version = version_tuple(getattr(trt, "__version__", "0"))
        if version < MIN_TENSORRT:
            raise BackendUnavailable(
                f"TensorRT {trt.__version__} is too old: medge uses strongly typed engines and needs "
                f"TensorRT {MIN_TENSORRT[0]}.{MIN_TENSORRT[1]} or newer (pip install \"medge[tensorrt]\")")
    return trt


# --------------------------------------------------------------------------- the cyclic GC

_gc_lock = threading.Lock()
_gc_depth = 0
_gc_restore = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (see the module doc for why).

    Nested and concurrent uses (several threads calling into TensorRT) are
    counted: the collector is disabled by the first block to enter and
    re-enabled, if it was enabled then, by the last one to leave, also when the
    block raises. Reference counting keeps freeing objects meanwhile; only
    cycles wait.
    """
    global _gc_depth, _gc_restore
    with _gc_lock:
        if _gc_depth == 0:
            _gc_restore = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_restore:
                gc.enable()


# --------------------------------------------------------------------------- logging


def make_logger(trt: Any, *, warning_level: int = logging.DEBUG, log: Optional[logging.Logger] = None) -> Any:
    """An ILogger that records what TensorRT reports.

    Attributes of the returned logger:
        errors: ERROR and INTERNAL_ERROR messages (for exception messages).
        warnings: WARNING messages.
        layer_tables: VERBOSE messages starting with "Layers:" (the builder's
            per-layer table under ProfilingVerbosity.DETAILED).
        quiet: while True, errors and warnings are not recorded (probing calls
            whose failure is expected).
        clear(): forget recorded errors and warnings (before an operation
            whose failure message should carry only its own errors).

    Every message also goes to Python logging (``log``, default this module's
    logger): errors and INFO/VERBOSE at DEBUG, warnings at ``warning_level``.
    At most the last 200 errors and warnings are kept, so a long-running
    runtime does not grow without bound.

    Args:
        trt: the flavour's module.
        warning_level: Python logging level for TensorRT warnings.
        log: where messages go; None means this module's logger.
    """
    severity = trt.ILogger.Severity
    errors_at = {severity.ERROR, severity.INTERNAL_ERROR}
    target = log if log is not None else _LOG
    keep = 200

    class _RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list = []
            self.warnings: list = []
            self.layer_tables: list = []
            self.quiet = False

        def clear(self) -> None:
            self.errors.clear()
            self.warnings.clear()

        def log(self, sev: Any, msg: str) -> None:
            try:
                if sev in errors_at:
                    if not self.quiet:
                        self.errors.append(msg)
                        del self.errors[:-keep]
                    target.debug("[%s] %s", sev.name, msg)
                elif sev == severity.WARNING:
                    if not self.quiet:
                        self.warnings.append(msg)
                        del self.warnings[:-keep]
                    target.log(warning_level, "[WARNING] %s", msg)
                elif sev == severity.VERBOSE:
                    if msg.startswith("Layers:"):
                        self.layer_tables.append(msg)
                else:
                    target.debug("[%s] %s", sev.name, msg)
            except Exception:  # never let logging break TensorRT running in native code
                pass

    return _RecordingLogger()


def summarise(messages: Iterable[str], limit: int = 10) -> str:
    """Join logged messages into one line, at most ``limit`` of them."""
    items = [m.strip() for m in messages if m and m.strip()]
    if len(items) > limit:
        items = items[:limit] + [f"... and {len(items) - limit} more"]
    return "; ".join(items)
