"""Sources of the python-backend models that ``medge export-triton`` writes as ``<model>/1/model.py``.

Each file here is copied verbatim into the model repository; it runs inside
Triton's python backend (``triton_python_backend_utils`` exists only there),
imports ``medge`` for the actual work, and reads everything model-specific
from its ``config.pbtxt`` ``parameters`` and its version folder. Do not
import these modules outside Triton.

- ``preprocess.py``: DICOM bytes (TYPE_STRING) -> the network's input, with
  medge's reader, the bundle's PreprocessSpec and its validated envelope.
- ``network.py``: the bundle's graph run by medge's own runtime (ONNX
  Runtime), for servers that have only the python backend; it also applies
  the task's activation (outputs SCORES and LABEL like ``postprocess``).
- ``postprocess.py``: the network's first output -> SCORES and LABEL
  (after the onnxruntime / tensorrt_plan networks).
"""

from __future__ import annotations

from importlib import resources

#: Source file per model role.
SOURCES = {"preprocess": "preprocess.py", "network": "network.py", "postprocess": "postprocess.py"}


def source(role: str) -> bytes:
    """The model.py source of ``role`` ("preprocess", "network", "postprocess")."""
    return resources.files(__name__).joinpath(SOURCES[role]).read_bytes()
