"""The medge command line: demo, preprocess, and its one error path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medge import PreprocessSpec, preprocess, read_dicom
from medge.cli.main import main
from medge.synthetic import ct_slice, write_ct_series


def test_demo_preprocesses_every_sample(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out
    assert "MONOCHROME1" in out and "window 40/400" in out
    assert len(list(tmp_path.glob("*.dcm"))) == 8


def test_preprocess_folder_matches_the_api_and_survives_a_damaged_file(tmp_path, capsys):
    files = write_ct_series(tmp_path / "in", 3, size=64)
    damaged = tmp_path / "in" / "damaged.dcm"
    damaged.write_bytes(files[0].read_bytes()[:600])  # truncated inside the header / pixel data
    out_file = tmp_path / "batch.npy"
    code = main(["preprocess", str(tmp_path / "in"), "-o", str(out_file), "--size", "32", "32", "--no-progress"])
    assert code == 1  # something failed, and the exit code says so
    assert "damaged.dcm: FAILED" in capsys.readouterr().out
    batch = np.load(out_file)
    spec = PreprocessSpec(32, 32)
    expected = preprocess([read_dicom(f) for f in sorted(files)], spec)
    np.testing.assert_array_equal(batch, expected)


def test_preprocess_with_a_spec_file(tmp_path):
    path = tmp_path / "ct.dcm"
    ct_slice(seed=3, size=48, lesion=True).save_as(path, enforce_file_format=True)
    spec = PreprocessSpec(16, 20, channels=3, voi="window", window=(-600, 1500), dtype="float16")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.to_json())
    assert main(["preprocess", str(path), "-o", str(tmp_path / "o.npy"), "--spec", str(spec_file)]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), preprocess(read_dicom(path), spec))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["preprocess", "/nonexistent/x.dcm", "-o", "o.npy"], "no such file"),
        (["preprocess", ".", "-o", "o.npy", "--spec", "/nonexistent.json"], "cannot read the spec file"),
    ],
)
def test_user_errors_exit_2_without_traceback(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medge: error:") and message in err
    assert "Traceback" not in err


def test_invalid_spec_json_exits_2(tmp_path, capsys):
    (tmp_path / "a.dcm").write_bytes(b"x")
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({"height": 8, "width": 8, "resample": "nearest"}))
    assert main(["preprocess", str(tmp_path / "a.dcm"), "-o", str(tmp_path / "o.npy"), "--spec", str(bad)]) == 2
    assert "resample must be one of" in capsys.readouterr().err
