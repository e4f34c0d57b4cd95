"""Tasks: what a bundle's outputs mean (DESIGN.md "one task contract").

A task is the seam that conversion, validation, the runtime and the writers
never branch around: each asks the bundle's task whether the model's outputs
fit, how to compare a precision with FP32, and how raw outputs become a
prediction. The manifest records the task (``manifest["task"]``); a bundle
without one is refused, so an output is never interpreted by guesswork.

Today's task is ``classification``; per-pixel outputs are refused at
conversion ("segmentation is not supported yet") rather than flattened.
"""

from __future__ import annotations

from typing import Any

from ..errors import BundleError
from .base import Task
from .classification import ClassificationTask

__all__ = ["Task", "ClassificationTask", "TASKS", "task_from_manifest"]

#: Task kinds this medge knows, by the name the manifest records.
TASKS: dict[str, type[Task]] = {ClassificationTask.kind: ClassificationTask}


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
