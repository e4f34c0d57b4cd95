"""medge.bundle: atomic writing, integrity, signatures, hostile manifests, describe() and ``medge inspect``."""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import stat
import sys

import numpy as np
import pytest

from medge import bundle as bundle_mod
from medge.bundle import Bundle, BundleWriter, describe, generate_signing_key, validate_arcname
from medge.cli import inspect_cmd
from medge.errors import BundleError, MissingDependency, SignatureError

ARTIFACTS = {
    "models/model.fp32.onnx": bytes(range(256)) * 40,
    "models/model.int8.onnx": b"\x08onnx-int8" * 300,
    "engines/tensorrt_rtx-1.2_sm89_int8.engine": os.urandom(3000) + b"\x00" * 5000,
    "engines/tensorrt_rtx-1.2_sm89_int8.layers.json": b'{"layers": []}\n',
    "reports/accuracy.json": b'{"ok": true}\n',
}


def full_manifest() -> dict:
    return {
        "model": {"name": "chestnet", "version": "1.2.0", "source": "chestnet.pt2", "opset": 17},
        "inputs": [{"name": "image", "shape": [-1, 1, 224, 224], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [-1, 3], "dtype": "float32"}],
        "preprocess": {"schema_version": 1, "height": 224, "width": 224, "channels": 1, "voi": "window",
                       "window_index": 0, "window": [-600.0, 1500.0], "voi_function": None, "value_range": None,
                       "fit": "letterbox", "pad_value": 0.0, "resample": "bilinear_antialias", "mean": [0.5],
                       "std": [0.25], "dtype": "float16"},
        "labels": ["normal", "nodule", "effusion"],
        "postprocess": {"activation": "softmax"},
        "graphs": {"fp32": {"file": "models/model.fp32.onnx", "input_dtype": "float32", "output_dtype": "float32"},
                   "int8": {"file": "models/model.int8.onnx", "input_dtype": "float32", "output_dtype": "float32"}},
        "calibration": {"method": "percentile", "images": 512, "batches": 16, "percentile": 99.99},
        "accuracy": {"reference": "fp32", "results": [
            {"precision": "int8", "batch_size": 1, "measured": True, "reason": None, "max_abs_error": 0.0123,
             "mean_abs_error": 0.00041, "top1_agreement": 0.996, "auc": 0.9412, "auc_drop": 0.0011},
            {"precision": "int8", "batch_size": 8, "measured": False, "reason": "engine build skipped"},
        ]},
        "engines": [{
            "file": "engines/tensorrt_rtx-1.2_sm89_int8.engine", "precision": "int8", "flavour": "tensorrt_rtx",
            "flavour_version": "1.2.0", "compute_capabilities": ["8.9"],
            "gpu": {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "sm_count": 128},
            "profile": {"min": [1, 1, 224, 224], "opt": [4, 1, 224, 224], "max": [8, 1, 224, 224]},
            "size_bytes": 8000, "layers_file": "engines/tensorrt_rtx-1.2_sm89_int8.layers.json",
            "layer_precisions": {"Int8": 41, "Half": 3, "Float": 2}, "build_seconds": 12.34,
        }],
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    pairs = {}
    for name in ("a", "b"):
        fingerprint = generate_signing_key(folder / f"{name}.pem", folder / f"{name}.pub.pem")
        pairs[name] = (folder / f"{name}.pem", folder / f"{name}.pub.pem", fingerprint)
    return pairs


def write_bundle(path, *, sign_key=None, manifest=None, artifacts=ARTIFACTS, **kwargs) -> Bundle:
    with BundleWriter(path, **kwargs) as writer:
        for arcname, content in artifacts.items():
            writer.add_file(content, arcname)
        return writer.commit(full_manifest() if manifest is None else manifest, sign_key=sign_key)


@pytest.fixture
def signed(tmp_path, keys):
    return write_bundle(tmp_path / "chest.medge", sign_key=keys["a"][0])


def flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def listing(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------
# Round trip and format


def test_round_trip(tmp_path, keys):
    source = tmp_path / "model.onnx"
    source.write_bytes(ARTIFACTS["models/model.fp32.onnx"])
    artifacts = dict(ARTIFACTS, **{"models/model.fp32.onnx": source})  # a path and bytes both work
    bundle = write_bundle(tmp_path / "chest.medge", artifacts=artifacts, sign_key=keys["a"][0])
    assert listing(tmp_path) == ["chest.medge", "model.onnx"]
    (tmp_path / "plain").mkdir()  # the bundle gets the modes of any new folder (not mkdtemp's 0700)
    assert os.stat(bundle.path).st_mode == os.stat(tmp_path / "plain").st_mode
    assert os.stat(bundle.path / "models").st_mode == os.stat(tmp_path / "plain").st_mode

    again = Bundle.open(tmp_path / "chest.medge")
    manifest = again.manifest
    for key, value in full_manifest().items():
        assert manifest[key] == value
    assert manifest["schema_version"] == 1
    assert manifest["medge_version"] == __import__("medge").__version__
    assert manifest["created"].endswith("Z")
    assert set(manifest["files"]) == set(ARTIFACTS)
    for arcname, content in ARTIFACTS.items():
        assert manifest["files"][arcname] == {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
        assert again.read_verified(arcname) == content
        assert again.artifact_path(arcname).read_bytes() == content

    # Canonical JSON: what is on disk is exactly the sorted, indented form.
    on_disk = (again.path / "manifest.json").read_bytes()
    assert on_disk == (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    assert again.manifest_sha256 == hashlib.sha256(on_disk).hexdigest()

    sig = json.loads((again.path / "manifest.json.sig").read_text())
    assert sig["algorithm"] == "ed25519" and sig["public_key_sha256"] == keys["a"][2]
    result = again.verify(trusted_key=keys["a"][1])
    assert (result.files, result.bytes, result.signed_by) == (5, sum(map(len, ARTIFACTS.values())), keys["a"][2])
    assert again.verify().signed_by is None  # hashes only
    assert "OK: 5 file(s)" in str(result)


def test_trusted_key_forms_and_key_file_modes(signed, keys):
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pem = keys["a"][1].read_bytes()
    for key in (str(keys["a"][1]), pem, pem.decode(), load_pem_public_key(pem)):
        assert signed.verify(trusted_key=key).signed_by == keys["a"][2]
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(keys["a"][0]).st_mode) == 0o600
    with pytest.raises(BundleError, match="refusing to overwrite"):
        generate_signing_key(keys["a"][0], keys["a"][1].with_name("new.pub.pem"))
    with pytest.raises(BundleError, match="private key"):
        signed.verify(trusted_key=keys["a"][0])  # a private key must never be the runtime's trusted key


def test_manifest_values_are_made_json_and_nan_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    manifest = {"accuracy": {"results": [{"auc": np.float32(0.5), "batch_size": np.int64(4)}]},
                "inputs": [{"name": "image", "shape": np.array([1, 3]), "dtype": "float32"}]}
    bundle = write_bundle(tmp_path / "a.medge", manifest=manifest, artifacts={})
    assert bundle.manifest["accuracy"]["results"][0] == {"auc": 0.5, "batch_size": 4}
    assert bundle.manifest["inputs"][0]["shape"] == [1, 3]
    assert bundle.manifest["created"] == "2023-11-14T22:13:20Z"

    with pytest.raises(BundleError, match=r"accuracy\.results\[0\]\.auc.*NaN"):
        write_bundle(tmp_path / "b.medge", manifest={"accuracy": {"results": [{"auc": float("nan")}]}},
                     artifacts={})
    with pytest.raises(BundleError, match="written by BundleWriter"):
        write_bundle(tmp_path / "c.medge", manifest={"files": {}}, artifacts={})
    with pytest.raises(BundleError, match="not in the bundle's files table"):
        write_bundle(tmp_path / "d.medge", manifest={"graphs": {"fp16": {"file": "models/missing.onnx"}}},
                     artifacts={})
    assert listing(tmp_path) == ["a.medge"]  # failed commits leave nothing behind


# ---------------------------------------------------------------------------
# Tampering


@pytest.mark.parametrize("arcname", sorted(ARTIFACTS))
def test_one_flipped_byte_in_any_artifact_is_named(signed, keys, arcname):
    flip_byte(signed.path / arcname)
    with pytest.raises(BundleError, match=r"failed verification \(1 problem") as info:
        Bundle.open(signed.path).verify(trusted_key=keys["a"][1])
    assert arcname in str(info.value) and "SHA-256" in str(info.value)
    with pytest.raises(BundleError, match=arcname):
        Bundle.open(signed.path).verify()  # caught without a key too: the manifest holds the hash


def test_one_flipped_byte_anywhere_in_the_manifest_is_caught(signed, keys):
    manifest = signed.path / "manifest.json"
    original = manifest.read_bytes()
    for offset in range(0, len(original), 13):  # every 13th byte: keys, values, punctuation
        flip_byte(manifest, offset)
        with pytest.raises(BundleError, match="manifest.json"):
            Bundle.open(signed.path).verify(trusted_key=keys["a"][1])
        manifest.write_bytes(original)
    Bundle.open(signed.path).verify(trusted_key=keys["a"][1])


def test_one_flipped_byte_anywhere_in_the_signature_is_caught(signed, keys):
    sig = signed.path / "manifest.json.sig"
    original = sig.read_bytes()
    for offset in range(0, len(original), 3):
        flip_byte(sig, offset)
        with pytest.raises(SignatureError, match="manifest.json.sig"):
            Bundle.open(signed.path).verify(trusted_key=keys["a"][1])
        sig.write_bytes(original)


def test_manifest_changed_after_open(signed, keys):
    text = (signed.path / "manifest.json").read_text().replace("chestnet", "chestnut")
    (signed.path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match="changed since the bundle was opened"):
        signed.verify()
    with pytest.raises(SignatureError, match="modified after signing"):
        Bundle.open(signed.path).verify(trusted_key=keys["a"][1])


def test_truncated_missing_extra_and_linked_files_are_all_named(signed):
    engine = "engines/tensorrt_rtx-1.2_sm89_int8.engine"
    path = signed.path / engine
    path.write_bytes(path.read_bytes()[:-1])
    (signed.path / "models" / "model.int8.onnx").unlink()
    (signed.path / "engines" / "stale.engine").write_bytes(b"old")
    (signed.path / "notes.txt").write_bytes(b"hello")
    with pytest.raises(BundleError) as info:
        signed.verify()
    message = str(info.value)
    assert "4 problem(s)" in message
    assert f"{engine}: size 7999 bytes, manifest says 8000" in message
    assert "models/model.int8.onnx is missing" in message
    assert "engines/stale.engine: not listed" in message and "notes.txt: not listed" in message


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name != "posix", reason="needs POSIX symlinks")
def test_symlinks_and_fifos_in_a_bundle_are_refused(signed, tmp_path):
    arcname = "reports/accuracy.json"
    outside = tmp_path / "outside.json"
    outside.write_bytes(ARTIFACTS[arcname])  # same content: a link is refused even when the hash matches
    (signed.path / arcname).unlink()
    os.symlink(outside, signed.path / arcname)
    with pytest.raises(BundleError, match=f"{arcname} is a symbolic link"):
        signed.verify()
    with pytest.raises(BundleError, match="symbolic link"):
        signed.read_verified(arcname)
    (signed.path / arcname).unlink()
    os.mkfifo(signed.path / arcname)  # would block a naive open()
    with pytest.raises(BundleError, match=f"{arcname} is not a regular file"):
        signed.verify()
    (signed.path / arcname).unlink()
    (signed.path / arcname).write_bytes(ARTIFACTS[arcname])
    os.symlink(tmp_path, signed.path / "linked_folder")
    with pytest.raises(BundleError, match="linked_folder: not listed"):
        signed.verify()


def test_read_verified_checks_the_bytes_it_returns(signed):
    arcname = "engines/tensorrt_rtx-1.2_sm89_int8.engine"
    signed.verify()
    flip_byte(signed.path / arcname, 10)  # changed after verify(), before use
    with pytest.raises(BundleError, match=f"{arcname}: SHA-256"):
        signed.read_verified(arcname)
    path = signed.path / arcname
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(BundleError, match=f"{arcname}: size 8001\\+ bytes"):
        signed.read_verified(arcname)
    with pytest.raises(BundleError, match="not listed"):
        signed.read_verified("engines/other.engine")
    with pytest.raises(BundleError, match="not listed"):
        signed.artifact_path("engines/other.engine")


# ---------------------------------------------------------------------------
# Signatures


def test_wrong_key_forged_fingerprint_and_unsigned(tmp_path, signed, keys):
    with pytest.raises(SignatureError, match="not with the trusted key"):
        signed.verify(trusted_key=keys["b"][1])
    # Claim key b in the signature file while the bytes were signed by key a.
    sig_path = signed.path / "manifest.json.sig"
    record = json.loads(sig_path.read_text())
    record["public_key_sha256"] = keys["b"][2]
    sig_path.write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="does not match manifest.json"):
        signed.verify(trusted_key=keys["b"][1])

    unsigned = write_bundle(tmp_path / "unsigned.medge")
    assert not (unsigned.path / "manifest.json.sig").exists()
    unsigned.verify()
    with pytest.raises(SignatureError, match="not signed"):
        unsigned.verify(trusted_key=keys["a"][1])
    with pytest.raises(SignatureError, match="no trusted key"):
        unsigned.verify(require_signature=True)
    with pytest.raises(SignatureError, match="no trusted key"):
        signed.verify(require_signature=True)  # present but uncheckable proves nothing


def test_sign_key_as_object_and_bad_keys(tmp_path, keys):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    bundle = write_bundle(tmp_path / "obj.medge", sign_key=key)
    assert bundle.verify(trusted_key=key.public_key()).signed_by == bundle_mod.public_key_fingerprint(key)
    with pytest.raises(BundleError, match="not a PEM private key"):
        write_bundle(tmp_path / "bad.medge", sign_key=keys["a"][1])  # the public key
    with pytest.raises(BundleError, match="cannot read the signing key"):
        write_bundle(tmp_path / "bad.medge", sign_key=tmp_path / "nope.pem")
    assert not (tmp_path / "bad.medge").exists()


def _block_cryptography(monkeypatch):
    for name in list(sys.modules):
        if name == "cryptography" or name.startswith("cryptography."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cryptography", None)


def test_missing_cryptography_names_the_extra(tmp_path, keys, monkeypatch):
    unsigned = write_bundle(tmp_path / "u.medge")
    _block_cryptography(monkeypatch)
    with pytest.raises(MissingDependency, match=r'pip install "medge\[convert\]"') as info:
        generate_signing_key(tmp_path / "k.pem", tmp_path / "k.pub.pem")
    assert info.value.module == "cryptography" and info.value.extra == "convert"
    with pytest.raises(MissingDependency, match="Signing bundles"):
        write_bundle(tmp_path / "s.medge", sign_key=keys["a"][0])
    with pytest.raises(MissingDependency, match="cryptography"):
        unsigned.verify(trusted_key=keys["a"][1])
    assert unsigned.verify().files == 5  # hashing alone needs no extra
    assert listing(tmp_path) == ["u.medge"]


# ---------------------------------------------------------------------------
# Hostile or broken manifests


def _forge(path, files=None, **extra):
    """A bundle directory whose manifest.json is written by hand, not by BundleWriter."""
    path.mkdir()
    manifest = {"schema_version": 1, "files": files or {}, **extra}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("name", [
    "../x", "models/../../etc/passwd", "/etc/passwd", "C:/Windows/x", "models\\x.onnx", "..\\..\\x",
    "./x", "models//x", "models/", ".hidden", "models/.x", "-rf", "a b", "model\x00.onnx", "models/é.onnx",
    "CON", "models/nul.txt", "x.", "manifest.json", "MANIFEST.JSON.sig", "", "a" * 256,
])
def test_unsafe_arcnames_are_refused_in_manifests_and_by_the_writer(tmp_path, name):
    entry = {"sha256": "0" * 64, "size": 0}
    forged = _forge(tmp_path / "evil.medge", files={name: entry})
    with pytest.raises(BundleError) as info:
        Bundle.open(forged)
    assert "manifest.json" in str(info.value)
    with BundleWriter(tmp_path / "w.medge") as writer, pytest.raises(BundleError):
        writer.add_file(b"x", name)
    with pytest.raises(BundleError):
        validate_arcname(name)


def test_traversal_is_refused_before_any_file_is_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    entry = {"sha256": hashlib.sha256(b"secret").hexdigest(), "size": 6}
    forged = _forge(tmp_path / "evil.medge", files={"../secret.txt": entry})
    with pytest.raises(BundleError, match="'..' segment"):
        Bundle.open(forged)


def test_writer_refuses_duplicates_and_case_collisions(tmp_path):
    with BundleWriter(tmp_path / "w.medge") as writer:
        writer.add_file(b"a", "models/a.onnx")
        with pytest.raises(BundleError, match="already in the bundle"):
            writer.add_file(b"b", "models/a.onnx")
        with pytest.raises(BundleError, match="ignoring case"):
            writer.add_file(b"b", "Models/A.onnx")
        with pytest.raises(BundleError, match="file vs folder"):
            writer.add_file(b"b", "models/a.onnx/x")
        with pytest.raises(BundleError, match="is a folder"):
            writer.add_file(tmp_path, "models/b.onnx")
        with pytest.raises(BundleError, match="cannot read"):
            writer.add_file(tmp_path / "missing.onnx", "models/b.onnx")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("content, match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[]", "JSON object"),
    (b'{"schema_version": 1, "files": {}, "files": {}}', "duplicate key"),
    (b'{"schema_version": 1, "files": {}, "x": NaN}', "NaN is not JSON"),
    (b'{"files": {}}', "no integer schema_version"),
    (b'{"schema_version": 2, "files": {}}', r"newer medge.*Upgrade medge"),
    (b'{"schema_version": 1}', "no 'files' table"),
    (b'{"schema_version": 1, "files": {"a/b": {"sha256": "XYZ", "size": 1}}}', "sha256 of a/b"),
    (b'{"schema_version": 1, "files": {"a/b": {"sha256": "' + b"0" * 64 + b'", "size": -1}}}', "size of a/b"),
    (b'{"schema_version": 1, "files": {"a/b": {"sha256": "' + b"0" * 64 + b'", "size": 1},'
     b' "A/B": {"sha256": "' + b"0" * 64 + b'", "size": 1}}}', "case-insensitive"),
    (b'{"schema_version": 1, "files": {}, "engines": [{"file": "engines/x.engine"}]}', r"engines\[0\]\.file"),
    (b'{"schema_version": 1, "files": {}, "graphs": {"fp16": {"file": ["x"]}}}', r"graphs\.fp16\.file"),
    (b'{"schema_version": 1, "files": {}, "engines": {}}', "'engines' must be a list"),
])
def test_malformed_manifests(tmp_path, content, match):
    path = tmp_path / "b.medge"
    path.mkdir()
    (path / "manifest.json").write_bytes(content)
    with pytest.raises(BundleError, match=match):
        Bundle.open(path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        Bundle.open(tmp_path / "missing.medge")
    (tmp_path / "file.medge").write_bytes(b"zip?")
    with pytest.raises(BundleError, match="is a directory"):
        Bundle.open(tmp_path / "file.medge")
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path)


# ---------------------------------------------------------------------------
# Atomic writing


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "chest.medge"
    with pytest.raises(RuntimeError, match="engine build crashed"):
        with BundleWriter(target) as writer:
            writer.add_file(ARTIFACTS["models/model.fp32.onnx"], "models/model.fp32.onnx")
            assert len(os.listdir(target.parent)) == 1  # the hidden temporary sibling exists while writing
            raise RuntimeError("engine build crashed")
    assert os.listdir(target.parent) == []

    writer = BundleWriter(target)  # never committed, never closed: dropped
    writer.add_file(b"x", "models/x.onnx")
    del writer
    gc.collect()
    assert os.listdir(target.parent) == []


def test_commit_closes_the_writer(tmp_path):
    with BundleWriter(tmp_path / "a.medge") as writer:
        writer.commit({})
        with pytest.raises(BundleError, match="closed"):
            writer.add_file(b"x", "models/x.onnx")
    assert Bundle.open(tmp_path / "a.medge").verify().files == 0


@pytest.mark.parametrize("native_rename", [True, False], ids=["renameat2", "portable"])
def test_overwrite(tmp_path, monkeypatch, native_rename):
    if not native_rename:
        monkeypatch.setattr(bundle_mod, "_renameat2", lambda src, dst, flags: False)
    target = tmp_path / "chest.medge"
    write_bundle(target)
    with pytest.raises(BundleError, match="overwrite=True"):
        BundleWriter(target)
    new = write_bundle(target, manifest={}, artifacts={"models/other.onnx": b"new"}, overwrite=True)
    assert set(new.files) == {"models/other.onnx"}
    assert not (target / "models" / "model.fp32.onnx").exists()
    new.verify()
    assert listing(tmp_path) == ["chest.medge"]

    # The target appears while the writer works: not replaced without overwrite.
    writer = BundleWriter(tmp_path / "late.medge")
    write_bundle(tmp_path / "late.medge", manifest={}, artifacts={})
    with pytest.raises(BundleError, match="exists"):
        writer.commit({})
    assert Bundle.open(tmp_path / "late.medge").files == {}
    assert listing(tmp_path) == ["chest.medge", "late.medge"]


def test_overwrite_refuses_what_is_not_a_bundle(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(BundleError, match="not a medge bundle"):
        BundleWriter(precious, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="not a bundle directory"):
        BundleWriter(tmp_path / "file", overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty.medge").mkdir()
    write_bundle(tmp_path / "empty.medge", manifest={}, artifacts={}, overwrite=True).verify()


# ---------------------------------------------------------------------------
# describe() and medge inspect


def test_describe_full(signed, keys):
    text = describe(signed)
    for expected in [
        "chestnet 1.2.0", "source chestnet.pt2, opset 17",
        "image", "[N, 1, 224, 224]", "logits",
        "224x224, 1 channel(s), float16", "window -600/1500 LINEAR", "letterbox (pad 0)",
        "Labels    3, softmax", "0:normal, 1:nodule, 2:effusion",
        "fp32", "models/model.int8.onnx", "in float32 -> out float32",
        "method percentile, images 512, batches 16, percentile 99.99",
        "Accuracy (reference fp32)", "max|err|", "0.0123", "0.9960", "0.9412",
        "int8 batch 8 not measured: engine build skipped",
        "tensorrt_rtx 1.2.0, int8, 8.0 kB, for NVIDIA GeForce RTX 4090, sm 8.9, built in 12.3 s",
        "profile min [1, 1, 224, 224] opt [4, 1, 224, 224] max [8, 1, 224, 224]",
        "layers Int8 41, Half 3, Float 2",
        f"Signature ed25519 by key {keys['a'][2][:16]}",
        "Files     5",
    ]:
        assert expected in text, expected
    for arcname, content in ARTIFACTS.items():
        assert f"{hashlib.sha256(content).hexdigest()[:12]}" in text and arcname in text
    assert "INVALID" not in text and "MISSING" not in text and "malformed" not in text

    (signed.path / "models" / "model.int8.onnx").unlink()
    assert "MISSING" in describe(signed.path)  # describe() takes a path too, and stats files cheaply


def test_describe_minimal_and_malformed(tmp_path):
    minimal = write_bundle(tmp_path / "min.medge", manifest={}, artifacts={})
    text = describe(minimal)
    assert "Model     (not recorded)" in text and "Signature none" in text and "Files     0" in text
    assert "Accuracy" not in text and "Engines" not in text

    # Sections the runtime reads are schema-checked when written and opened (see the test below); describe()
    # still shows what it can of the report-only sections and of an invalid preprocessing spec.
    odd = {"model": {"name": 3}, "preprocess": {"height": 0, "width": "?"},
           "labels": ["a"], "accuracy": {"results": [{"precision": "fp16"}, "junk"]},
           "engines": [{"flavour": "tensorrt", "precision": "fp16",
                        "profile": {"image": {"min": [1], "opt": [2], "max": [4]}}, "layer_precisions": {"Int8": "many"}}],
           "calibration": {"method": None}}
    text = describe(write_bundle(tmp_path / "odd.medge", manifest=odd, artifacts={}))
    assert "INVALID for this medge" in text  # the preprocess spec the runtime would refuse
    assert "image: min [1] opt [2] max [4]" in text
    assert "fp16" in text


def _inspect(argv):
    parser = argparse.ArgumentParser(prog="medge")
    inspect_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


def test_inspect_command(signed, keys, capsys):
    assert _inspect([str(signed.path)]) == 0
    out = capsys.readouterr().out
    assert "chestnet 1.2.0" in out and "Verify" not in out

    assert _inspect([str(signed.path), "--trusted-key", str(keys["a"][1])]) == 0
    assert f"Verify    OK: 5 file(s), 21.3 kB hashed, signature valid (key {keys['a'][2][:16]})" in \
        capsys.readouterr().out

    assert _inspect([str(signed.path), "--json", "--verify"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["model"]["name"] == "chestnet"
    assert data["signature"]["public_key_sha256"] == keys["a"][2]
    assert data["verification"] == {"ok": True, "files": 5, "bytes": 21268, "signed_by": None}

    flip_byte(signed.path / "models" / "model.int8.onnx")
    with pytest.raises(BundleError, match="models/model.int8.onnx"):
        _inspect([str(signed.path), "--verify"])
    with pytest.raises(SignatureError):
        _inspect([str(signed.path), "--json", "--trusted-key", str(keys["b"][1])])
    assert capsys.readouterr().out.count("{") == 0  # nothing half-true printed as JSON


@pytest.mark.parametrize("section,match", [
    ({"model": "just a string"}, "model must be an object"),
    ({"inputs": {"image": 1}}, "inputs must be a list"),
    ({"inputs": [{"name": "x", "shape": "1x3", "dtype": "float32"}]}, r"inputs\[0\]\.shape must be a list"),
    ({"labels": [1, 2]}, "labels must be a list of strings"),
    ({"profile": {"min": 1, "opt": "4", "max": 8}}, "profile.opt must be an integer"),
    ({"profile": {"min": 8, "opt": 4, "max": 1}}, "1 <= min <= opt <= max"),
    ({"task": ["classification"]}, "task must be an object"),
    ({"gates": {"passed": "yes"}}, "gates.passed must be true or false"),
    ({"gates": {"passed": True, "verdicts": {"int8": {"verdict": "fine"}}}}, "verdicts.int8.verdict must be one of"),
    ({"engines": [{"flavour": "tensorrt", "precision": "int4"}]}, r"engines\[0\]\.precision must be one of"),
    ({"engines": [{"flavour": "tensorrt", "precision": "fp16", "gpu": "RTX 4090"}]}, r"engines\[0\]\.gpu must be"),
])
def test_manifest_sections_of_the_wrong_type_are_a_bundle_error(tmp_path, section, match):
    """A damaged or hand-edited manifest answers with BundleError naming the field, never KeyError/TypeError."""
    with pytest.raises(BundleError, match=match):
        write_bundle(tmp_path / "w.medge", manifest=section, artifacts={})
    # The same manifest planted on disk (bypassing the writer) is refused by Bundle.open.
    path = tmp_path / "planted.medge"
    path.mkdir()
    (path / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": {}, **section}))
    with pytest.raises(BundleError, match=match):
        Bundle.open(path)
