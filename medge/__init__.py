"""medge: edge deployment of medical-imaging networks.

Public API (everything else is private):

- ``read_dicom`` -> ``Image`` (stored values + ``PixelSemantics``)
- ``read_series`` -> ``Volume`` (a DICOM series ordered along its normal, with patient-space geometry)
- ``PreprocessSpec`` and ``preprocess`` (fused C++ / CUDA preprocessing)
- ``cuda_available``
- ``load`` -> ``Model`` (``predict``, ``predict_batch`` -> ``Prediction``; ``segment`` -> ``Segmentation``
  for segmentation bundles), ``Batcher``
- ``errors``: ``MedgeError`` and its subclasses

``import medge`` needs only numpy and pydicom; optional heavy dependencies
are imported where they are used and name their pip extra when missing.
"""

__version__ = "0.1.0"


def _use_installed_native_module() -> None:
    """Let a source checkout find the compiled medge._C of an installed copy.

    From the repository root, ``import medge`` finds these sources (the
    current directory comes first on sys.path), which hold no compiled
    module after a plain ``pip install .``. Append the installed package's
    directory to ``__path__`` so ``medge._C`` resolves there, and only when
    it is the same version, so sources and binary cannot silently disagree.
    """
    import importlib.machinery
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))

    def has_native(directory: str) -> bool:
        return any(os.path.exists(os.path.join(directory, "_C" + suffix))
                   for suffix in importlib.machinery.EXTENSION_SUFFIXES)

    if has_native(here):
        return
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("medge")
    except (ImportError, PackageNotFoundError):
        return
    if dist.version != __version__:
        return
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "medge")
        if candidate != here and has_native(candidate):
            __path__.append(candidate)  # noqa: F821 - the package's own __path__
            return


_use_installed_native_module()

from . import errors  # noqa: E402
from .dicom import read_dicom  # noqa: E402
from .errors import MedgeError  # noqa: E402
from .image import FrameTransform, Image, PixelSemantics, Window  # noqa: E402
from .preprocess import PreprocessSpec, cuda_available, preprocess  # noqa: E402
from .runtime.batcher import Batcher  # noqa: E402
from .runtime.model import Model, Prediction, load  # noqa: E402
from .segmentation import Segmentation  # noqa: E402
from .series import Volume, read_series  # noqa: E402
from .sliding_window import sliding_window  # noqa: E402
from .volume import VolumeSpec, preprocess_volume, resample_labels, to_original_grid  # noqa: E402

__all__ = [
    "__version__",
    "errors",
    "MedgeError",
    "read_dicom",
    "Image",
    "PixelSemantics",
    "FrameTransform",
    "Window",
    "PreprocessSpec",
    "preprocess",
    "cuda_available",
    "load",
    "Model",
    "Prediction",
    "Batcher",
    "read_series",
    "Segmentation",
    "Volume",
    "VolumeSpec",
    "preprocess_volume",
    "resample_labels",
    "to_original_grid",
    "sliding_window",
]
