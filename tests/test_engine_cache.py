"""Tests of medge.runtime.engine_cache: round trip, verification, atomicity, concurrency, errors.

All on the CPU: the cache stores bytes and never interprets them, so plans here
are made-up byte strings that carry their own checksum (``_payload``), which
lets the concurrency tests tell a torn or mixed-up read from a good one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import medge
from medge.convert.engine import engine_cache_key
from medge.errors import MedgeError
from medge.runtime import engine_cache as ec
from medge.runtime.engine_cache import KEY_FIELDS, EngineCache, EngineCacheNotWritable, default_directory

REPO = Path(medge.__file__).resolve().parents[1]


def _fields(**changes):
    fields = {
        "flavour": "tensorrt_rtx",
        "flavour_version": "1.7.1.116",
        "gpu_name": "NVIDIA RTX 6000 Ada Generation",
        "compute_capability": "8.9",
        "sm_count": 142,
        "model_sha256": hashlib.sha256(b"model").hexdigest(),
        "precision": "fp16",
        "profile": {"min": 1, "opt": 4, "max": 8},
    }
    fields.update(changes)
    return fields


def _key(fields):
    return engine_cache_key(**fields)


def _payload(tag: str, size: int = 64 * 1024) -> bytes:
    """A plan-like byte string whose tail is derived from its tag, so any mix of two payloads is detectable."""
    head = tag.encode() + b"|"
    block = hashlib.sha256(head).digest()
    return head + (block * (size // len(block) + 1))[: size - len(head)]


def _payload_ok(data: bytes) -> bool:
    head, _, _ = data.partition(b"|")
    return data == _payload(head.decode(), len(data))


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "engines")


def _files(cache):
    return sorted(p.name for p in cache.directory.iterdir()) if cache.directory.exists() else []


# --------------------------------------------------------------------------- basics


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDGE_ENGINE_CACHE", str(tmp_path / "mine"))
    assert default_directory() == tmp_path / "mine"
    assert EngineCache().directory == tmp_path / "mine"
    monkeypatch.delenv("MEDGE_ENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "medge" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_directory() == tmp_path / "home" / ".cache" / "medge" / "engines"


def test_key_is_engine_cache_key():
    fields = _fields()
    assert EngineCache.key(*(fields[name] for name in KEY_FIELDS)) == _key(fields)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_round_trip(cache, kind):
    fields = _fields()
    key = _key(fields)
    plan = _payload("a")
    assert cache.get(key) is None
    path = cache.put(key, kind(plan), fields)
    assert path == cache.plan_path(key) and path.read_bytes() == plan
    assert cache.get(key) == plan
    assert cache.get(key, fields) == plan
    sidecar = json.loads(cache.sidecar_path(key).read_text())
    assert sidecar["sha256"] == hashlib.sha256(plan).hexdigest() and sidecar["size"] == len(plan)
    assert sidecar["key"] == key and sidecar["fields"] == fields
    assert _files(cache) == sorted([f"{key}.engine", f"{key}.json", f"{key}.lock"])


def test_a_missing_folder_is_a_miss_and_is_not_created(tmp_path):
    cache = EngineCache(tmp_path / "not" / "yet")
    assert cache.get(_key(_fields())) is None
    assert not (tmp_path / "not").exists()


def test_extra_fields_are_recorded_and_do_not_change_the_key(cache):
    fields = _fields(built_by="medge.load", build_seconds=12.5)
    key = _key(_fields())
    cache.put(key, b"plan", fields)
    assert cache.get(key, _fields()) == b"plan"
    assert json.loads(cache.sidecar_path(key).read_text())["fields"]["built_by"] == "medge.load"


def test_entries_do_not_mix(cache):
    a, b = _fields(), _fields(precision="int8")
    cache.put(_key(a), b"A", a)
    cache.put(_key(b), b"B", b)
    assert cache.get(_key(a)) == b"A" and cache.get(_key(b)) == b"B"
    cache.remove(_key(a))
    assert cache.get(_key(a)) is None and cache.get(_key(b)) == b"B"


@pytest.mark.parametrize("key", ["", "abc", "A" * 64, "g" * 64, "../" + "a" * 61, None, 12])
def test_malformed_keys_are_refused(cache, key):
    with pytest.raises(MedgeError, match="64 lowercase hex"):
        cache.get(key)
    with pytest.raises(MedgeError, match="64 lowercase hex"):
        cache.put(key, b"x", _fields())


def test_fields_must_belong_to_the_key(cache):
    key = _key(_fields())
    with pytest.raises(MedgeError, match="do not belong to key"):
        cache.put(key, b"plan", _fields(precision="int8"))
    with pytest.raises(MedgeError, match="lack sm_count"):
        cache.put(key, b"plan", {k: v for k, v in _fields().items() if k != "sm_count"})
    with pytest.raises(MedgeError, match="do not belong to key"):
        cache.get(key, _fields(gpu_name="another GPU"))
    with pytest.raises(MedgeError, match="empty"):
        cache.put(key, b"", _fields())
    assert _files(cache) == []


# --------------------------------------------------------------------------- verification


def _flip_byte(cache, key):
    path = cache.plan_path(key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_sidecar(**changes):
    def edit(cache, key):
        path = cache.sidecar_path(key)
        sidecar = json.loads(path.read_text())
        for name, value in changes.items():
            if name in KEY_FIELDS:
                sidecar["fields"][name] = value
            else:
                sidecar[name] = value
        path.write_text(json.dumps(sidecar))
    return edit


CORRUPTIONS = {
    "flipped byte": _flip_byte,
    "truncated plan": lambda c, k: c.plan_path(k).write_bytes(c.plan_path(k).read_bytes()[:-1]),
    "longer plan": lambda c, k: c.plan_path(k).write_bytes(c.plan_path(k).read_bytes() + b"\0"),
    "empty plan": lambda c, k: c.plan_path(k).write_bytes(b""),
    "plan deleted": lambda c, k: c.plan_path(k).unlink(),
    "sidecar deleted": lambda c, k: c.sidecar_path(k).unlink(),
    "sidecar not JSON": lambda c, k: c.sidecar_path(k).write_bytes(b"{not json"),
    "sidecar a list": lambda c, k: c.sidecar_path(k).write_text("[]"),
    "fields edited": _edit_sidecar(precision="int8"),
    "fields removed": _edit_sidecar(fields={"flavour": "tensorrt_rtx"}),
    "other key": _edit_sidecar(key="0" * 64),
    "other schema": _edit_sidecar(schema="medge-engine-cache-entry/0"),
    "hash edited": _edit_sidecar(sha256="0" * 64),
    "size edited": _edit_sidecar(size=3),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_an_unusable_entry_is_deleted_and_reported_as_a_miss(cache, damage, caplog):
    fields = _fields()
    key = _key(fields)
    plan = _payload("good")
    cache.put(key, plan, fields)
    CORRUPTIONS[damage](cache, key)
    with caplog.at_level(logging.WARNING, logger="medge.runtime.engine_cache"):
        assert cache.get(key) is None
    assert "unusable" in caplog.text and key[:16] in caplog.text
    assert not cache.plan_path(key).exists() and not cache.sidecar_path(key).exists()
    # and the rebuild goes in as usual
    assert cache.get_or_build(key, lambda: plan, fields) == plan
    assert cache.get(key) == plan


def test_get_or_build_builds_once(cache):
    fields = _fields()
    key = _key(fields)
    calls = []

    def build():
        calls.append(1)
        return _payload("built")

    assert cache.get_or_build(key, build, fields) == _payload("built")
    assert cache.get_or_build(key, build, fields) == _payload("built")
    assert EngineCache(cache.directory).get_or_build(key, build, fields) == _payload("built")
    assert len(calls) == 1


def test_get_or_build_failures(cache):
    fields = _fields()
    key = _key(fields)
    with pytest.raises(MedgeError, match="not the plan's bytes"):
        cache.get_or_build(key, lambda: None, fields)
    with pytest.raises(MedgeError, match="not the plan's bytes"):
        cache.get_or_build(key, lambda: b"", fields)

    def broken():
        raise RuntimeError("the builder failed")

    with pytest.raises(RuntimeError, match="the builder failed"):
        cache.get_or_build(key, broken, fields)
    assert cache.get(key) is None
    with pytest.raises(MedgeError, match="do not belong"):
        cache.get_or_build(key, lambda: b"x", _fields(sm_count=1))


# --------------------------------------------------------------------------- atomicity


class _Crash(BaseException):
    """Stands for the process dying at that point (not an OSError, so nothing translates it)."""


def _crash_on_replace(monkeypatch, which: int):
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == which:
            raise _Crash(f"died before renaming onto {dst}")
        return real(src, dst)

    monkeypatch.setattr(ec.os, "replace", replace)


@pytest.mark.parametrize("previous", [False, True], ids=["empty", "over-an-old-entry"])
def test_a_crash_between_plan_and_sidecar_is_never_loaded(cache, monkeypatch, previous):
    fields = _fields()
    key = _key(fields)
    if previous:
        cache.put(key, _payload("old"), fields)
    _crash_on_replace(monkeypatch, 2)  # the plan is renamed into place, the sidecar is not
    with pytest.raises(_Crash):
        cache.put(key, _payload("new"), fields)
    monkeypatch.undo()
    assert cache.plan_path(key).read_bytes() == _payload("new")
    assert not [p for p in _files(cache) if p.endswith(".tmp")], "the writer's temporary files were left behind"
    assert cache.get(key) is None  # new plan + old or no sidecar: never loaded
    assert not cache.plan_path(key).exists()


def test_a_crash_before_the_plan_rename_keeps_the_old_entry(cache, monkeypatch):
    fields = _fields()
    key = _key(fields)
    cache.put(key, _payload("old"), fields)
    _crash_on_replace(monkeypatch, 1)
    with pytest.raises(_Crash):
        cache.put(key, _payload("new"), fields)
    monkeypatch.undo()
    assert cache.get(key) == _payload("old")


_HARD_CRASH = textwrap.dedent("""
    import os, sys
    from medge.runtime import engine_cache as ec
    fields = {fields!r}
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            os._exit(9)  # killed between the renames: no cleanup, no finally
        return real(src, dst)
    ec.os.replace = replace
    ec.EngineCache(sys.argv[1]).put(sys.argv[2], b"from a writer that died" * 100, fields)
""")


def _python(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_a_killed_writer_leaves_nothing_that_loads(cache):
    fields = _fields()
    key = _key(fields)
    cache.put(key, _payload("old"), fields)
    done = _python(_HARD_CRASH.format(fields=fields), str(cache.directory), key)
    assert done.returncode == 9, done.stderr
    assert any(p.endswith(".tmp") for p in _files(cache))  # the dead writer's sidecar temporary
    assert cache.get(key) is None  # its plan with the old sidecar: refused and removed
    assert cache.get_or_build(key, lambda: _payload("rebuilt"), fields) == _payload("rebuilt")
    assert not any(p.endswith(".tmp") for p in _files(cache)), "stale temporaries are cleaned by the next writer"
    assert cache.get(key) == _payload("rebuilt")


# --------------------------------------------------------------------------- concurrency


def test_concurrent_writers_and_readers_threads(cache, caplog):
    fields = _fields()
    key = _key(fields)
    seen, problems, errors = [], [], []
    stop = threading.Event()

    def writer(index):
        try:
            for round_ in range(15):
                EngineCache(cache.directory).put(key, _payload(f"w{index}-r{round_}"), fields)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def reader():
        mine = EngineCache(cache.directory)
        while not stop.is_set():
            data = mine.get(key, fields)
            if data is not None:
                seen.append(data[:8])
                if not _payload_ok(data):
                    problems.append(data[:32])

    with caplog.at_level(logging.WARNING, logger="medge.runtime.engine_cache"):
        readers = [threading.Thread(target=reader) for _ in range(3)]
        writers = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
    assert not errors, f"writers failed: {errors[:3]}"
    assert not problems, f"torn or mixed reads: {problems[:3]}"
    assert "unusable" not in caplog.text, "a reader saw an inconsistent pair"
    final = cache.get(key)
    assert final is not None and _payload_ok(final)
    assert seen, "the readers never saw an entry"


_WRITER = textwrap.dedent("""
    import sys, hashlib
    sys.path.insert(0, sys.argv[3])
    from medge.runtime.engine_cache import EngineCache
    fields = {fields!r}
    def payload(tag, size=256 * 1024):
        head = tag.encode() + b"|"
        block = hashlib.sha256(head).digest()
        return head + (block * (size // len(block) + 1))[: size - len(head)]
    cache = EngineCache(sys.argv[1])
    for round_ in range(10):
        cache.put(sys.argv[2], payload(f"{{sys.argv[4]}}-r{{round_}}"), fields)
    print(f"{{sys.argv[4]}}-r9")
""")

_READER = textwrap.dedent("""
    import sys, hashlib, logging, time
    from medge.runtime.engine_cache import EngineCache
    warnings = []
    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("medge.runtime.engine_cache").addHandler(Catch(logging.WARNING))
    cache = EngineCache(sys.argv[1])
    good = bad = 0
    end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        data = cache.get(sys.argv[2])
        if data is None:
            continue
        head = data.partition(b"|")[0] + b"|"
        block = hashlib.sha256(head).digest()
        ok = data == head + (block * (len(data) // len(block) + 1))[: len(data) - len(head)]
        good, bad = good + ok, bad + (not ok)
    print(good, bad, len(warnings))
""")


def test_concurrent_writer_processes_last_complete_writer_wins(cache):
    fields = _fields()
    key = _key(fields)
    cache.directory.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    def start(code, *args):
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    reader = start(_READER, str(cache.directory), key, "6")
    writers = [start(_WRITER.format(fields=fields), str(cache.directory), key, str(REPO), f"p{i}") for i in range(3)]
    finals = []
    for proc in writers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        finals.append(out.strip().encode())
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    good, bad, warnings = (int(v) for v in out.split())
    assert bad == 0 and warnings == 0, f"reader: {good} good, {bad} torn reads, {warnings} unusable entries"
    final = cache.get(key, fields)
    assert final is not None and _payload_ok(final)
    assert final.partition(b"|")[0] in finals, "the entry is not one writer's last complete write"
    assert not any(p.endswith(".tmp") for p in _files(cache))


# --------------------------------------------------------------------------- unwritable


def test_an_unwritable_folder_is_a_clear_error(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = EngineCache(blocker / "engines")
    fields = _fields()
    key = _key(fields)
    with pytest.raises(EngineCacheNotWritable) as caught:
        cache.put(key, b"plan", fields)
    message = str(caught.value)
    assert isinstance(caught.value, MedgeError)
    assert str(blocker / "engines") in message and "MEDGE_ENGINE_CACHE" in message
    assert cache.get(key) is None  # reading an impossible folder is just a miss
    with caplog.at_level(logging.WARNING, logger="medge.runtime.engine_cache"):
        assert cache.get_or_build(key, lambda: b"plan", fields) == b"plan"  # inference goes on
    assert "without being cached" in caplog.text


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_cache_still_serves_its_entries(cache):
    fields = _fields()
    key = _key(fields)
    cache.put(key, b"plan", fields)
    (cache.directory / f"{key}.lock").unlink()
    cache.directory.chmod(0o555)
    try:
        assert cache.get(key) == b"plan"  # no lock file can be made: read unlocked, still verified
        with pytest.raises(EngineCacheNotWritable):
            cache.put(_key(_fields(precision="int8")), b"x", _fields(precision="int8"))
    finally:
        cache.directory.chmod(0o755)
