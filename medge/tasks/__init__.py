"""Tasks: what a bundle's outputs mean (DESIGN.md "one task contract").

A task is the seam that conversion, validation, the runtime and the writers
never branch around: each asks the bundle's task whether the model's outputs
fit, how to compare a precision with FP32, and how raw outputs become a
prediction. The manifest records the task (``manifest["task"]``); a bundle
without one is refused, so an output is never interpreted by guesswork.

Tasks: ``classification`` (one score vector per image) and ``segmentation``
(one score per class and pixel or voxel, 2-D or 3-D networks, run over
volumes with a sliding window). A per-pixel output declared as a classifier
is refused at conversion (convert it with ``--task segmentation``) rather
than flattened into a meaningless score vector.
"""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from .base import Task
from .classification import ClassificationTask
from .segmentation import SegmentationTask

__all__ = ["Task", "ClassificationTask", "SegmentationTask", "TASKS", "task_from_manifest"]

#: Task kinds this medge knows, by the name the manifest records.
TASKS: dict[str, type[Task]] = {ClassificationTask.kind: ClassificationTask,
                                 SegmentationTask.kind: SegmentationTask}


def task_from_manifest(manifest: dict) -> Task:
    """The task a bundle's manifest declares.

    Raises:
        BundleError: no task, an unknown kind, or task fields of the wrong type.
    """
    entry: Any = manifest.get("task")
    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
        raise BundleError("the bundle's manifest declares no task; convert the model again with this medge "
                          "(medge-convert records what its outputs mean)")
    kind = entry["kind"]
    if kind not in TASKS:
        raise BundleError(f"the bundle's task {kind!r} is not one this medge runs ({', '.join(TASKS)}); "
                          "upgrade medge")
    return TASKS[kind].from_manifest(entry)
