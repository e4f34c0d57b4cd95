"""medge's error hierarchy: every user-facing failure is a MedgeError.

The CLIs print a MedgeError's message without a traceback and exit with status
2; any other exception is a bug in medge and keeps its traceback. Messages say
what was wrong and what to do about it, and never contain patient-identifying
tag values (names, IDs, dates): only tag keywords, numbers and UIDs of the
image itself.
"""

from __future__ import annotations

__all__ = [
    "MedgeError",
    "DicomError",
    "BundleError",
    "SignatureError",
    "ConversionError",
    "PreprocessError",
    "SpecError",
    "OutsideEnvelope",
    "BackendUnavailable",
    "CudaError",
    "MissingDependency",
]


class MedgeError(Exception):
    """Base class of every error medge raises on purpose."""


class DicomError(MedgeError):
    """A DICOM object cannot be read or its pixels cannot be interpreted."""


class BundleError(MedgeError):
    """A bundle is missing, malformed, or fails verification (the message names the file)."""


class SignatureError(BundleError):
    """A bundle's signature is missing, invalid, or made with an untrusted key."""


class ConversionError(MedgeError):
    """Model import, export, quantisation, validation or an engine build failed."""


class SpecError(MedgeError, ValueError):
    """A PreprocessSpec (or its JSON form) is invalid."""


class PreprocessError(MedgeError, ValueError):
    """Arguments to preprocessing are invalid (sizes, dtypes, buffers)."""


class OutsideEnvelope(MedgeError):
    """An input lies outside what the bundle's model was validated on (the message names the mismatch)."""


class BackendUnavailable(MedgeError):
    """A requested compute backend or device is not available here."""


class CudaError(MedgeError, RuntimeError):
    """A CUDA call or kernel launch failed."""


class MissingDependency(BackendUnavailable, ImportError):
    """An optional dependency is not installed; the message names the pip extra."""

    def __init__(self, module: str, extra: "str | None", purpose: str) -> None:
        self.module = module
        self.extra = extra
        # extra=None: a core dependency that a broken install lost.
        how = f'pip install "medge[{extra}]"' if extra else f"pip install {module} (a dependency of medge itself)"
        super().__init__(f"{purpose} needs the Python package '{module}', which is not installed. Install it with: {how}")
