"""``medge-convert --demo``: the whole conversion chain on the built-in demo model.

The demo model (medge/demo: a small CNN that flags lung nodules on synthetic
CT slices) is converted with the calibration and validation DICOM sets that
medge.demo generates deterministically (disjoint from its training data), so
the run needs no download and gives the same report everywhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional


def convert_demo(output: Optional[Path] = None, *, calibration_count: Optional[int] = None,
                 validation_count: Optional[int] = None, log=print, **options: Any):
    """Convert the demo model into a bundle; returns medge.convert.pipeline.ConversionResult.

    Args:
        output: bundle path; default ``medge-demo-lesion.medge`` in a new temporary folder.
        calibration_count, validation_count: slices per demo set (default: medge.demo.DEFAULT_COUNTS).
        log: where step messages go.
        options: passed to medge.convert.convert (precisions, batch, engine, ...).
    """
    from ..demo import DEMO_MODEL_NAME, LABELS, demo_metadata, demo_model_path, demo_spec, write_demo_dicoms
    from .pipeline import convert

    metadata = demo_metadata()
    if output is None:
        output = Path(tempfile.mkdtemp(prefix="medge-demo-")) / f"{DEMO_MODEL_NAME}.medge"
    with tempfile.TemporaryDirectory(prefix="medge-demo-data-") as tmp:
        calib_dir, val_dir = Path(tmp) / "calibration", Path(tmp) / "validation"
        calib_files, _ = write_demo_dicoms(calib_dir, "calibration", calibration_count)
        val_files, labels = write_demo_dicoms(val_dir, "validation", validation_count)
        log(f"demo: {metadata.get('name', DEMO_MODEL_NAME)} (held-out AUC at training time: "
            f"{metadata.get('test_metrics', {}).get('auc', 'n/a')}); generated {len(calib_files)} calibration and "
            f"{len(val_files)} validation synthetic CT slices (512x512 int16)")
        return convert(demo_model_path(), Path(output), spec=demo_spec(), calibration=calib_dir, validation=val_dir,
                       labels=labels, name=DEMO_MODEL_NAME, version=str(metadata.get("version", "1")),
                       class_labels=list(LABELS), activation="softmax", positive_class="lesion", log=log, **options)
