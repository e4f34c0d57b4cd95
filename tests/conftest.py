"""Shared fixtures: the demo bundle is converted once per test session.

``MEDGE_EXPECT_GPU=1``: on a machine that must test the GPU path (a GPU CI
runner, a release check), every test marked ``gpu`` that skips fails instead,
with its skip reason. Without it, a driver older than the CUDA runtime (or a
missing cuda-python, or a GPU the flavour cannot target) skips every GPU test
and the run looks green while the GPU path went untested.
"""

from __future__ import annotations

import os

import pytest

EXPECT_GPU = "MEDGE_EXPECT_GPU"
#: A GPU test skipped with this prefix is not a failure under MEDGE_EXPECT_GPU=1: the GPU is there and works,
#: but the engine flavour installed cannot target it (TensorRT-RTX on a Hopper, for instance). The CUDA path
#: itself is still tested by the other gpu tests on that machine.
NOT_FOR_THIS_GPU = "not for this GPU: "


def skip_not_for_this_gpu(reason: str) -> None:
    """Skip a gpu test whose engine flavour cannot target the GPU present (allowed under MEDGE_EXPECT_GPU)."""
    pytest.skip(NOT_FOR_THIS_GPU + reason)


def _expect_gpu() -> bool:
    return os.environ.get(EXPECT_GPU, "").strip().lower() in ("1", "true", "yes", "on")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With MEDGE_EXPECT_GPU=1, a skipped ``gpu`` test (in setup, by a marker or fixture, or in its body) fails."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or item.get_closest_marker("gpu") is None:
        return
    if not _expect_gpu():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason
    if reason.startswith(NOT_FOR_THIS_GPU):
        return
    report.outcome = "failed"
    report.longrepr = (f"{EXPECT_GPU}=1, but this GPU test was skipped, so the GPU path went untested: {reason}\n"
                       "Fix the machine (driver, cuda-python, TensorRT) or unset MEDGE_EXPECT_GPU.")
    report.medge_expected_gpu = True


def pytest_report_teststatus(report, config):
    # A failed setup is shown as an error; these are failures of the run's promise to test the GPU.
    if getattr(report, "medge_expected_gpu", False):
        return "failed", "F", "FAILED"
    return None


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory):
    """medge-convert --demo output (with TensorRT-RTX engines when tensorrt_rtx is installed)."""
    pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
    from medge.convert.demo import convert_demo

    try:
        import tensorrt_rtx  # noqa: F401

        engine = "tensorrt_rtx"
    except ImportError:
        engine = "none"
    return convert_demo(tmp_path_factory.mktemp("demo") / "demo.medge", engine=engine, log=lambda _: None)
