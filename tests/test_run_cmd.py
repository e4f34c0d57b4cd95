"""``medge run``: which files it reads (by content), what it lists as skipped, how rows name files,
--device, and --out refused before the model loads."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sys

import pytest

from medge import _inputs
from medge._inputs import collect_inputs, is_dicom
from medge.cli.main import main
from medge.demo import write_demo_dicoms
from medge.synthetic import ct_slice, write_ct_series

UID_NAME = "1.2.840.113619.2.55.3.4"  # a common export name: its "suffix" is ".4"


def _bare_dataset_bytes(seed: int, *, implicit: bool) -> bytes:
    """A CT slice written as a bare data set: no preamble, no 'DICM', no File Meta Information."""
    import pydicom
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset

    bare = pydicom.Dataset()
    bare.update(ct_slice(seed=seed, lesion=False))
    buffer = io.BytesIO()
    stream = DicomFileLike(buffer)
    stream.is_little_endian, stream.is_implicit_VR = True, implicit
    write_dataset(stream, bare)
    return buffer.getvalue()


def _dicomdir_bytes() -> bytes:
    """A minimal DICOMDIR: File Meta Information with the Media Storage Directory SOP Class, no image."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = _inputs.DICOMDIR_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.FileSetID = "EXPORT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """An export as scanners and PACS write them: UID-named files, a sub-folder, a bare data set, and other files."""
    root = tmp_path_factory.mktemp("export")
    # The demo's own kind of slice (512 x 512, its pixel spacing): inside the bundle's validated envelope.
    series, _ = write_demo_dicoms(tmp_path_factory.mktemp("series"), "validation", 3)
    shutil.copy(series[0], root / UID_NAME)
    (root / "sub").mkdir()
    shutil.copy(series[1], root / "sub" / "IM0001.DCM")
    (root / "bare").write_bytes(_bare_dataset_bytes(7, implicit=True))
    (root / "README.txt").write_text("exported by a scanner\n")
    (root / "DICOMDIR").write_bytes(_dicomdir_bytes())
    (root / ".git").mkdir()
    shutil.copy(series[2], root / ".git" / "hidden.dcm")
    return root


# --------------------------------------------------------------------------- what is read (no model needed)


def test_content_decides_not_the_name(export_folder):
    found = collect_inputs([str(export_folder)])
    assert [(f.name, f.bare) for f in found.files] == [(UID_NAME, False), ("bare", True), ("sub/IM0001.DCM", False)]
    assert {s.name: (s.kind, s.error) for s in found.skipped} == {
        ".git/": ("hidden folder", False),
        "DICOMDIR": ("DICOMDIR", False),
        "README.txt": ("not DICOM", False),
    }
    assert found.summary() == "3 skipped (1 hidden folder, 1 DICOMDIR, 1 not DICOM)"
    assert not found.unreadable


def test_header_check():
    preamble = bytes(128) + b"DICM" + bytes(16)
    assert is_dicom(preamble, 1000) == "file"
    for implicit in (True, False):
        data = _bare_dataset_bytes(1, implicit=implicit)
        assert is_dicom(data[:_inputs.HEAD_BYTES], len(data)) == "bare"
    assert is_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200), 208) is None
    assert is_dicom(b"exported by a scanner\n", 22) is None
    assert is_dicom(b"", 0) is None
    # Group 0008 but a length that runs past the end of the file, or is odd: not a data set.
    assert is_dicom(b"\x08\x00\x05\x00CS\xff\x00ISO", 11) is None
    assert is_dicom(b"\x08\x00\x05\x00\x03\x00\x00\x00abc\x00", 12) is None


def test_damaged_file_named_dcm_is_tried_and_an_explicit_file_is_always_tried(tmp_path):
    (tmp_path / "truncated.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    found = collect_inputs([str(tmp_path)])
    assert [f.name for f in found.files] == ["truncated.dcm"]
    given = str(tmp_path / "notes.txt")
    found = collect_inputs([given])
    assert [f.name for f in found.files] == [given] and not found.skipped


def test_symlinks_and_special_files(tmp_path):
    series = write_ct_series(tmp_path / "series", 1, size=32)
    root = tmp_path / "in"
    root.mkdir()
    (root / "link.dcm").symlink_to(series[0])
    (root / "series_link").symlink_to(tmp_path / "series", target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "missing")
    os.mkfifo(root / "pipe")
    signal.alarm(10)  # opening the FIFO would block: fail loudly instead of hanging
    try:
        found = collect_inputs([str(root)])
    finally:
        signal.alarm(0)
    assert [f.name for f in found.files] == ["link.dcm"]
    assert {s.name: (s.kind, s.error) for s in found.skipped} == {
        "dangling": ("unreadable", True),
        "pipe": ("not a regular file", False),
        "series_link/": ("symlinked folder", False),
    }
    # A symlinked folder named on the command line is the user's choice: it is searched.
    assert [f.name for f in collect_inputs([str(root / "series_link")]).files] == [series[0].name]


def test_unreadable_file_is_listed_as_an_error(tmp_path, monkeypatch):
    write_ct_series(tmp_path, 2, size=32)
    (tmp_path / "labels.csv").unlink()
    real = _inputs.read_head

    def read_head(path):
        if path.name == "ct_00001.dcm":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(_inputs, "read_head", read_head)
    found = collect_inputs([str(tmp_path)])
    assert [f.name for f in found.files] == ["ct_00000.dcm"]
    assert [(s.name, s.reason, s.error) for s in found.skipped] == [
        ("ct_00001.dcm", "unreadable: permission denied", True)]
    assert found.summary() == "1 skipped (1 unreadable)"


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="permission bits do not bind root")
def test_unreadable_file_and_folder_really(tmp_path):
    files = write_ct_series(tmp_path, 1, size=32)
    (tmp_path / "labels.csv").unlink()
    (tmp_path / "locked").mkdir()
    files[0].chmod(0)
    (tmp_path / "locked").chmod(0)
    try:
        found = collect_inputs([str(tmp_path)])
    finally:
        files[0].chmod(0o644)
        (tmp_path / "locked").chmod(0o755)
    assert {s.name: s.reason for s in found.skipped} == {
        "ct_00000.dcm": "unreadable: permission denied", "locked/": "unreadable: permission denied"}


def test_missing_input_is_a_user_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "b.medge"), str(tmp_path / "nothing")]) == 2
    assert "nothing: no such file or directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- refused before the model loads


@pytest.fixture
def load_must_not_run(monkeypatch):
    import medge.runtime.model

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(medge.runtime.model, "load", load)


@pytest.mark.parametrize("out,message", [
    ("missing/r.jsonl", "does not exist"),
    ("folder.jsonl", "is a folder"),
    ("r.txt", "must end in .jsonl or .csv"),
    ("r", "must end in .jsonl or .csv"),
])
def test_unwritable_out_is_refused_before_the_model_loads(out, message, export_folder, tmp_path, monkeypatch, capsys,
                                                          load_must_not_run):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.jsonl").mkdir()
    # The bundle does not even exist: the --out error must come first.
    assert main(["run", "no-such.medge", str(export_folder), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medge: error: --out") and message in err and "Traceback" not in err


def test_out_without_permission_is_refused_before_the_model_loads(export_folder, tmp_path, monkeypatch, capsys,
                                                                  load_must_not_run):
    locked = tmp_path / "locked"
    locked.mkdir()
    existing = tmp_path / "old.csv"
    existing.write_text("")
    real_access = os.access
    denied = {str(locked), str(existing)}
    # Permission bits do not bind root, so the check is also exercised through os.access.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) in denied else real_access(p, mode))
    assert main(["run", "no-such.medge", str(export_folder), "--out", str(locked / "r.jsonl")]) == 2
    assert "cannot create files in" in capsys.readouterr().err
    assert main(["run", "no-such.medge", str(export_folder), "--out", str(existing)]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "-1", "1.5"])
def test_bad_device_is_a_user_error(device, export_folder, capsys, load_must_not_run):
    assert main(["run", "no-such.medge", str(export_folder), "--device", device]) == 2
    err = capsys.readouterr().err
    assert "--device must be cpu, cuda, cuda:N or a CUDA device index N" in err and "Traceback" not in err


def test_device_values():
    from medge.cli.run_cmd import parse_device

    assert [parse_device(d) for d in ["cpu", "CPU", "cuda", "cuda:0", "cuda:3", "1"]] == ["cpu", "cpu", 0, 0, 3, 1]


def test_a_folder_without_dicom_is_a_user_error_listing_what_was_skipped(tmp_path, capsys, load_must_not_run):
    (tmp_path / "README.txt").write_text("x")
    assert main(["run", "no-such.medge", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "skipped README.txt: not DICOM" in err
    assert "no DICOM files found in the given inputs (1 skipped (1 not DICOM), listed above)" in err


# --------------------------------------------------------------------------- through a real bundle


def test_run_reads_by_content_lists_skips_and_names_rows_relative(demo_bundle, export_folder, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["run", str(demo_bundle.bundle_path), str(export_folder), "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "skipped README.txt: not DICOM" in err
    assert "skipped DICOMDIR: DICOMDIR" in err and "skipped .git/: hidden folder" in err
    assert "3 of 3 files predicted; 3 skipped (1 hidden folder, 1 DICOMDIR, 1 not DICOM)" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"] for r in rows] == [UID_NAME, "bare", "sub/IM0001.DCM"]
    assert all(r["sop_instance_uid"].startswith("2.25.") and r["label"] for r in rows)

    csv_out = tmp_path / "r.csv"
    given = str(export_folder / UID_NAME)
    assert main(["run", str(demo_bundle.bundle_path), str(export_folder / "sub"), given, "--out", str(csv_out)]) == 0
    with open(csv_out, newline="") as f:
        assert [row["file"] for row in csv.DictReader(f)] == ["IM0001.DCM", given]


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_device_cuda_is_accepted(device, demo_bundle, export_folder, tmp_path, capsys):
    """Without a GPU, --backend auto says why and runs on the CPU; with one, it runs there."""
    out = tmp_path / "r.jsonl"
    assert main(["run", str(demo_bundle.bundle_path), str(export_folder / UID_NAME), "--device", device,
                 "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1


def test_failed_and_unreadable_files_make_exit_status_1(demo_bundle, export_folder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    shutil.copytree(export_folder, folder, symlinks=True)
    (folder / "truncated.dcm").write_bytes((folder / UID_NAME).read_bytes()[:4000])
    out = tmp_path / "r.jsonl"
    assert main(["run", str(demo_bundle.bundle_path), str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipped truncated.dcm (failed):" in err and "3 of 4 files predicted, 1 failed; 3 skipped" in err
    assert len(out.read_text().splitlines()) == 3

    (folder / "truncated.dcm").unlink()
    real = _inputs.read_head
    monkeypatch.setattr(_inputs, "read_head",
                        lambda p: (_ for _ in ()).throw(PermissionError(13, "x")) if p.name == "bare" else real(p))
    assert main(["run", str(demo_bundle.bundle_path), str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "skipped bare: unreadable: permission denied" in err
    assert "2 of 2 files predicted; 4 skipped (1 hidden folder, 1 DICOMDIR, 1 not DICOM, 1 unreadable)" in err
