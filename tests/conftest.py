"""Shared fixtures: the demo bundle is converted once per test session."""

from __future__ import annotations

import pytest


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
