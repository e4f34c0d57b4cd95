"""Keep pydicom's warnings and log records out of the user's logs while medge reads DICOM.

pydicom quotes the offending value when it warns: a corrupted UID or a
mis-encoded string brings "Invalid value for VR UI: 'DOE^JOHN...'" both as a
``UserWarning`` and as a record on the ``pydicom`` logger, and ``medge run``
printed both. Inside :func:`quiet_pydicom`, in the calling thread only:

- warnings (any category, from any module: during a read they all come from
  parsing the file) are swallowed, counted by category;
- records of the ``pydicom`` loggers (``pydicom`` and its children) and of the
  codec plugins' loggers are dropped, counted by level.

On exit one fixed, PHI-free debug record in medge's words says how many there
were and of which category: the text is never re-issued, because it can quote
patient attributes.

Thread safety: warnings filters and ``warnings.showwarning`` are process
global, so the first thread to enter installs one shared hook (under a lock)
and the last one to leave removes it; the hook swallows only what the quiet
threads emit and hands every other thread's warning to the previous hook.
One caveat while any read is in progress: a warning attributed to pydicom or a
codec module from *another* thread is shown even if the user's filters would
have ignored it (medge's filter, placed first so that a user's "error" filter
cannot turn a quoted value into an exception, says "always" for those modules).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import warnings
from typing import Iterator

__all__ = ["quiet_pydicom", "QUIET_LOGGERS"]

_LOG = logging.getLogger("medge.dicom")

#: Loggers whose records never reach the user while a read is in progress (children included).
QUIET_LOGGERS = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "jpeg_ls")

# Modules whose warnings are always routed to the hook (and so never raised by an "error" filter).
_QUIET_MODULES = r"^(pydicom|pylibjpeg|openjpeg|libjpeg|rle|jpeg_ls)(\.|$)"

_lock = threading.Lock()
_active_threads: dict[int, "collections.Counter[str]"] = {}  # thread id -> what it swallowed, by kind
_depth = 0
_saved_catcher: "warnings.catch_warnings | None" = None
_previous_showwarning = None
_previous_showwarnmsg_impl = None
_filtered_loggers: list[logging.Logger] = []


class _QuietFilter(logging.Filter):
    """Drops (and counts) records emitted by a quiet thread; passes every other thread's records."""

    def filter(self, record: logging.LogRecord) -> bool:
        counts = _active_threads.get(threading.get_ident())
        if counts is None:
            return True
        counts[f"log record ({record.levelname})"] += 1
        return False


_FILTER = _QuietFilter()


def _route_warning(message, category, filename, lineno, file=None, line=None):
    counts = _active_threads.get(threading.get_ident())
    if counts is not None:
        counts[f"warning ({getattr(category, '__name__', 'Warning')})"] += 1
        return
    # Another thread's warning: hand it to whatever was in place before medge's hook.
    previous = _previous_showwarning
    if previous is not None and previous is not getattr(warnings, "_showwarning_orig", None):
        previous(message, category, filename, lineno, file, line)
    elif _previous_showwarnmsg_impl is not None:
        # The stock showwarning: honour an enclosing catch_warnings(record=True), which replaces
        # the implementation behind it rather than showwarning itself.
        _previous_showwarnmsg_impl(warnings.WarningMessage(message, category, filename, lineno, file, line))
    else:  # pragma: no cover - Pythons without the private hook
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]


_logger_cache: tuple[int, list[logging.Logger]] = (-1, [])


def _quiet_loggers() -> list[logging.Logger]:
    """The quiet loggers that exist now (children included); rescanned only when loggers were added."""
    global _logger_cache
    registry = logging.Logger.manager.loggerDict
    if _logger_cache[0] != len(registry):
        names = [name for name in list(registry)
                 if any(name == root or name.startswith(root + ".") for root in QUIET_LOGGERS)]
        # The roots themselves, even if nothing created them yet (a codec imported later logs to them).
        loggers = [logging.getLogger(name) for name in sorted(set(names) | set(QUIET_LOGGERS))]
        _logger_cache = (len(registry), loggers)  # counted after getLogger created any missing root
    return _logger_cache[1]


def _install() -> None:
    global _saved_catcher, _previous_showwarning, _previous_showwarnmsg_impl, _filtered_loggers
    catcher = warnings.catch_warnings()
    catcher.__enter__()  # saves filters and showwarning; restored by _uninstall
    _saved_catcher = catcher
    _previous_showwarning = warnings.showwarning
    _previous_showwarnmsg_impl = getattr(warnings, "_showwarnmsg_impl", None)
    warnings.filterwarnings("always", module=_QUIET_MODULES)
    warnings.showwarning = _route_warning
    _filtered_loggers = _quiet_loggers()
    for logger in _filtered_loggers:
        logger.addFilter(_FILTER)


def _uninstall() -> None:
    global _saved_catcher, _previous_showwarning, _previous_showwarnmsg_impl, _filtered_loggers
    for logger in _filtered_loggers:
        logger.removeFilter(_FILTER)
    _filtered_loggers = []
    catcher, _saved_catcher = _saved_catcher, None
    _previous_showwarning = _previous_showwarnmsg_impl = None
    if catcher is not None:
        catcher.__exit__(None, None, None)


@contextlib.contextmanager
def quiet_pydicom(purpose: str = "reading DICOM") -> Iterator[None]:
    """Silence pydicom (and codec) warnings and log records in this thread for the duration.

    Re-entrant. On exit, if anything was swallowed, logs one debug record on
    ``medge.dicom`` naming only counts and categories (e.g. ``warning
    (UserWarning) x2``), never a message text.
    """
    global _depth
    ident = threading.get_ident()
    with _lock:
        outermost = ident not in _active_threads
        if outermost:
            _active_threads[ident] = collections.Counter()
            if _depth == 0:
                _install()
            _depth += 1
    if not outermost:
        yield
        return
    try:
        yield
    finally:
        with _lock:
            counts = _active_threads.pop(ident)
            _depth -= 1
            if _depth == 0:
                _uninstall()
        if counts:
            _LOG.debug(
                "pydicom reported %s while %s; not shown, because such messages can quote patient attributes",
                ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items())), purpose,
            )
