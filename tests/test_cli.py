"""The medge command line: demo, preprocess, its one error path, help on every flag, and README examples
that match the code. (``medge run``: tests/test_run_cmd.py.)"""

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


# --------------------------------------------------------------------------- every flag has help


def _actions_without_help(parser, prog: str) -> list:
    """Every argparse action of ``parser`` and its sub-commands that has no help text ("prog: -x/--xx")."""
    import argparse

    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if not action.help:
                missing.append(f"{prog}: the sub-command list")
            for choice in action._choices_actions:
                if not choice.help:
                    missing.append(f"{prog} {choice.dest}: the sub-command itself")
            for name, sub in action.choices.items():
                missing += _actions_without_help(sub, f"{prog} {name}")
        elif not action.help:  # argparse.SUPPRESS is a string: a deliberately hidden flag passes
            missing.append(f"{prog}: {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_medge_flag_has_help():
    from medge.cli.main import build_parser

    assert _actions_without_help(build_parser(), "medge") == []


def test_every_medge_convert_flag_has_help():
    from medge.cli.convert import build_parser

    assert _actions_without_help(build_parser(), "medge-convert") == []


# --------------------------------------------------------------------------- the README matches the code


def _readme() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _python_blocks(text: str) -> list:
    import re

    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _resolve(dotted: str):
    """Import-resolve ``medge.a.b.c`` (modules imported as needed); AssertionError naming what is missing."""
    import importlib

    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[: i + 1]))
        except ModuleNotFoundError as exc:
            if exc.name != ".".join(parts[: i + 1]):
                raise  # a dependency of that module is missing: say so, do not blame the README
            raise AssertionError(f"the README names {dotted}, but {'.'.join(parts[:i])} has no {part!r}") from None
    return obj


def _dotted(node):
    """``medge.a.b`` for an ast Attribute chain rooted at the name ``medge``, else None."""
    import ast

    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "medge":
        return ".".join(["medge", *reversed(names)])
    return None


def test_readme_python_examples_compile_and_name_what_exists():
    """Every README python block compiles; every medge.x.y it names exists; every medge call binds to its signature."""
    import ast
    import inspect

    blocks = _python_blocks(_readme())
    assert len(blocks) >= 2, "the README's python examples were not found"
    checked = set()
    for number, block in enumerate(blocks, start=1):
        tree = ast.parse(compile(block, f"README python block {number}", "exec", ast.PyCF_ONLY_AST))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "medge":
                for alias in node.names:
                    checked.add(f"{node.module}.{alias.name}")
                    _resolve(f"{node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    _resolve(alias.name)
            elif isinstance(node, ast.Attribute) and _dotted(node):
                checked.add(_dotted(node))
                _resolve(_dotted(node))
            if isinstance(node, ast.Call) and _dotted(node.func):
                if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                    continue
                target = _resolve(_dotted(node.func))
                try:
                    inspect.signature(target).bind(*node.args, **{k.arg: k.value for k in node.keywords})
                except TypeError as exc:
                    raise AssertionError(f"README python block {number}: {ast.unparse(node)}: {exc}") from None
    assert {"medge.load", "medge.Batcher", "medge.read_dicom", "medge.PreprocessSpec", "medge.preprocess"} <= checked


def test_readme_prose_names_what_exists():
    """`medge.x.y` in the README's inline code (e.g. medge.convert.pipeline.convert(...)) exists."""
    import re

    names = set()
    for span in re.findall(r"`([^`\n]+)`", _readme()):
        names.update(re.findall(r"\bmedge(?:\.[A-Za-z_]\w*)+", span))
    assert "medge.load" in names
    for name in sorted(names):
        _resolve(name)


# --------------------------------------------------------------------------- inputs shared by the commands


def test_preprocess_reads_a_folder_by_content_and_lists_what_it_skipped(tmp_path, capsys):
    folder = tmp_path / "in"
    files = write_ct_series(folder / "series", 2, size=32)
    files[1].rename(folder / "1.2.840.113619.2.55.3.4")  # UID-named, suffix ".4"
    assert main(["preprocess", str(folder), "-o", str(tmp_path / "b.npy"), "--size", "16", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "series/labels.csv: skipped: not DICOM" in out
    assert "(2 of 2 files; 1 skipped (1 not DICOM))" in out
    assert np.load(tmp_path / "b.npy").shape == (2, 1, 16, 16)


def test_no_command_module_imports_another():
    """Shared helpers live in medge/_inputs.py and medge/cli/_run.py; only the dispatcher, main.py, imports commands."""
    import ast
    from pathlib import Path

    import medge.cli

    cli = Path(medge.cli.__file__).parent
    commands = {"main", "run_cmd", "inspect_cmd", "convert"}
    for name in ["_run", "run_cmd", "inspect_cmd"]:
        tree = ast.parse((cli / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1
                     and node.module is None for alias in node.names}
        assert not imported & commands, f"medge/cli/{name}.py imports {imported & commands}"
    shared = ast.parse((cli.parent / "_inputs.py").read_text())
    assert not [node for node in ast.walk(shared) if isinstance(node, ast.ImportFrom) and "cli" in (node.module or "")]
