"""An on-disk cache of the engines medge builds on this machine (DESIGN.md, "TensorRT": cache key).

When a bundle carries no engine for the GPU and TensorRT version at hand,
``medge.load`` builds one from the bundle's verified ONNX graph and keeps it
here, under the key :func:`medge.convert.engine.engine_cache_key` gives:
flavour + version, GPU name, compute capability, SM count, model SHA-256,
precision and optimization profile.

Layout: one pair of files per key in the cache folder (default
``$MEDGE_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/medge/engines``, else
``~/.cache/medge/engines``):

- ``<key>.engine``: the plan;
- ``<key>.json``: its sidecar: schema, key, the plan's SHA-256 and size, and
  the key fields, written after the plan;
- ``<key>.lock``: an empty file that is only ever locked;
- ``<key>.rtxcache``: TensorRT-RTX only, its runtime cache for that engine on
  this GPU (:class:`RuntimeCacheFile`): the kernels RTX compiles just in time
  on first inference, so the next process does not compile them again. The
  engines of a bundle get one too, under the key of the bundled plan.

Engines are executable, so nothing is returned that is not verified: the plan
must have the sidecar's size and SHA-256 (checked on the bytes returned), and
the sidecar's fields must hash to the key. Anything else (a missing sidecar
or plan, a flipped byte, a truncated file, edited fields) is deleted and
reported as a miss, so the caller rebuilds it.

Concurrency: each file is written to a temporary file in the same folder,
flushed to disk, and renamed over the final name, so a reader never sees a
partial file. Writers of a key hold an exclusive lock on ``<key>.lock`` for
both renames and readers a shared one while they read both files, so a reader
always sees the pair one writer wrote. Two processes building the same key
both write; the last complete writer wins. A writer that dies between the
renames (power loss, kill -9) leaves a pair that fails verification: the next
reader deletes it. Locks are ``flock`` on POSIX (released by the kernel when
a process dies) and ``msvcrt.locking`` on Windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

from ..errors import MedgeError
from .._fs import atomic_write

__all__ = ["EngineCache", "EngineCacheNotWritable", "KEY_FIELDS", "RuntimeCacheFile", "default_directory"]

_LOG = logging.getLogger(__name__)

SCHEMA = "medge-engine-cache-entry/1"
#: The arguments of ``engine_cache_key``: every entry's sidecar records them, and they must hash to its key.
KEY_FIELDS = ("flavour", "flavour_version", "gpu_name", "compute_capability", "sm_count", "model_sha256",
              "precision", "profile")
_KEY = re.compile(r"[0-9a-f]{64}")

PlanBytes = Union[bytes, bytearray, memoryview]


class EngineCacheNotWritable(MedgeError):
    """The engine cache folder cannot be created or written (the message names it and says what to do)."""


def default_directory() -> Path:
    """``$MEDGE_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/medge/engines``, else ``~/.cache/medge/engines``."""
    configured = os.environ.get("MEDGE_ENGINE_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "medge" / "engines"


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise MedgeError(f"an engine cache key is 64 lowercase hex digits (engine_cache_key), got {key!r}")
    return key


def _key_of(fields: Mapping[str, Any]) -> str:
    from ..convert.engine import engine_cache_key

    return engine_cache_key(**{name: fields[name] for name in KEY_FIELDS})


def _check_fields(key: str, fields: Any) -> dict:
    """The fields as stored (JSON values), after checking they are complete and hash to ``key``."""
    if not isinstance(fields, Mapping):
        raise MedgeError(f"engine cache fields must be a mapping of {', '.join(KEY_FIELDS)}, "
                         f"got {type(fields).__name__}")
    missing = [name for name in KEY_FIELDS if name not in fields]
    if missing:
        raise MedgeError(f"engine cache fields lack {', '.join(missing)}")
    try:
        stored = json.loads(json.dumps(dict(fields), sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise MedgeError(f"engine cache fields must be JSON values: {exc}") from None
    try:
        actual = _key_of(stored)
    except (ValueError, MedgeError) as exc:
        raise MedgeError(f"engine cache fields are not valid key fields: {exc}") from None
    if actual != key:
        raise MedgeError(f"engine cache fields do not belong to key {key[:16]}...: they hash to {actual[:16]}...")
    return stored


# --------------------------------------------------------------------------- locking

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _acquire(fd: int, exclusive: bool) -> None:
        # msvcrt has exclusive byte-range locks only; LK_LOCK gives up after 10 s, so loop.
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:
                time.sleep(0.05)

    def _release(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _acquire(fd: int, exclusive: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)

    def _release(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (POSIX; Windows cannot open folders)."""
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EngineCache:
    """Engines built on this machine, keyed by ``engine_cache_key``, verified on every read.

    Args:
        directory: the cache folder; None means :func:`default_directory`.
            Nothing is created until the first :meth:`put`.

    Example::

        cache = EngineCache()
        fields = dict(flavour="tensorrt_rtx", flavour_version=trt.__version__, gpu_name=gpu["name"],
                      compute_capability=gpu["compute_capability"], sm_count=gpu["sm_count"],
                      model_sha256=sha, precision="fp16", profile={"min": 1, "opt": 4, "max": 8})
        plan = cache.get_or_build(engine_cache_key(**fields), build, fields)
    """

    def __init__(self, directory: Union[str, os.PathLike, None] = None) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_directory()

    def __repr__(self) -> str:
        return f"EngineCache({str(self.directory)!r})"

    @staticmethod
    def key(flavour: str, flavour_version: str, gpu_name: Optional[str], compute_capability: Any,
            sm_count: Optional[int], model_sha256: str, precision: str, profile: Any) -> str:
        """``medge.convert.engine.engine_cache_key`` (the same arguments, the same key)."""
        from ..convert.engine import engine_cache_key

        return engine_cache_key(flavour, flavour_version, gpu_name, compute_capability, sm_count, model_sha256,
                                precision, profile)

    def plan_path(self, key: str) -> Path:
        return self.directory / f"{_check_key(key)}.engine"

    def sidecar_path(self, key: str) -> Path:
        return self.directory / f"{_check_key(key)}.json"

    def runtime_cache_path(self, key: str) -> Path:
        return self.directory / f"{_check_key(key)}.rtxcache"

    def runtime_cache(self, key: str, plan: PlanBytes) -> "RuntimeCacheFile":
        """The TensorRT-RTX runtime cache file of the engine ``plan`` stored (or bundled) under ``key``.

        Nothing is read or created until its ``load`` / ``save``.
        """
        data = memoryview(plan).cast("B")
        return RuntimeCacheFile(self, _check_key(key), hashlib.sha256(data).hexdigest())

    # -- reading -----------------------------------------------------------------------

    def get(self, key: str, fields: Optional[Mapping[str, Any]] = None) -> Optional[bytes]:
        """The verified plan stored under ``key``, or None.

        A missing entry is None. An unusable one (plan or sidecar missing,
        plan size or SHA-256 not the sidecar's, sidecar unreadable or its
        fields not hashing to ``key``) is deleted, logged as a warning, and
        None: the caller rebuilds it.

        Args:
            key: from ``engine_cache_key``.
            fields: the key fields the caller expects; checked to hash to
                ``key`` (a caller bug otherwise).

        Raises:
            MedgeError: ``key`` is malformed or ``fields`` do not belong to it.
        """
        key = _check_key(key)
        if fields is not None:
            _check_fields(key, fields)
        if not self.directory.is_dir():
            return None
        with self._locked(key, exclusive=False, required=False):
            data, problem = self._read(key)
        if problem is None:
            return data
        # Look again under the exclusive lock (no writer can be between its renames then) before deleting.
        with self._locked(key, exclusive=True, required=False):
            data, problem = self._read(key)
            if problem is None:
                return data
            _LOG.warning("engine cache %s: entry %s... is unusable (%s); removed, the engine will be rebuilt",
                         self.directory, key[:16], problem)
            self._remove_files(key)
        return None

    def _read(self, key: str) -> tuple:
        """(plan, None) when valid, (None, None) when absent, (None, what is wrong) otherwise."""
        plan_path, sidecar_path = self.plan_path(key), self.sidecar_path(key)
        try:
            sidecar_bytes = sidecar_path.read_bytes()
        except FileNotFoundError:
            if plan_path.exists():
                return None, "the plan has no sidecar (an interrupted write?)"
            return None, None
        except OSError as exc:
            return None, f"the sidecar cannot be read ({exc.strerror})"
        try:
            sidecar = json.loads(sidecar_bytes)
            if not isinstance(sidecar, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return None, f"the sidecar is not valid JSON ({exc})"
        if sidecar.get("schema") != SCHEMA:
            return None, f"the sidecar's schema is {sidecar.get('schema')!r}, not {SCHEMA!r}"
        if sidecar.get("key") != key:
            return None, "the sidecar names another key"
        size, sha256 = sidecar.get("size"), sidecar.get("sha256")
        if not isinstance(size, int) or size <= 0 or not isinstance(sha256, str):
            return None, "the sidecar has no valid size and sha256"
        fields = sidecar.get("fields")
        try:
            if not isinstance(fields, dict) or _key_of(fields) != key:
                return None, "the sidecar's fields do not hash to its key"
        except (KeyError, TypeError, ValueError, MedgeError):
            return None, "the sidecar's fields are incomplete or malformed"
        try:
            with open(plan_path, "rb") as handle:
                data = handle.read(size + 1)  # never more than promised (+1 to notice a longer file)
        except FileNotFoundError:
            return None, "the sidecar's plan is missing"
        except OSError as exc:
            return None, f"the plan cannot be read ({exc.strerror})"
        if len(data) != size:
            return None, f"the plan has {len(data)}{'+' if len(data) > size else ''} bytes, the sidecar says {size}"
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            return None, f"the plan's SHA-256 {digest[:16]}... is not the sidecar's {sha256[:16]}..."
        return data, None

    # -- writing -----------------------------------------------------------------------

    def put(self, key: str, plan: PlanBytes, fields: Mapping[str, Any]) -> Path:
        """Store ``plan`` under ``key`` atomically (plan first, sidecar last); returns the plan's path.

        Args:
            key: from ``engine_cache_key``.
            plan: the serialised engine.
            fields: the key fields (``KEY_FIELDS``, more allowed); they must
                hash to ``key`` and are recorded in the sidecar.

        Raises:
            EngineCacheNotWritable: the folder cannot be created or written.
            MedgeError: malformed key, empty plan, fields not belonging to the key.
        """
        key = _check_key(key)
        if not isinstance(plan, (bytes, bytearray, memoryview)):
            raise MedgeError(f"the plan must be bytes, got {type(plan).__name__}")
        data = memoryview(plan).cast("B")
        if len(data) == 0:
            raise MedgeError("refusing to cache an empty engine plan")
        stored = _check_fields(key, fields)
        sidecar = {
            "schema": SCHEMA,
            "key": key,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "fields": stored,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        sidecar_bytes = json.dumps(sidecar, indent=1, sort_keys=True).encode()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._not_writable(exc) from exc
        with self._locked(key, exclusive=True, required=True):
            try:
                self._remove_stale_temporaries(key)
                atomic_write(self.plan_path(key), data)
                atomic_write(self.sidecar_path(key), sidecar_bytes)
                _fsync_dir(self.directory)
            except OSError as exc:
                raise self._not_writable(exc) from exc
        return self.plan_path(key)

    def get_or_build(self, key: str, build: Callable[[], PlanBytes], fields: Mapping[str, Any]) -> bytes:
        """The cached plan for ``key``; on a miss ``build()``'s, stored for next time.

        When the cache cannot be written, the built plan is still returned
        (with a warning that it will be built again next time): a read-only
        cache must not stop inference.

        Raises:
            MedgeError: malformed key or fields, or ``build()`` returned no bytes.
            Whatever ``build()`` raises.
        """
        key = _check_key(key)
        _check_fields(key, fields)
        cached = self.get(key, fields)
        if cached is not None:
            _LOG.debug("engine cache hit %s...", key[:16])
            return cached
        _LOG.info("engine cache miss %s...: building the engine", key[:16])
        plan = build()
        if not isinstance(plan, (bytes, bytearray, memoryview)) or len(memoryview(plan).cast("B")) == 0:
            raise MedgeError(f"the engine build returned {type(plan).__name__}, not the plan's bytes")
        try:
            self.put(key, plan, fields)
        except EngineCacheNotWritable as exc:
            _LOG.warning("%s; the engine is used without being cached and will be built again next time", exc)
        return bytes(plan)

    def remove(self, key: str) -> None:
        """Delete the entry for ``key`` (nothing happens when there is none)."""
        key = _check_key(key)
        if not self.directory.is_dir():
            return
        with self._locked(key, exclusive=True, required=False):
            self._remove_files(key)
            with contextlib.suppress(FileNotFoundError):
                self.runtime_cache_path(key).unlink()

    # -- internals -----------------------------------------------------------------------

    def _not_writable(self, exc: OSError) -> EngineCacheNotWritable:
        reason = exc.strerror or str(exc)
        return EngineCacheNotWritable(
            f"the engine cache folder {self.directory} is not writable ({reason}): point MEDGE_ENGINE_CACHE "
            "(or medge.load(engine_cache=...)) at a writable folder, or fix its permissions")

    def _remove_files(self, key: str) -> None:
        # Sidecar first: a plan without a sidecar is never trusted, a sidecar without its plan costs a check.
        for path in (self.sidecar_path(key), self.plan_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _remove_stale_temporaries(self, key: str) -> None:
        """Temporary files of ``key`` left by a writer that died; called under the key's exclusive lock."""
        for pattern in (f".{key}.engine.*.tmp", f".{key}.json.*.tmp"):
            for path in self.directory.glob(pattern):
                with contextlib.suppress(OSError):
                    path.unlink()

    @contextlib.contextmanager
    def _locked(self, key: str, *, exclusive: bool, required: bool) -> Iterator[None]:
        """Hold ``<key>.lock``. ``required=False`` (readers of a read-only cache) goes on unlocked if it cannot."""
        path = self.directory / f"{key}.lock"
        fd = None
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
            try:
                fd = os.open(path, flags, 0o644)
                break
            except OSError as exc:
                error = exc
        if fd is None:
            if required:
                raise self._not_writable(error)
            _LOG.debug("engine cache %s: reading %s... without a lock: %s", self.directory, key[:16], error)
            yield
            return
        try:
            try:
                _acquire(fd, exclusive)
            except OSError as exc:  # a file system without locks
                if required and exclusive:
                    _LOG.debug("engine cache %s: no file locks here (%s); writing unlocked", self.directory, exc)
                fd_locked = False
            else:
                fd_locked = True
            try:
                yield
            finally:
                if fd_locked:
                    with contextlib.suppress(OSError):
                        _release(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- TensorRT-RTX runtime caches

_RUNTIME_CACHE_MAGIC = b"medge-rtx-runtime-cache/1\n"


class RuntimeCacheFile:
    """TensorRT-RTX's runtime cache for one engine on this GPU, kept as ``<key>.rtxcache`` in the engine cache.

    TensorRT-RTX compiles its kernels just in time, on the first inference of
    each shape; its ``IRuntimeCache`` holds them and serialises to a blob. This
    file keeps that blob between processes. The blob is compiled GPU code, so
    it is verified like an engine before TensorRT-RTX sees it: the file is a
    magic line, a JSON line (``plan_sha256``: the engine it belongs to,
    ``sha256`` and ``size`` of the blob) and the blob. A file that does not
    verify, or belongs to another plan, is deleted with a warning and treated
    as absent; TensorRT-RTX itself then checks the blob against the GPU, driver
    and version (``IRuntimeCache.deserialize``), and a blob it refuses is
    discarded the same way (:meth:`discard`). Writes are atomic (temporary
    file, fsync, rename) under the key's lock, so a reader sees a whole file.

    Made by :meth:`EngineCache.runtime_cache`.
    """

    def __init__(self, cache: EngineCache, key: str, plan_sha256: str) -> None:
        self._cache = cache
        self.key = key
        self.plan_sha256 = plan_sha256
        self.path = cache.runtime_cache_path(key)

    def __repr__(self) -> str:
        return f"RuntimeCacheFile({str(self.path)!r})"

    def load(self) -> Optional[bytes]:
        """The stored blob when it verifies and belongs to this plan; None otherwise (a bad file is discarded)."""
        blob, problem = self._read()
        if problem is not None:
            self.discard(problem, only_if_unusable=True)
        return blob

    def save(self, blob: PlanBytes) -> None:
        """Store ``blob`` (``IRuntimeCache.serialize()``) for this plan, atomically.

        Raises:
            EngineCacheNotWritable: the folder cannot be created or written.
        """
        data = bytes(memoryview(blob).cast("B"))
        header = json.dumps({"plan_sha256": self.plan_sha256, "sha256": hashlib.sha256(data).hexdigest(),
                             "size": len(data)}, sort_keys=True).encode()
        cache = self._cache
        try:
            cache.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cache._not_writable(exc) from exc
        with cache._locked(self.key, exclusive=True, required=True):
            try:
                for stale in cache.directory.glob(f".{self.path.name}.*.tmp"):  # left by a writer that died
                    with contextlib.suppress(OSError):
                        stale.unlink()
                atomic_write(self.path, _RUNTIME_CACHE_MAGIC + header + b"\n" + data)
            except OSError as exc:
                raise cache._not_writable(exc) from exc

    def discard(self, reason: str, *, only_if_unusable: bool = False) -> None:
        """Delete the file, with a warning naming ``reason``; kernels are compiled again and saved anew.

        ``only_if_unusable``: look again under the lock first and keep a file
        that a concurrent writer has meanwhile replaced with a good one.
        """
        with self._cache._locked(self.key, exclusive=True, required=False):
            if only_if_unusable and self._read()[1] is None:
                return
            _LOG.warning("engine cache %s: TensorRT-RTX runtime cache %s is unusable (%s); discarded, its kernels "
                         "are compiled again on first use", self._cache.directory, self.path.name, reason)
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _read(self) -> tuple:
        """(blob, None) when valid, (None, None) when absent, (None, what is wrong) otherwise."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, f"it cannot be read ({exc.strerror})"
        if not raw.startswith(_RUNTIME_CACHE_MAGIC):
            return None, "it is not a medge runtime cache file"
        header, newline, blob = raw[len(_RUNTIME_CACHE_MAGIC):].partition(b"\n")
        try:
            fields = json.loads(header) if newline else None
            if not isinstance(fields, dict):
                raise ValueError("no header")
            size, sha256, plan_sha256 = fields["size"], fields["sha256"], fields["plan_sha256"]
        except (ValueError, KeyError) as exc:
            return None, f"its header is malformed ({exc})"
        if plan_sha256 != self.plan_sha256:
            return None, "it belongs to another build of the engine"
        if len(blob) != size:
            return None, f"it holds {len(blob)} bytes, its header says {size}"
        if hashlib.sha256(blob).hexdigest() != sha256:
            return None, "its SHA-256 is not the one in its header"
        return blob, None
