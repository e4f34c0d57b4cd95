"""The medge bundle: the one artifact between the build side and the runtime.

Format (schema_version 1). A bundle is a **directory**, by convention named
``NAME.medge``::

    NAME.medge/
      manifest.json          canonical JSON (below); the only file the runtime trusts first
      manifest.json.sig      optional Ed25519 signature over the exact bytes of manifest.json
      models/model.fp32.onnx
      models/model.int8.onnx
      engines/<...>.engine   serialized TensorRT / TensorRT-RTX engines
      engines/<...>.layers.json
      reports/accuracy.json

A directory rather than an archive: engines are deserialised from memory and
ONNX Runtime opens models by path, so the runtime reads each artifact exactly
once, with no extraction step and no temporary copies next to the scanner.

``manifest.json`` holds what the build side wrote (``model``, ``inputs``,
``outputs``, ``preprocess``, ``labels``, ``postprocess``, ``graphs``,
``calibration``, ``accuracy``, ``engines``; see :func:`describe`) plus four
keys the writer owns: ``schema_version`` (1), ``files`` (``{arcname:
{"sha256": hex, "size": bytes}}`` for every artifact), ``created`` (ISO-8601
UTC; ``SOURCE_DATE_EPOCH`` is honoured for reproducible builds) and
``medge_version``. It is written as canonical JSON: UTF-8, keys sorted,
2-space indent, no NaN/Infinity, one trailing newline. Signatures and
verification always work on the exact bytes on disk, never on a
re-serialisation.

Integrity: the manifest carries every file's SHA-256 and size, so checking
the manifest's signature and then each file's hash checks everything.
:meth:`Bundle.verify` recomputes every hash (streaming) and also refuses
unlisted extra files, symlinks and special files. Executable artifacts
(engines) should be loaded with :meth:`Bundle.read_verified`, which hashes
the very bytes it returns, so nothing can change between check and use.

Signature (``manifest.json.sig``): JSON ``{"algorithm": "ed25519",
"public_key_sha256": hex SHA-256 of the raw 32-byte public key, "signature":
base64}``. The fingerprint only says which key signed; trust comes from the
public key the caller passes to :meth:`Bundle.verify`. ``cryptography`` is
imported only to sign or to check a signature.

File names (arcnames) in a bundle are relative POSIX paths of segments made of
``A-Z a-z 0-9 _ . + -``, not starting with ``.`` or ``-``, not ending with
``.``, no Windows device names, unique without regard to case (bundles are
copied to Windows consoles and macOS laptops). Arcnames read from a manifest
are validated again on open: a malicious manifest cannot make medge read
outside the bundle.

Writing is atomic: :class:`BundleWriter` builds into a hidden temporary
sibling directory and renames it into place on :meth:`BundleWriter.commit`,
so an interrupted conversion never leaves a half bundle.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .errors import BundleError, MissingDependency, SignatureError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "Bundle",
    "BundleWriter",
    "FileEntry",
    "Verification",
    "describe",
    "describe_json",
    "canonical_json",
    "generate_signing_key",
    "load_signing_key",
    "load_trusted_key",
    "public_key_fingerprint",
    "validate_arcname",
    "safe_name",
]

#: Version of the bundle format this medge writes and reads.
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
SIGNATURE_ALGORITHM = "ed25519"

# Keys of manifest.json that BundleWriter.commit fills in itself.
WRITER_KEYS = ("schema_version", "files", "created", "medge_version")

# The pip extra that brings `cryptography`. The lead decides the final name.
_CRYPTO_EXTRA = "convert"

_CHUNK = 1 << 20  # streaming hash block
_MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; refuse to slurp a planted huge file
_MAX_SIG_BYTES = 64 << 10
_MAX_ARCNAME = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_WINDOWS_DEVICES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"com{i}" for i in range(1, 10)] + [f"lpt{i}" for i in range(1, 10)]
)
_RESERVED = frozenset([MANIFEST_NAME, SIGNATURE_NAME])


# ---------------------------------------------------------------------------
# Names


def validate_arcname(name: Any, *, where: str = "file name") -> str:
    """Check that ``name`` is a safe relative file name inside a bundle and return it.

    Args:
        name: a POSIX-style relative path such as ``"engines/rtx_int8.engine"``.
        where: how to refer to the name in the error message.

    Returns:
        ``name`` unchanged (arcnames are never rewritten: the manifest and the
        disk must agree byte for byte).

    Raises:
        BundleError: absolute paths, ``..`` or ``.`` segments, backslashes,
            empty segments, characters outside ``A-Z a-z 0-9 _ . + -``, names
            starting with ``.`` or ``-``, Windows device names, the reserved
            ``manifest.json`` / ``manifest.json.sig``, or over-long names.
    """
    if not isinstance(name, str):
        raise BundleError(f"{where} must be a string, got {type(name).__name__}")
    shown = repr(name) if len(name) <= 200 else repr(name[:200] + "...")
    if not name:
        raise BundleError(f"{where} is empty")
    if len(name) > _MAX_ARCNAME:
        raise BundleError(f"{where} {shown} is longer than {_MAX_ARCNAME} characters")
    if "\\" in name:
        raise BundleError(f"{where} {shown} contains a backslash; use '/' between folders")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise BundleError(f"{where} {shown} is absolute; give a path relative to the bundle")
    segments = name.split("/")
    for segment in segments:
        if segment in ("..", "."):
            raise BundleError(f"{where} {shown} contains a '{segment}' segment; it must stay inside the bundle")
        if not segment:
            raise BundleError(f"{where} {shown} has an empty path segment")
        if not _SEGMENT.match(segment):
            raise BundleError(
                f"{where} {shown}: segment {segment!r} must be made of letters, digits, '_', '.', '+', '-' "
                f"and not start with '.' or '-' (at most 255 characters)"
            )
        if segment.endswith("."):
            raise BundleError(f"{where} {shown}: segment {segment!r} ends with '.', which Windows cannot store")
        if segment.split(".")[0].lower() in _WINDOWS_DEVICES:
            raise BundleError(f"{where} {shown}: {segment!r} is a Windows device name")
    if name.lower() in _RESERVED:
        raise BundleError(f"{where} {shown} is reserved for the bundle's own manifest")
    return name


def safe_name(text: str, *, max_length: int = 120) -> str:
    """Turn free text (a GPU name, a model name) into one safe arcname segment.

    ``safe_name("NVIDIA GeForce RTX 4090") == "NVIDIA_GeForce_RTX_4090"``.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._-+")[:max_length].rstrip(".")
    if not cleaned or cleaned.split(".")[0].lower() in _WINDOWS_DEVICES:
        cleaned = "_" + cleaned
    return cleaned


# ---------------------------------------------------------------------------
# Canonical JSON


def _json_ready(value: Any, where: str) -> Any:
    """A copy of ``value`` made of plain JSON types; numpy scalars and arrays become Python values."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BundleError(
                f"manifest value {where} is {value!r}; JSON cannot hold NaN or infinity: store None "
                f"(null) and say why in a 'reason' field instead"
            )
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"manifest key {key!r} under {where} must be a string")
            out[key] = _json_ready(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_json_ready(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "tolist"):
        return _json_ready(value.tolist(), where)  # numpy scalars and arrays, without importing numpy
    raise TypeError(
        f"manifest value {where} is a {type(value).__name__}, which is not JSON; convert it first "
        f"(e.g. spec.to_dict(), str(path))"
    )


def canonical_json(data: Any) -> bytes:
    """The canonical byte form of manifests and JSON artifacts (sorted keys, UTF-8, 2-space indent)."""
    try:
        text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BundleError(f"manifest text is not valid Unicode: {exc}") from exc


def _no_duplicate_keys(pairs):
    # Duplicate keys are the classic way to make two JSON parsers see two manifests.
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise BundleError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start}); it is damaged") from exc
    except RecursionError as exc:
        raise BundleError(f"{what} is nested too deeply to be a medge manifest") from exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise BundleError(f"{what} is not valid JSON ({exc}); it is damaged or was not written by medge") from exc


# ---------------------------------------------------------------------------
# Manifest schema


@dataclass(frozen=True)
class FileEntry:
    """One artifact listed in a manifest."""

    sha256: str
    size: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_manifest(data: Any, what: str) -> dict[str, FileEntry]:
    """Schema-check a parsed manifest; return its validated file table."""
    if not isinstance(data, dict):
        raise BundleError(f"{what} must hold a JSON object, found {type(data).__name__}")
    version = data.get("schema_version")
    if not _is_int(version):
        raise BundleError(f"{what} has no integer schema_version; it was not written by medge or is damaged")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{what} has schema_version {version}, written by a newer medge; this medge reads "
            f"schema_version {SCHEMA_VERSION}. Upgrade medge (pip install -U medge) to open this bundle"
        )
    if version != SCHEMA_VERSION:
        raise BundleError(f"{what} has unknown schema_version {version} (this medge reads {SCHEMA_VERSION})")
    files = data.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{what} has no 'files' table")
    table: dict[str, FileEntry] = {}
    folded: dict[str, str] = {}
    for name, entry in files.items():
        validate_arcname(name, where=f"{what}: file name")
        other = folded.setdefault(name.lower(), name)
        if other != name:
            raise BundleError(f"{what} lists {other!r} and {name!r}, which collide on case-insensitive disks")
        if not isinstance(entry, dict):
            raise BundleError(f"{what}: the entry of {name} must be an object with sha256 and size")
        digest, size = entry.get("sha256"), entry.get("size")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise BundleError(f"{what}: the sha256 of {name} is not 64 lowercase hex digits")
        if not _is_int(size) or size < 0:
            raise BundleError(f"{what}: the size of {name} is not a non-negative integer")
        table[name] = FileEntry(digest, size)
    for key in ("created", "medge_version"):
        if key in data and not isinstance(data[key], str):
            raise BundleError(f"{what}: {key} must be a string")
    for field, name in _referenced_files(data, what):
        if not isinstance(name, str) or name not in table:
            raise BundleError(f"{what}: {field} names {name!r}, which is not in the bundle's files table")
    _check_sections(data, what)
    return table


# The shape of each section the runtime reads, checked when a bundle is opened so that a damaged or
# hand-edited manifest answers with a BundleError naming the field, never a KeyError or TypeError deep in
# the runtime. Sections absent here are checked where they are required (medge.load needs task, graphs,
# profile, preprocess, gates and check vectors).
_PRECISIONS = ("fp32", "fp16", "int8")
_VERDICTS = ("reference", "passed", "failed", "not measured", "ungated")


def _kind(value: Any, kind: Any) -> bool:
    if kind is int:
        return _is_int(value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def _need(value: Any, kind: Any, field: str, what: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return value
    if not _kind(value, kind):
        names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
                 bool: "true or false"}
        raise BundleError(f"{what}: {field} must be {names.get(kind, kind.__name__)}"
                          + (" or null" if optional else ""))
    return value


def _check_sections(data: dict, what: str) -> None:
    for key in ("model", "preprocess", "postprocess", "task", "gates", "check_vectors", "profile"):
        if key in data:
            _need(data[key], dict, key, what, optional=key in ("postprocess",))
    for key in ("inputs", "outputs"):
        for index, tensor in enumerate(_need(data.get(key, []), list, key, what)):
            _need(tensor, dict, f"{key}[{index}]", what)
            _need(tensor.get("name"), str, f"{key}[{index}].name", what)
            shape = _need(tensor.get("shape"), list, f"{key}[{index}].shape", what)
            if not all(d is None or _is_int(d) or isinstance(d, str) for d in shape):
                raise BundleError(f"{what}: {key}[{index}].shape must hold integers, names or nulls")
    preprocess, task = data.get("preprocess"), data.get("task")
    # A 2-D PreprocessSpec has no "kind"; a segmentation bundle's VolumeSpec says "volume". The task and the
    # spec must agree: a runtime must never feed a volume spec's output to a classifier or the reverse.
    if isinstance(preprocess, dict) and "kind" in preprocess and preprocess["kind"] != "volume":
        raise BundleError(f"{what}: preprocess.kind must be 'volume' (a segmentation bundle's volume spec) or absent")
    if isinstance(task, dict) and isinstance(preprocess, dict):
        volume = preprocess.get("kind") == "volume"
        if (task.get("kind") == "segmentation") != volume:
            raise BundleError(f"{what}: a segmentation task needs a volume spec (preprocess.kind 'volume') and a "
                              f"volume spec a segmentation task; this manifest has task {task.get('kind')!r} with "
                              f"{'a volume' if volume else 'a 2-D'} spec")
        if task.get("kind") == "segmentation":
            roi = _need(task.get("roi"), list, "task.roi", what)
            if not roi or not all(_is_int(r) and r >= 1 for r in roi):
                raise BundleError(f"{what}: task.roi must be a list of positive integers")
            _need(task.get("classes"), int, "task.classes", what)
            _need(task.get("sw_batch"), int, "task.sw_batch", what)
            for key in ("overlap", "sigma_scale"):
                _need(task.get(key), float, f"task.{key}", what)
    labels = _need(data.get("labels", []), list, "labels", what, optional=True) or []
    if not all(isinstance(label, str) for label in labels):
        raise BundleError(f"{what}: labels must be a list of strings")
    profile = data.get("profile")
    if profile is not None:
        values = [_need(profile.get(k), int, f"profile.{k}", what) for k in ("min", "opt", "max")]
        if not 1 <= values[0] <= values[1] <= values[2] <= 4096:
            raise BundleError(f"{what}: profile must have 1 <= min <= opt <= max <= 4096")
    for name, graph in (data.get("graphs") or {}).items():
        if graph.get("precision", name) not in _PRECISIONS:
            raise BundleError(f"{what}: graphs.{name}.precision must be one of {', '.join(_PRECISIONS)}")
        for key in ("input_dtype", "output_dtype", "target"):
            _need(graph.get(key, ""), str, f"graphs.{name}.{key}", what)
    for index, engine in enumerate(data.get("engines") or []):
        _need(engine.get("flavour"), str, f"engines[{index}].flavour", what)
        if engine.get("precision") not in _PRECISIONS:
            raise BundleError(f"{what}: engines[{index}].precision must be one of {', '.join(_PRECISIONS)}")
        targets = _need(engine.get("compute_capabilities"), list, f"engines[{index}].compute_capabilities", what,
                        optional=True)
        if targets is not None and not all(isinstance(t, str) for t in targets):
            raise BundleError(f"{what}: engines[{index}].compute_capabilities must be strings")
        gpu = _need(engine.get("gpu"), dict, f"engines[{index}].gpu", what, optional=True)
        if gpu is not None:
            _need(gpu.get("name"), str, f"engines[{index}].gpu.name", what)
    gates = data.get("gates")
    if gates is not None:
        _need(gates.get("passed"), bool, "gates.passed", what)
        for name, verdict in _need(gates.get("verdicts", {}), dict, "gates.verdicts", what).items():
            _need(verdict, dict, f"gates.verdicts.{name}", what)
            if verdict.get("verdict") not in _VERDICTS:
                raise BundleError(f"{what}: gates.verdicts.{name}.verdict must be one of {', '.join(_VERDICTS)}")
            reasons = _need(verdict.get("reasons", []), list, f"gates.verdicts.{name}.reasons", what)
            if not all(isinstance(r, str) for r in reasons):
                raise BundleError(f"{what}: gates.verdicts.{name}.reasons must be strings")


def _referenced_files(data: dict, what: str):
    """(field, arcname) for every artifact the manifest's sections point to."""
    graphs = data.get("graphs")
    if graphs is not None:
        if not isinstance(graphs, dict):
            raise BundleError(f"{what}: 'graphs' must be an object {{precision: {{file, ...}}}}")
        for precision, graph in graphs.items():
            if not isinstance(graph, dict):
                raise BundleError(f"{what}: graphs.{precision} must be an object with a 'file'")
            if "file" in graph:
                yield f"graphs.{precision}.file", graph["file"]
    engines = data.get("engines")
    if engines is not None:
        if not isinstance(engines, list):
            raise BundleError(f"{what}: 'engines' must be a list")
        for index, engine in enumerate(engines):
            if not isinstance(engine, dict):
                raise BundleError(f"{what}: engines[{index}] must be an object")
            for key in ("file", "layers_file"):
                if engine.get(key) is not None:
                    yield f"engines[{index}].{key}", engine[key]


# ---------------------------------------------------------------------------
# Safe file access


def _open_regular(path: Path, shown: str):
    """Open a regular file for binary reading, refusing symlinks, FIFOs and devices.

    Returns (file object, size). O_NOFOLLOW refuses a symlinked final
    component; O_NONBLOCK keeps a planted FIFO from blocking the open.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{shown} is missing") from None
    except OSError as exc:
        raise BundleError(f"{shown} cannot be read: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"{shown} is a symbolic link; bundles hold only regular files")
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{shown} is not a regular file")
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{shown} is a symbolic link; bundles hold only regular files") from exc
        raise BundleError(f"{shown} cannot be read: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{shown} is not a regular file")
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _read_limited(path: Path, shown: str, limit: int) -> bytes:
    handle, size = _open_regular(path, shown)
    with handle:
        if size > limit:
            raise BundleError(f"{shown} is {size} bytes, far too large to be what medge wrote")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{shown} is far too large to be what medge wrote")
    return data


def _fsync_dir(path: Path) -> None:
    # Durability of renames and new directory entries after a power cut; POSIX only.
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_sibling_dir(path: Path, suffix: str) -> Path:
    """Create a hidden, uniquely named directory next to ``path``.

    Not tempfile.mkdtemp: its mode 0700 would be carried into the bundle by
    the final rename, and a runtime service running as another user could
    not read it. os.mkdir applies the umask as for any other folder.
    """
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(): flags 1 = RENAME_NOREPLACE, 2 = RENAME_EXCHANGE.

    Returns False where the call or the flag is not supported (other OS,
    old libc, a filesystem without it); raises OSError for real failures.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False
    raise OSError(err, os.strerror(err), str(dst))


# ---------------------------------------------------------------------------
# Keys and signatures


def _crypto(purpose: str):
    """The cryptography modules, or MissingDependency naming the extra."""
    try:
        from cryptography import exceptions
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise MissingDependency("cryptography", _CRYPTO_EXTRA, purpose) from exc
    return ed25519, serialization, exceptions


def _raw_public(key) -> bytes:
    _, serialization, _ = _crypto("Checking bundle signatures")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_fingerprint(key) -> str:
    """Hex SHA-256 of the raw 32-byte Ed25519 public key (of a public or a private key)."""
    if hasattr(key, "public_key"):
        key = key.public_key()
    return hashlib.sha256(_raw_public(key)).hexdigest()


def _key_bytes(key: Any, what: str) -> tuple[bytes, str]:
    """PEM bytes of a key given as a path, PEM text or PEM bytes, and how to name it."""
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key), what
    if isinstance(key, str) and key.lstrip().startswith("-----BEGIN"):
        return key.encode("ascii", "replace"), what
    if isinstance(key, (str, os.PathLike)):
        path = Path(key)
        try:
            return path.read_bytes(), f"{what} {path}"
        except OSError as exc:
            raise BundleError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    raise TypeError(f"{what} must be a PEM path, PEM bytes or a key object, got {type(key).__name__}")


def load_signing_key(key: Any):
    """An Ed25519 private key from a PEM path, PEM text/bytes, or a key object (returned as is).

    Load the key before a long conversion so a wrong path fails at once.

    Raises:
        MissingDependency: ``cryptography`` is not installed.
        BundleError: the file cannot be read, is encrypted, or is not an
            unencrypted Ed25519 private key in PEM form.
    """
    ed25519, serialization, _ = _crypto("Signing bundles")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    data, name = _key_bytes(key, "signing key")
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise BundleError(f"{name} is encrypted; medge needs an unencrypted PEM key ({exc})") from exc
    except Exception as exc:  # ValueError, UnsupportedAlgorithm: not a usable PEM private key
        raise BundleError(f"{name} is not a PEM private key: {exc}") from exc
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise BundleError(f"{name} is a {type(loaded).__name__}; medge signs with Ed25519 keys "
                          f"(make one with generate_signing_key)")
    return loaded


def load_trusted_key(key: Any):
    """An Ed25519 public key from a PEM path, PEM text/bytes, or a key object (returned as is).

    Raises:
        MissingDependency: ``cryptography`` is not installed.
        BundleError: unreadable, a private key (give the public one), or not Ed25519.
    """
    ed25519, serialization, _ = _crypto("Checking bundle signatures")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raise BundleError("the trusted key must be the public key; a private key must never reach the runtime")
    data, name = _key_bytes(key, "trusted key")
    if b"PRIVATE KEY" in data:
        raise BundleError(f"{name} is a private key; give the matching public key (a private key must never "
                          f"reach the runtime)")
    try:
        loaded = serialization.load_pem_public_key(data)
    except Exception as exc:  # ValueError, UnsupportedAlgorithm
        raise BundleError(f"{name} is not a PEM public key: {exc}") from exc
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise BundleError(f"{name} is a {type(loaded).__name__}; medge bundles are signed with Ed25519")
    return loaded


def generate_signing_key(private_path: Union[str, os.PathLike], public_path: Union[str, os.PathLike]) -> str:
    """Create an Ed25519 key pair as PEM files.

    The private key (PKCS#8, unencrypted) is created with mode 0600 and never
    overwrites an existing file; the public key (SubjectPublicKeyInfo) is what
    deployments pass as the trusted key.

    Returns:
        The public key's fingerprint (hex SHA-256 of the raw public key), as
        recorded in signatures.

    Raises:
        MissingDependency: ``cryptography`` is not installed.
        BundleError: either file exists already or cannot be written.
    """
    ed25519, serialization, _ = _crypto("Signing bundles")
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise BundleError(f"{path} exists; refusing to overwrite a key (remove it first if you mean it)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        # O_EXCL + mode at creation: the private key is never readable by others, not even briefly.
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(public_pem)
    except OSError as exc:
        raise BundleError(f"cannot write the key pair: {exc}") from exc
    return public_key_fingerprint(key)


def _sign(manifest_bytes: bytes, key) -> bytes:
    signature = key.sign(manifest_bytes)
    record = {
        "algorithm": SIGNATURE_ALGORITHM,
        "public_key_sha256": public_key_fingerprint(key),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return canonical_json(record)


# ---------------------------------------------------------------------------
# Writer


class BundleWriter:
    """Builds a bundle in a temporary sibling directory and moves it into place on commit.

    Use as a context manager; leaving the block without commit() (or with an
    exception) removes everything written::

        with BundleWriter("out/chest.medge") as writer:
            writer.add_file("build/model.fp32.onnx", "models/model.fp32.onnx")
            writer.add_file(engine_bytes, "engines/rtx-1.2_sm89_int8.engine")
            bundle = writer.commit(manifest, sign_key="keys/medge.pem")

    Args:
        path: the bundle directory to create (conventionally ``NAME.medge``).
        overwrite: replace an existing bundle at ``path``. Only a directory
            holding a ``manifest.json`` (or an empty one) is ever replaced; on
            Linux the swap is atomic (``renameat2(RENAME_EXCHANGE)``), elsewhere
            there is a moment between two renames with no bundle at ``path``.

    Raises:
        BundleError: ``path`` exists and ``overwrite`` is False, or exists and
            is not a bundle; the parent folder cannot be written.
    """

    def __init__(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        if not self.path.name or self.path.name in (".", ".."):
            raise BundleError(f"{path!r} is not a usable bundle path")
        self._check_target()  # fail before an hour of engine building, not after
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._tmp = _new_sibling_dir(self.path, ".partial")
        except OSError as exc:
            raise BundleError(f"cannot create a bundle in {parent}: {exc.strerror or exc}") from exc
        # Removes the temporary directory if the writer is dropped without commit or abort.
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
        self._files: dict[str, FileEntry] = {}
        self._folded: dict[str, str] = {}
        self._closed = False

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._files)} file(s)"
        return f"BundleWriter({str(self.path)!r}, {state})"

    @property
    def files(self) -> dict[str, FileEntry]:
        """The artifacts added so far."""
        return dict(self._files)

    def abort(self) -> None:
        """Discard everything written (no-op after commit)."""
        self._closed = True
        self._finalizer()

    # -- adding files -------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise BundleError(f"the writer of {self.path} is closed (committed or aborted)")

    def add_file(self, source: Union[str, os.PathLike, bytes, bytearray, memoryview], arcname: str) -> str:
        """Copy an artifact into the bundle, recording its SHA-256 and size.

        Args:
            source: a path to copy (str or PathLike), or the content itself
                (bytes-like). The hash is computed on the bytes as written.
            arcname: where it goes in the bundle, e.g. ``"models/model.int8.onnx"``.

        Returns:
            ``arcname``.

        Raises:
            BundleError: unsafe or duplicate ``arcname`` (see
                :func:`validate_arcname`), unreadable ``source``, closed writer.
        """
        self._ensure_open()
        validate_arcname(arcname)
        other = self._folded.get(arcname.lower())
        if other is not None:
            same = "is already" if other == arcname else f"collides (ignoring case) with {other!r}, already"
            raise BundleError(f"bundle file {arcname!r} {same} in the bundle")
        # A file and a folder of the same name cannot both exist.
        for existing in self._folded:
            if existing.startswith(arcname.lower() + "/") or arcname.lower().startswith(existing + "/"):
                raise BundleError(f"bundle file {arcname!r} clashes with {self._folded[existing]!r} (file vs folder)")
        target = self._tmp.joinpath(*arcname.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        try:
            with open(target, "xb") as out:
                if isinstance(source, (bytes, bytearray, memoryview)):
                    view = memoryview(source).cast("B")
                    digest.update(view)
                    out.write(view)
                    size = view.nbytes
                elif isinstance(source, (str, os.PathLike)):
                    src = Path(source)
                    if src.is_dir():
                        raise BundleError(f"{src} is a folder; add_file copies one file")
                    try:
                        handle = open(src, "rb")
                    except OSError as exc:
                        raise BundleError(f"cannot read {src} for {arcname}: {exc.strerror}") from exc
                    with handle:
                        buffer = bytearray(_CHUNK)
                        view = memoryview(buffer)
                        while True:
                            n = handle.readinto(buffer)
                            if not n:
                                break
                            digest.update(view[:n])
                            out.write(view[:n])
                            size += n
                else:
                    raise TypeError(f"source must be a path or bytes, got {type(source).__name__}")
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            try:
                target.unlink()
            except OSError:
                pass
            raise
        self._files[arcname] = FileEntry(digest.hexdigest(), size)
        self._folded[arcname.lower()] = arcname
        return arcname

    def add_json(self, data: Any, arcname: str) -> str:
        """Add a JSON artifact (e.g. ``reports/accuracy.json``) in canonical form. Returns ``arcname``."""
        return self.add_file(canonical_json(_json_ready(data, arcname)), arcname)

    # -- commit --------------------------------------------------------------

    def _check_target(self) -> None:
        path = self.path
        if not os.path.lexists(path):
            return
        if not self.overwrite:
            raise BundleError(f"{path} exists; pass overwrite=True (medge-convert --overwrite) to replace it")
        if path.is_symlink() or not path.is_dir():
            raise BundleError(f"{path} exists and is not a bundle directory; refusing to replace it")
        if not (path / MANIFEST_NAME).is_file() and any(path.iterdir()):
            raise BundleError(f"{path} exists and is not a medge bundle (no {MANIFEST_NAME}); refusing to replace it")

    def _final_manifest(self, manifest: Mapping[str, Any]) -> bytes:
        if not isinstance(manifest, Mapping):
            raise TypeError(f"manifest must be a dict, got {type(manifest).__name__}")
        clash = sorted(set(WRITER_KEYS) & set(manifest))
        if clash:
            raise BundleError(f"manifest key(s) {', '.join(clash)} are written by BundleWriter; leave them out")
        data = _json_ready(manifest, "manifest")
        from . import __version__

        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.isdigit()
                else _dt.datetime.now(_dt.timezone.utc))
        data.update(
            schema_version=SCHEMA_VERSION,
            files={name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(self._files.items())},
            created=when.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            medge_version=__version__,
        )
        encoded = canonical_json(data)
        # The writer never produces a bundle that Bundle.open would refuse.
        _check_manifest(_parse_json(encoded, MANIFEST_NAME), MANIFEST_NAME)
        return encoded

    def commit(self, manifest: Mapping[str, Any], *, sign_key: Any = None) -> "Bundle":
        """Write manifest.json (and its signature), then move the bundle into place.

        Args:
            manifest: the build side's sections (model, inputs, outputs,
                preprocess, labels, graphs, calibration, accuracy, engines, ...).
                Must not contain the writer's keys (schema_version, files,
                created, medge_version). numpy scalars/arrays are converted;
                NaN and infinity are refused (store None).
            sign_key: an Ed25519 private key (PEM path, PEM bytes, or key
                object) to sign the manifest with, or None for an unsigned bundle.

        Returns:
            The committed bundle, opened.

        Raises:
            BundleError: invalid manifest values, a reference (graphs.*.file,
                engines[].file / layers_file) to a file that was not added, an
                unusable key, or the target appeared meanwhile.
            MissingDependency: signing without ``cryptography``.

        On any failure the writer is aborted: nothing is left on disk.
        """
        self._ensure_open()
        try:
            key = load_signing_key(sign_key) if sign_key is not None else None
            encoded = self._final_manifest(manifest)
            self._write_new(self._tmp / MANIFEST_NAME, encoded)
            if key is not None:
                self._write_new(self._tmp / SIGNATURE_NAME, _sign(encoded, key))
            for directory, _, _ in os.walk(self._tmp):
                _fsync_dir(Path(directory))
            self._check_target()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._finalizer.detach()
        return Bundle.open(self.path)

    @staticmethod
    def _write_new(path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _move_into_place(self) -> None:
        path, tmp = self.path, self._tmp
        try:
            if not os.path.lexists(path):
                if not _renameat2(tmp, path, 1):  # RENAME_NOREPLACE; else check-then-rename
                    if os.path.lexists(path):
                        raise FileExistsError(errno.EEXIST, "exists", str(path))
                    os.rename(tmp, path)
            elif _renameat2(tmp, path, 2):  # RENAME_EXCHANGE: the old bundle now sits at tmp
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = path.with_name(f".{path.name}.{secrets.token_hex(6)}.old")
                os.rename(path, old)
                try:
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old, path)
                    raise
                shutil.rmtree(old, ignore_errors=True)
        except FileExistsError as exc:
            raise BundleError(f"{path} appeared while the bundle was being written; not replacing it") from exc
        except OSError as exc:
            raise BundleError(f"cannot move the new bundle into place at {path}: {exc.strerror or exc}") from exc
        _fsync_dir(path.parent)


# ---------------------------------------------------------------------------
# Reading and verifying


@dataclass(frozen=True)
class Verification:
    """What :meth:`Bundle.verify` checked."""

    files: int
    bytes: int
    signed_by: Optional[str]  # fingerprint of the trusted key that signed, None when not checked

    def __str__(self) -> str:
        signature = f"signature valid (key {self.signed_by[:16]})" if self.signed_by else "signature not checked"
        return f"OK: {self.files} file(s), {_size(self.bytes)} hashed, {signature}"


class Bundle:
    """An opened bundle: its manifest, checked for shape, and access to its artifacts.

    Opening reads only manifest.json (and validates every arcname in it);
    call :meth:`verify` to check the artifacts, and load executable artifacts
    with :meth:`read_verified`.
    """

    def __init__(self, path: Path, manifest_bytes: bytes, manifest: dict, files: dict[str, FileEntry]) -> None:
        self._path = path
        self._manifest_bytes = manifest_bytes
        self._manifest = manifest
        self._files = files

    @classmethod
    def open(cls, path: Union[str, os.PathLike]) -> "Bundle":
        """Open the bundle directory at ``path`` and schema-check its manifest.

        Raises:
            BundleError: not a bundle directory, manifest.json missing or not
                valid JSON, an unknown schema_version (upgrade medge), or an
                unsafe / inconsistent files table.
        """
        path = Path(path)
        if not path.is_dir():
            if path.exists():
                raise BundleError(f"{path} is not a medge bundle: a bundle is a directory (NAME.medge/)")
            raise BundleError(f"{path}: no such bundle")
        shown = f"{path / MANIFEST_NAME}"
        if not os.path.lexists(path / MANIFEST_NAME):
            raise BundleError(f"{path} is not a medge bundle: it has no {MANIFEST_NAME}")
        data = _read_limited(path / MANIFEST_NAME, shown, _MAX_MANIFEST_BYTES)
        manifest = _parse_json(data, shown)
        files = _check_manifest(manifest, shown)
        return cls(path, data, manifest, files)

    # -- what is in it -----------------------------------------------------

    @property
    def path(self) -> Path:
        """The bundle directory."""
        return self._path

    @property
    def manifest(self) -> dict:
        """The parsed manifest.json (as read at open; verification uses its own copy)."""
        return self._manifest

    @property
    def manifest_bytes(self) -> bytes:
        """The exact bytes of manifest.json as read at open (what a signature covers)."""
        return self._manifest_bytes

    @property
    def manifest_sha256(self) -> str:
        """SHA-256 of manifest.json: an identity of the whole bundle, usable as a cache key."""
        return hashlib.sha256(self._manifest_bytes).hexdigest()

    @property
    def files(self) -> dict[str, FileEntry]:
        """Every artifact the manifest lists, with its expected SHA-256 and size."""
        return dict(self._files)

    def __repr__(self) -> str:
        model = self._manifest.get("model")
        name = model.get("name") if isinstance(model, dict) else None
        return f"Bundle({str(self._path)!r}, model={name!r}, files={len(self._files)})"

    def signature_info(self) -> Optional[dict]:
        """The parsed manifest.json.sig without checking it, None when unsigned.

        Raises:
            SignatureError: the signature file exists but is malformed.
        """
        sig_path = self._path / SIGNATURE_NAME
        if not os.path.lexists(sig_path):
            return None
        shown = str(sig_path)
        try:
            data = _read_limited(sig_path, shown, _MAX_SIG_BYTES)
        except SignatureError:
            raise
        except BundleError as exc:
            raise SignatureError(str(exc)) from exc
        record = _parse_json_as(SignatureError, data, shown)
        if not isinstance(record, dict):
            raise SignatureError(f"{shown} must hold a JSON object")
        if record.get("algorithm") != SIGNATURE_ALGORITHM:
            raise SignatureError(f"{shown}: unsupported signature algorithm {record.get('algorithm')!r} "
                                 f"(this medge checks {SIGNATURE_ALGORITHM})")
        fingerprint = record.get("public_key_sha256")
        if not isinstance(fingerprint, str) or not _HEX64.match(fingerprint):
            raise SignatureError(f"{shown}: public_key_sha256 is not 64 lowercase hex digits")
        try:
            raw = base64.b64decode(record.get("signature", ""), validate=True)
        except (TypeError, ValueError) as exc:
            raise SignatureError(f"{shown}: the signature is not valid base64") from exc
        if len(raw) != 64:
            raise SignatureError(f"{shown}: an Ed25519 signature is 64 bytes, found {len(raw)}")
        return {"algorithm": SIGNATURE_ALGORITHM, "public_key_sha256": fingerprint, "signature": raw}

    def artifact_path(self, arcname: str) -> Path:
        """Filesystem path of a listed artifact (for APIs that open files by name).

        The file is not hashed here: call :meth:`verify` first, and prefer
        :meth:`read_verified` for anything that is executed (engines).

        Raises:
            BundleError: an unsafe name, or one the manifest does not list.
        """
        self._entry(arcname)
        return self._path.joinpath(*arcname.split("/"))

    def _entry(self, arcname: str) -> FileEntry:
        validate_arcname(arcname)
        entry = self._files.get(arcname)
        if entry is None:
            raise BundleError(f"bundle {self._path}: {arcname} is not listed in its manifest")
        return entry

    def read_verified(self, arcname: str) -> bytes:
        """Read one artifact and check its size and SHA-256 on the bytes returned.

        The check is on exactly the bytes handed back, so nothing can change
        between verification and use (engines are deserialised from them).

        Raises:
            BundleError: unlisted or missing file, size or hash mismatch (the
                message names the file).
        """
        entry = self._entry(arcname)
        shown = f"bundle {self._path}: {arcname}"
        handle, _ = _open_regular(self._path.joinpath(*arcname.split("/")), shown)
        with handle:
            # Never read more than the manifest promises (+1 to notice a longer file).
            data = handle.read(entry.size + 1)
        if len(data) != entry.size:
            raise BundleError(f"{shown}: size {len(data)}{'+' if len(data) > entry.size else ''} bytes, "
                              f"manifest says {entry.size}; the file is truncated or was modified")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise BundleError(f"{shown}: SHA-256 {digest[:16]}... does not match the manifest's "
                              f"{entry.sha256[:16]}...; the file was modified or is corrupt")
        return data

    def _hash_file(self, arcname: str, entry: FileEntry) -> Optional[str]:
        """None when the file matches, else what is wrong with it."""
        try:
            handle, size = _open_regular(self._path.joinpath(*arcname.split("/")), arcname)
        except BundleError as exc:
            return str(exc)
        with handle:
            if size != entry.size:
                return f"{arcname}: size {size} bytes, manifest says {entry.size} (truncated or modified)"
            digest = hashlib.sha256()
            buffer = bytearray(_CHUNK)
            view = memoryview(buffer)
            remaining = entry.size + 1  # bounded even if the file grows while we read
            total = 0
            while remaining > 0:
                n = handle.readinto(view[:min(_CHUNK, remaining)])
                if not n:
                    break
                digest.update(view[:n])
                total += n
                remaining -= n
        if total != entry.size:
            return f"{arcname}: {total} bytes read, manifest says {entry.size} (changed while reading)"
        if digest.hexdigest() != entry.sha256:
            return (f"{arcname}: SHA-256 {digest.hexdigest()[:16]}... does not match the manifest's "
                    f"{entry.sha256[:16]}... (modified or corrupt)")
        return None

    def _unlisted(self) -> list[str]:
        """Entries on disk that the manifest does not list (files, links, anything)."""
        extra = []
        listed = set(self._files)
        for root, dirs, names in os.walk(self._path, followlinks=False):
            rel_root = os.path.relpath(root, self._path)
            prefix = "" if rel_root == os.curdir else rel_root.replace(os.sep, "/") + "/"
            for name in names:
                rel = prefix + name
                if rel not in listed and rel not in _RESERVED:
                    extra.append(rel)
            for name in list(dirs):
                if os.path.islink(os.path.join(root, name)):
                    extra.append(prefix + name)  # a symlinked folder: never followed, always reported
                    dirs.remove(name)
        return sorted(extra)

    def verify(self, trusted_key: Any = None, *, require_signature: bool = False) -> Verification:
        """Check the bundle on disk against its manifest (and the manifest against a trusted key).

        Order: manifest.json unchanged since open; with ``trusted_key``, the
        signature over manifest.json; then every listed file's size and
        SHA-256 (streamed), and no unlisted files.

        Args:
            trusted_key: the Ed25519 public key the bundle must be signed with:
                a PEM path, PEM bytes/text, or an ``Ed25519PublicKey``. When
                given, an unsigned bundle fails.
            require_signature: fail unless a signature is present and checked;
                without ``trusted_key`` this always fails (a signature cannot
                be checked without a key, so accepting it would prove nothing).

        Returns:
            A :class:`Verification` (file count, bytes hashed, signer fingerprint).

        Raises:
            SignatureError: signature missing, malformed, made with another
                key, or the manifest changed after signing.
            BundleError: manifest.json changed since open; any file missing,
                truncated, modified, unlisted, a symlink (the message names
                every such file).
            MissingDependency: ``trusted_key`` given without ``cryptography``.
        """
        shown = str(self._path / MANIFEST_NAME)
        try:
            current = _read_limited(self._path / MANIFEST_NAME, shown, _MAX_MANIFEST_BYTES)
        except BundleError as exc:
            raise BundleError(f"{exc}; it changed since the bundle was opened") from exc
        if current != self._manifest_bytes:
            raise BundleError(f"{shown} changed since the bundle was opened; open it again")
        signed_by = None
        if trusted_key is not None:
            signed_by = self._check_signature(trusted_key)
        elif require_signature:
            raise SignatureError(f"bundle {self._path}: a signature is required but no trusted key was given "
                                 f"to check it against")
        problems = []
        total = 0
        for arcname, entry in sorted(self._files.items()):
            problem = self._hash_file(arcname, entry)
            if problem:
                problems.append(problem)
            else:
                total += entry.size
        problems += [f"{name}: not listed in the manifest (an extra file)" for name in self._unlisted()]
        if problems:
            head = f"bundle {self._path} failed verification ({len(problems)} problem(s)): "
            raise BundleError(head + "; ".join(problems))
        return Verification(len(self._files), total, signed_by)

    def _check_signature(self, trusted_key: Any) -> str:
        key = load_trusted_key(trusted_key)
        _, _, exceptions = _crypto("Checking bundle signatures")
        trusted = public_key_fingerprint(key)
        info = self.signature_info()
        if info is None:
            raise SignatureError(f"bundle {self._path} is not signed ({SIGNATURE_NAME} is missing) but a "
                                 f"trusted key was given; re-convert it with a signing key")
        if info["public_key_sha256"] != trusted:
            raise SignatureError(
                f"bundle {self._path}: {SIGNATURE_NAME} was made with key {info['public_key_sha256'][:16]}..., "
                f"not with the trusted key {trusted[:16]}..."
            )
        try:
            key.verify(info["signature"], self._manifest_bytes)
        except exceptions.InvalidSignature:
            raise SignatureError(
                f"bundle {self._path}: the signature in {SIGNATURE_NAME} does not match {MANIFEST_NAME}; "
                f"the manifest was modified after signing or the signature is corrupt"
            ) from None
        return trusted


def _parse_json_as(error: type, data: bytes, what: str) -> Any:
    try:
        return _parse_json(data, what)
    except BundleError as exc:
        raise error(str(exc)) from exc


# ---------------------------------------------------------------------------
# describe()


def _size(n: Any) -> str:
    if not _is_int(n):
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _num(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format(value, fmt)


def _shape(shape: Any) -> str:
    if isinstance(shape, (list, tuple)):
        return "[" + ", ".join("N" if d in (-1, None) else str(d) for d in shape) + "]"
    return str(shape)


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _section_model(m: dict) -> list[str]:
    model = m.get("model")
    if not isinstance(model, dict):
        return ["Model     (not recorded)"]
    text = f"Model     {model.get('name', '(unnamed)')}"
    if model.get("version") is not None:
        text += f" {model['version']}"
    extras = [f"{k} {model[k]}" for k in ("source", "opset") if model.get(k) is not None]
    return [text + (f"  ({', '.join(extras)})" if extras else "")]


def _section_io(m: dict) -> list[str]:
    lines = []
    for key, title in (("inputs", "Inputs"), ("outputs", "Outputs")):
        items = m.get(key)
        if not items:
            continue
        lines.append(title)
        rows = [[str(t.get("name", "?")), _shape(t.get("shape")), str(t.get("dtype", "?"))] if isinstance(t, dict)
                else [str(t), "", ""] for t in items]
        lines += _table(rows)
    return lines


def _section_volume_preprocess(spec: dict) -> list[str]:
    """A segmentation bundle's VolumeSpec (``preprocess.kind == "volume"``) in one line."""
    voi = spec.get("voi")
    if voi == "window" and isinstance(spec.get("window"), list) and len(spec["window"]) == 2:
        parts = [f"window {_num(spec['window'][0], 'g')}/{_num(spec['window'][1], 'g')} "
                 f"{spec.get('voi_function') or 'LINEAR'}"]
    else:
        parts = [f"value range {spec.get('value_range')}"]
    if spec.get("target_spacing"):
        parts.append(f"resampled to {' x '.join(_num(v, 'g') for v in spec['target_spacing'])} mm (row, column, "
                     f"slice), {spec.get('interpolation')}")
    elif spec.get("target_size"):
        parts.append(f"resampled to {' x '.join(str(v) for v in spec['target_size'])} voxels, "
                     f"{spec.get('interpolation')}")
    else:
        parts.append("on the series' own grid")
    if spec.get("roi_size"):
        parts.append(f"ROI {' x '.join(str(v) for v in spec['roi_size'])} ({spec.get('roi_fit')})")
    if spec.get("neighbours"):
        parts.append(f"2.5-D: {spec['neighbours']} neighbouring slice(s) each side as channels")
    parts.append(f"mean {spec.get('mean')} std {spec.get('std')}")
    lines = ["Preprocess  volume (series -> network grid)", "  " + ", ".join(parts)]
    try:
        from .volume import VolumeSpec

        VolumeSpec.from_dict({k: v for k, v in spec.items() if k != "kind"})
    except Exception as exc:  # noqa: BLE001 - any reason the runtime would refuse it is worth showing
        lines.append(f"  INVALID for this medge: {exc}")
    return lines


def _section_preprocess(m: dict) -> list[str]:
    spec = m.get("preprocess")
    if not isinstance(spec, dict):
        return []
    if spec.get("kind") == "volume":
        return _section_volume_preprocess(spec)
    parts = [f"{spec.get('height', '?')}x{spec.get('width', '?')}, {spec.get('channels', 1)} channel(s), "
             f"{spec.get('dtype', 'float32')}"]
    voi = spec.get("voi", "dicom")
    if voi == "window" and isinstance(spec.get("window"), list) and len(spec["window"]) == 2:
        parts.append(f"window {_num(spec['window'][0], 'g')}/{_num(spec['window'][1], 'g')} "
                     f"{spec.get('voi_function') or 'LINEAR'}")
    elif voi == "range":
        parts.append(f"value range {spec.get('value_range')}")
    elif voi == "dicom":
        parts.append(f"each image's own window #{spec.get('window_index', 0)}"
                     + (f" {spec['voi_function']}" if spec.get("voi_function") else ""))
    else:
        parts.append(f"voi {voi}")
    fit = spec.get("fit", "stretch")
    parts.append(fit + (f" (pad {_num(spec.get('pad_value', 0.0), 'g')})" if fit == "letterbox" else ""))
    parts.append(str(spec.get("resample", "bilinear_antialias")))
    parts.append(f"mean {spec.get('mean', [0.0])} std {spec.get('std', [1.0])}")
    lines = ["Preprocess", "  " + ", ".join(parts)]
    try:
        from .preprocess import PreprocessSpec

        PreprocessSpec.from_dict(spec)
    except Exception as exc:  # noqa: BLE001 - any reason the runtime would refuse it is worth showing
        lines.append(f"  INVALID for this medge: {exc}")
    return lines


def _section_labels(m: dict) -> list[str]:
    labels = m.get("labels")
    post = m.get("postprocess")
    activation = post.get("activation") if isinstance(post, dict) else None
    if not labels and not activation:
        return []
    shown = list(labels or [])
    head = f"Labels    {len(shown)}" + (f", {activation}" if activation else "")
    if not shown:
        return [head]
    limit = 20
    text = ", ".join(f"{i}:{label}" for i, label in enumerate(shown[:limit]))
    if len(shown) > limit:
        text += f", ... ({len(shown) - limit} more)"
    return [head, "  " + text]


def _section_task(m: dict) -> list[str]:
    task = m.get("task")
    if not isinstance(task, dict):
        return ["Task      (not recorded: medge.load refuses this bundle; convert it again)"]
    details = ", ".join(f"{k} {task[k]}" for k in ("classes", "activation", "positive_class", "threshold")
                        if task.get(k) is not None)
    lines = [f"Task      {task.get('kind', '?')}" + (f" ({details})" if details else "")]
    if task.get("kind") == "segmentation":
        roi = task.get("roi") if isinstance(task.get("roi"), list) else []
        lines.append(f"  {task.get('spatial_dims')}-D network, sliding window {' x '.join(map(str, roi))}, overlap "
                     f"{task.get('overlap')}, {task.get('mode')} (sigma {task.get('sigma_scale')}), "
                     f"{task.get('sw_batch')} window(s) per call")
    point = m.get("operating_point")
    if isinstance(point, dict):
        goal = f"{point.get('target')}={point.get('goal')}" if point.get("goal") is not None else point.get("target")
        sens, spec = point.get("sensitivity_ci") or ["?", "?"], point.get("specificity_ci") or ["?", "?"]
        lines.append(f"  operating point {goal}: threshold {_num(point.get('threshold'))}, sensitivity "
                     f"{_num(point.get('sensitivity'), '.3f')} (95% CI {_num(sens[0], '.3f')}-{_num(sens[1], '.3f')}), "
                     f"specificity {_num(point.get('specificity'), '.3f')} (95% CI {_num(spec[0], '.3f')}-"
                     f"{_num(spec[1], '.3f')})" + ("" if point.get("reliable", True) else "; NOT RELIABLE: "
                                                     + str(point.get("note"))))
    return lines


def _section_gates(m: dict) -> list[str]:
    gates = m.get("gates")
    if not isinstance(gates, dict):
        return []
    limits = gates.get("limits") or {}
    shown = ", ".join(f"{k} {v}" for k, v in sorted(limits.items()) if v is not None)
    head = ("Gates     " + ("off (--no-gates)" if gates.get("enabled") is False else (shown or "none"))
            + ("" if gates.get("passed", True) else "; FAILED"))
    rows = []
    for graph, verdict in (gates.get("verdicts") or {}).items():
        reasons = "; ".join(verdict.get("reasons") or []) if verdict.get("verdict") in ("failed", "not measured") else ""
        note = "  (not chosen by default)" if verdict.get("verdict") in ("failed", "not measured") else ""
        rows.append([str(graph), str(verdict.get("verdict")) + note, reasons])
    return [head] + _table(rows)


def _section_envelope(m: dict) -> list[str]:
    if "envelope" not in m:
        return []
    env = m.get("envelope")
    if not isinstance(env, dict):
        return ["Envelope  not recorded (calibrated and validated on arrays): inputs are not checked"]

    def values(key: str) -> str:
        value = env.get(key)
        if not value:
            return "not recorded"
        if key in ("rows", "columns", "pixel_spacing_mm") and isinstance(value, list) and len(value) == 2:
            low, high = (f"{v:.4g}" for v in value)
            return low if low == high else f"{low}-{high}"
        return ", ".join(str(v) for v in value)

    return ["Envelope  what inputs must look like (from " + f"{env.get('images', '?')} "
            + f"{' and '.join(env.get('sources') or []) or '?'} {env.get('unit') or 'images'})",
            f"  modality {values('modalities')}; photometric {values('photometric_interpretations')}; "
            f"bits stored {values('bits_stored')}",
            f"  rows {values('rows')}, columns {values('columns')}; pixel spacing {values('pixel_spacing_mm')} mm; "
            f"body part {values('body_parts')}"]


def _section_checks(m: dict) -> list[str]:
    checks = m.get("check_vectors")
    if not isinstance(checks, dict):
        return []
    tolerances = ", ".join(f"{g} {_num(t, '.3g')}" for g, t in (checks.get("tolerances") or {}).items())
    return [f"Checks    {checks.get('count', '?')} check vectors from the {checks.get('source', '?')}, "
            "re-run at load; max abs error allowed: " + tolerances]


def _section_graphs(m: dict) -> list[str]:
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        return []
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    rows = []
    for precision, graph in graphs.items():
        graph = graph if isinstance(graph, dict) else {}
        name = graph.get("file", "?")
        entry = files.get(name) if isinstance(name, str) else None
        size = _size(entry.get("size")) if isinstance(entry, dict) else ""
        rows.append([str(precision), str(name), size,
                     f"in {graph.get('input_dtype', '?')} -> out {graph.get('output_dtype', '?')}"])
    return ["Graphs"] + _table(rows)


def _section_calibration(m: dict) -> list[str]:
    cal = m.get("calibration")
    if not isinstance(cal, dict) or not cal:
        return []
    known = [("method", "method"), ("images", "images"), ("batches", "batches")]
    parts = [f"{label} {cal[key]}" for key, label in known if cal.get(key) is not None]
    parts += [f"{key} {value}" for key, value in sorted(cal.items())
              if key not in dict(known) and not isinstance(value, (dict, list))]
    return ["Calibration", "  " + (", ".join(parts) if parts else "(no details)")]


_ACCURACY_COLUMNS = [
    ("max_abs_error", "max|err|", ".3g"),
    ("mean_abs_error", "mean|err|", ".3g"),
    ("top1_agreement", "top1 agree", ".4f"),
    ("auc", "AUC", ".4f"),
    ("auc_drop", "AUC drop", ".4f"),
    ("accuracy", "accuracy", ".4f"),
    ("sensitivity", "sensitivity", ".4f"),
    ("specificity", "specificity", ".4f"),
    ("max_probability_error", "max|p err|", ".3g"),
    ("voxel_agreement", "voxel agree", ".4f"),
    ("min_dice", "min Dice", ".4f"),
]


def _section_accuracy(m: dict) -> list[str]:
    acc = m.get("accuracy")
    if not isinstance(acc, dict):
        return []
    results = [r for r in acc.get("results") or [] if isinstance(r, dict)]
    title = f"Accuracy (reference {acc.get('reference', 'fp32')})"
    if not results:
        return [title, "  (no results)"]
    columns = [c for c in _ACCURACY_COLUMNS if any(r.get(c[0]) is not None for r in results)]
    names = acc.get("labels") if acc.get("kind") == "segmentation" and isinstance(acc.get("labels"), list) else []
    rows = [["precision", "batch", "engine"] + [c[1] for c in columns] + [f"Dice {n}" for n in names[1:]]]
    notes = []
    for r in results:
        row = [str(r.get("precision", "?")), str(r.get("batch_size", "?")),
               str(r.get("executed_by") or "-").replace(" CPU", "")]
        dice = r.get("dice") if isinstance(r.get("dice"), list) else []
        if r.get("measured") is False:
            row += ["-"] * (len(columns) + len(names[1:]))
            where = f" on {row[2]}" if r.get("executed_by") else ""
            notes.append(f"  {row[0]} batch {row[1]}{where} not measured: {r.get('reason') or 'no reason given'}")
        else:
            row += [_num(r.get(key), fmt) for key, _, fmt in columns]
            row += [_num(dice[i] if i < len(dice) else None, ".4f") for i in range(len(names[1:]))]
            if r.get("reason"):
                notes.append(f"  {row[0]} batch {row[1]}: {r['reason']}")
        rows.append(row)
    return [title] + _table(rows) + notes


def _profile(profile: Any) -> str:
    if not isinstance(profile, dict):
        return str(profile) if profile is not None else "-"
    if all(k in profile for k in ("min", "opt", "max")) and not isinstance(profile["min"], dict):
        return f"min {_shape(profile['min'])} opt {_shape(profile['opt'])} max {_shape(profile['max'])}"
    # {input_name: {min, opt, max}}
    return "; ".join(f"{name}: {_profile(p)}" for name, p in profile.items())


def _section_engines(m: dict) -> list[str]:
    engines = m.get("engines")
    if not isinstance(engines, list) or not engines:
        return []
    lines = ["Engines"]
    for engine in engines:
        if not isinstance(engine, dict):
            lines.append(f"  {engine!r}")
            continue
        flavour = " ".join(str(engine[k]) for k in ("flavour", "flavour_version") if engine.get(k) is not None)
        caps = engine.get("compute_capabilities")
        caps = ", ".join(map(str, caps)) if isinstance(caps, list) else caps
        gpu = engine.get("gpu")
        target = ", ".join(str(x) for x in ((gpu or {}).get("name"), f"sm {caps}" if caps else None) if x)
        lines.append(f"  {engine.get('file', '?')}")
        lines.append(f"    {flavour or '?'}, {engine.get('precision', '?')}, {_size(engine.get('size_bytes'))}"
                     + (f", for {target}" if target else "")
                     + (f", built in {_num(engine['build_seconds'], '.1f')} s"
                        if engine.get("build_seconds") is not None else ""))
        if engine.get("profile") is not None:
            lines.append(f"    profile {_profile(engine['profile'])}")
        layers = engine.get("layer_precisions")
        if isinstance(layers, dict) and layers:
            counts = sorted(layers.items(), key=lambda kv: (-kv[1] if _is_int(kv[1]) else 0, kv[0]))
            lines.append("    layers " + ", ".join(f"{k} {v}" for k, v in counts)
                         + (f" ({engine['layers_file']})" if engine.get("layers_file") else ""))
    return lines


def _signature_line(bundle: Bundle) -> list[str]:
    try:
        info = bundle.signature_info()
    except BundleError as exc:
        return [f"Signature {SIGNATURE_NAME} present but malformed: {exc}"]
    if info is None:
        return ["Signature none (unsigned bundle)"]
    return [f"Signature ed25519 by key {info['public_key_sha256'][:16]}... "
            f"(not checked here: medge inspect --verify --trusted-key PUBLIC.pem)"]


def _section_files(bundle: Bundle) -> list[str]:
    files = bundle.files
    total = sum(e.size for e in files.values())
    lines = [f"Files     {len(files)}, {_size(total)} (+ {MANIFEST_NAME})"]
    rows = []
    for name, entry in sorted(files.items()):
        # A cheap stat only; hashing is verify()'s job.
        try:
            st = os.lstat(bundle.path.joinpath(*name.split("/")))
            mark = "" if st.st_size == entry.size and stat.S_ISREG(st.st_mode) else "  CHANGED SIZE OR TYPE"
        except OSError:
            mark = "  MISSING"
        rows.append([name, _size(entry.size), entry.sha256[:12] + mark])
    return lines + (_table(rows) if rows else [])


def describe(bundle: Union[Bundle, str, os.PathLike]) -> str:
    """A readable multi-line summary of a bundle (what ``medge inspect`` prints).

    Covers model, inputs/outputs, preprocessing, labels, precision graphs,
    calibration, the accuracy table, engines, signature status and every file
    with its size and short hash. Sections absent from the manifest are left
    out; a malformed section is reported in place instead of failing. Nothing
    is hashed: use :meth:`Bundle.verify` for that.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    m = bundle.manifest
    lines = [f"Bundle    {bundle.path}",
             f"Created   {m.get('created', '?')} by medge {m.get('medge_version', '?')} "
             f"(schema {m.get('schema_version')})"]
    sections = [_section_model, _section_task, _section_io, _section_preprocess, _section_labels,
                _section_envelope, _section_graphs, _section_calibration, _section_accuracy, _section_gates,
                _section_checks, _section_engines]
    for section in sections:
        try:
            lines += section(m)
        except Exception as exc:  # noqa: BLE001 - a diagnostic tool shows what it can
            name = section.__name__.replace("_section_", "")
            lines.append(f"{name}: (malformed section: {type(exc).__name__}: {exc})")
    lines += _signature_line(bundle)
    lines += _section_files(bundle)
    return "\n".join(lines)


def _jsonable_signature(bundle: Bundle) -> Optional[dict]:
    """Signature info for JSON output (no raw bytes)."""
    try:
        info = bundle.signature_info()
    except BundleError as exc:
        return {"error": str(exc)}
    if info is None:
        return None
    return {"algorithm": info["algorithm"], "public_key_sha256": info["public_key_sha256"]}


def describe_json(bundle: Bundle, verification: Optional[Verification] = None) -> dict:
    """The machine-readable form of :func:`describe` (``medge inspect --json``)."""
    result = {
        "bundle": str(bundle.path),
        "manifest_sha256": bundle.manifest_sha256,
        "manifest": copy.deepcopy(bundle.manifest),
        "signature": _jsonable_signature(bundle),
    }
    if verification is not None:
        result["verification"] = {"ok": True, "files": verification.files, "bytes": verification.bytes,
                                  "signed_by": verification.signed_by}
    return result
