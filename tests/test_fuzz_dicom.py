"""Seeded DICOM mutation fuzzing in CI: read_dicom and preprocess answer only with MedgeError, never leak.

Runs the first CASES cases of tools/fuzz_dicom.py (the overnight script; same
mutations, same seeds) in this process: mutated synthetic CT, CR MONOCHROME1,
enhanced multi-frame, big-endian, RLE, JPEG 2000 and JPEG-LS objects and
pydicom's small greyscale test files, each with distinctive patient values
planted. Every case must end in an image that preprocesses to finite values
or in a MedgeError, and no planted value may appear in an exception message,
its cause/context chain, a warning, or a log record (root and ``pydicom``
loggers at DEBUG). A failure names the case index: ``python
tools/fuzz_dicom.py --seed SEED --only INDEX --dump DIR`` reproduces it.
"""

from __future__ import annotations

import collections
import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("pydicom")

CASES = 3000
SEED = 20261207


def _fuzz_tool():
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "fuzz_dicom.py"
    spec = importlib.util.spec_from_file_location("medge_tools_fuzz_dicom", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_mutated_dicom_answers_only_with_medge_errors_and_never_leaks_patient_values():
    from medge import errors

    fuzz = _fuzz_tool()
    seeds = fuzz.build_seeds(public=True, max_public_bytes=200_000)
    names = {seed.name for seed in seeds}
    assert {"synthetic_ct", "synthetic_cr_monochrome1", "synthetic_enhanced", "synthetic_big_endian",
            "synthetic_rle", "synthetic_jpeg_ls", "synthetic_jpeg_lossless"} <= names
    specs = fuzz.specs()
    outcomes = [fuzz.run_case(fuzz.make_case(seeds, SEED, index), specs) for index in range(CASES)]

    medge_errors = {name for name in dir(errors) if isinstance(getattr(errors, name), type)
                    and issubclass(getattr(errors, name), errors.MedgeError)}
    bugs = [o for o in outcomes if o.outcome != "ok" and o.outcome not in medge_errors]
    leaks = [o for o in outcomes if o.leaks]
    assert not bugs, "\n".join(f"case {o.index} ({o.seed_name}, {o.operations}): {o.outcome}\n{o.detail}"
                               for o in bugs[:5])
    assert not leaks, "\n".join(f"case {o.index} ({o.seed_name}, {o.operations}): {o.leaks[:2]}" for o in leaks[:5])

    # The mutations must reach past the parser, or the two assertions above hold vacuously: some cases
    # decode and preprocess, some are refused by each kind of check this issue added.
    counts = collections.Counter(o.outcome for o in outcomes)
    messages = [o.message for o in outcomes]
    assert counts["ok"] > CASES // 20, counts
    assert any("in its own header but Rows (0028,0010)" in m for m in messages)  # codestream size lie
    assert any("RLE segment" in m for m in messages)
    assert any("is truncated" in m for m in messages)
    assert len({o.seed_name for o in outcomes}) == len(seeds)


DIFFERENTIAL_CASES = 1500


def test_fast_reader_agrees_with_pydicom_on_mutated_files():
    """read_dicom's fast reader (native scanner + Python conversion) against the pydicom-only path.

    Seeds: the corpus files the fast reader reads itself when unmutated (uncompressed little
    endian, no functional groups). Every mutated case must give the same outcome both ways:
    the same pixels, semantics, acquisition and UID, or the same error class and message.
    ``python tools/fuzz_dicom.py --differential`` runs the same check over the whole corpus.
    """
    import medge.dicom as dicom

    if dicom._scanner() is None:
        pytest.skip("this build of medge._C has no DICOM scanner")
    fuzz = _fuzz_tool()
    seeds = [seed for seed in fuzz.build_seeds(public=True, max_public_bytes=200_000)
             if dicom._fast_read(seed.data, dicom.DEFAULT_MAX_PIXELS) is not None]
    assert {"synthetic_ct", "synthetic_cr_monochrome1"} <= {seed.name for seed in seeds}
    results = [fuzz.differential_case(fuzz.make_case(seeds, SEED, index)) for index in range(DIFFERENTIAL_CASES)]
    different = [r for r in results if not r.same]
    assert not different, "\n".join(f"case {r.index} ({r.seed_name}, {r.operations}):\n  pydicom: {r.full}\n"
                                    f"  fast:    {r.fast}" for r in different[:5])
    # Not vacuous: a good share of the mutants is still read by the fast reader itself.
    assert sum(r.fast_answered for r in results) > DIFFERENTIAL_CASES // 10
