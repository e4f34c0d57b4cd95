"""What every DICOM result object shares: provenance, the source header it copies, UIDs.

Privacy rule for every object medge writes: patient and study attributes come
from the source image only, and only those the result's IODs require for the
Patient and General Study modules (``REFERENCE_ATTRIBUTES``). highdicom copies
every attribute of those modules that the evidence carries, so the evidence
medge hands it is a reduced copy of the source header, never the source itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import DicomError, MedgeError, MissingDependency

#: Manufacturer written into every result object.
MANUFACTURER = "medge"
#: Series Number of the SR series and of the overlay series medge writes (not required to be unique).
SR_SERIES_NUMBER = 9901
OVERLAY_SERIES_NUMBER = 9902

# Attributes copied from a source image into the evidence handed to highdicom.
#   Patient module: the Type 2 attributes (present in every result, as in every instance of the study), and the
#   identity-removal flags (a de-identified input must give de-identified results). Nothing of Type 3.
_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientIdentityRemoved",
            "DeidentificationMethod")
#   General Study module, Type 1 and 2.
_STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")
#   What references, overlays and orientation need (no patient values).
_IMAGE = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality", "InstanceNumber",
          "NumberOfFrames", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PixelRepresentation",
          "BitsAllocated", "BitsStored", "ImageOrientationPatient", "PatientOrientation", "PixelSpacing",
          "ImagerPixelSpacing", "Laterality", "ImageLaterality", "BodyPartExamined", "FrameOfReferenceUID")
REFERENCE_ATTRIBUTES = _PATIENT + _STUDY + _IMAGE
# Type 2 attributes highdicom reads unconditionally from the evidence: present (empty) even when the source lacks them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def import_highdicom(purpose: str):
    """highdicom, or MissingDependency naming the ``dicom-out`` extra."""
    try:
        import highdicom
    except ImportError:
        raise MissingDependency("highdicom", "dicom-out", purpose) from None
    return highdicom


def reference_header(dataset: Any) -> Any:
    """A copy of ``dataset`` reduced to ``REFERENCE_ATTRIBUTES`` (no pixel data, no other patient attributes).

    Type 2 attributes of the Patient and General Study modules that the source
    lacks are added empty (highdicom reads them unconditionally).

    Raises:
        DicomError: no SOP Class / SOP Instance / Study / Series Instance UID.
    """
    from pydicom.dataset import Dataset

    from .._pydicom_quiet import quiet_pydicom

    header = Dataset()
    with quiet_pydicom("copying a DICOM header"):
        try:
            for keyword in REFERENCE_ATTRIBUTES:
                element = dataset.get(keyword)
                if element is not None and keyword in dataset:
                    header[keyword] = dataset[keyword]
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged element
            raise DicomError(f"the source header cannot be read ({type(exc).__name__}); no result written") from None
        for keyword in _TYPE2:
            if keyword not in header:
                setattr(header, keyword, "")
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
                   if not str(header.get(k, "") or "")]
        if missing:
            raise DicomError(f"the source image has no {', '.join(missing)}: a result cannot reference it")
    return header


def result_uid(*parts: object) -> str:
    """A UID derived from ``parts`` (same parts, same UID), under the 2.25 root.

    Results are keyed by what produced them (bundle manifest, source
    instances, frame), so a result written or sent twice carries the same
    SOP Instance UID and a receiving archive stores it once.
    """
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class Provenance:
    """Which algorithm produced a result, as written into every result object.

    Attributes:
        name, version: the bundle's model name and version.
        manifest_sha256: SHA-256 of the bundle's manifest (which hashes every file of the bundle).
        task: the manifest's task entry (kind, classes, labels, activation, positive_class, threshold).
        operating_point: the manifest's operating point (target, threshold, sensitivity, specificity and
            their intervals), or None.
        preprocess: the manifest's preprocessing spec (overlays show the image through its window).
        runtime: what ran it (e.g. "onnxruntime cpu fp32"), or None.
        medge_version: the medge that wrote the result.
    """

    name: str
    version: str
    manifest_sha256: str
    task: dict
    operating_point: Optional[dict] = None
    preprocess: Optional[dict] = None
    runtime: Optional[str] = None
    medge_version: str = ""
    _task_obj: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, source: Any) -> "Provenance":
        """From a loaded ``medge.Model``, a ``medge.bundle.Bundle``, a bundle path, or a Provenance.

        Raises:
            BundleError: a bundle path that does not open.
            MedgeError: anything else.
        """
        from .. import __version__

        if isinstance(source, Provenance):
            return source
        runtime = None
        if hasattr(source, "manifest") and hasattr(source, "bundle"):  # medge.Model
            manifest, sha = source.manifest, source.bundle.manifest_sha256
            choice = getattr(source, "backend", None)
            if choice is not None and hasattr(choice, "name"):
                runtime = f"{choice.name} {getattr(choice, 'device', '')} {getattr(choice, 'precision', '')}".strip()
        elif hasattr(source, "manifest") and hasattr(source, "manifest_sha256"):  # medge.bundle.Bundle
            manifest, sha = source.manifest, source.manifest_sha256
        elif isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            from ..bundle import Bundle

            bundle = Bundle.open(source)
            manifest, sha = bundle.manifest, bundle.manifest_sha256
        else:
            raise MedgeError(f"results need the bundle that produced them (a medge.Model, Bundle or bundle path), "
                             f"got {type(source).__name__}")
        model = manifest.get("model") or {}
        from ..tasks import task_from_manifest

        task = task_from_manifest(manifest)
        return cls(name=str(model.get("name") or "unnamed model"), version=str(model.get("version") or "?"),
                   manifest_sha256=str(sha), task=dict(manifest.get("task") or {}),
                   operating_point=manifest.get("operating_point"), preprocess=manifest.get("preprocess"),
                   runtime=runtime, medge_version=__version__, _task_obj=task)

    @property
    def task_object(self):
        if self._task_obj is None:
            from ..tasks import task_from_manifest

            object.__setattr__(self, "_task_obj", task_from_manifest({"task": self.task}))
        return self._task_obj

    @property
    def labels(self) -> tuple:
        return tuple(self.task.get("labels") or ())

    def parameters(self) -> list[str]:
        """Algorithm Parameters (TID 4019) lines: the manifest hash, decision rule, operating point, runtime."""
        lines = [f"medge bundle manifest SHA-256 {self.manifest_sha256}"]
        task = self.task_object
        if getattr(task, "binary", False):
            lines.append(f"decision: {self.positive_label()} when its score >= {self.threshold():.6g}")
        else:
            lines.append(f"decision: the class with the highest {self.task.get('activation', 'softmax')} score")
        point = self.operating_point
        if point:
            text = f"operating point {point.get('target')}, threshold {point.get('threshold'):.6g}"
            for key in ("sensitivity", "specificity"):
                value, interval = point.get(key), point.get(f"{key}_ci")
                if value is not None:
                    text += f", {key} {value:.3f}"
                    if interval:
                        text += f" (95% CI {interval[0]:.3f}-{interval[1]:.3f})"
            if point.get("reliable") is False:
                text += ", flagged not reliable at conversion"
            lines.append(text)
        lines.append(f"medge {self.medge_version}" + (f", {self.runtime}" if self.runtime else ""))
        return lines

    def positive_label(self) -> str:
        task = self.task_object
        labels = self.labels
        if task.classes == 1:
            return labels[1] if len(labels) == 2 else "positive"
        index = task.positive_index
        return labels[index] if index < len(labels) else f"class {index}"

    def threshold(self) -> float:
        """The binary decision threshold on the positive score (0.5 when the task has none: argmax / sigmoid)."""
        value = self.task.get("threshold")
        return 0.5 if value is None else float(value)


def frame_predictions(predictions: Any) -> list:
    """A Prediction, a list of them (one per frame), or a MedgeError -> the list (empty for an error)."""
    if predictions is None or isinstance(predictions, BaseException):
        return []
    if isinstance(predictions, (list, tuple)):
        return [p for p in predictions if not isinstance(p, BaseException)]
    return [predictions]


def read_source(source: Any) -> Any:
    """A pydicom Dataset from a Dataset, path, bytes or file object (pydicom kept quiet).

    Raises:
        DicomError: the source cannot be parsed.
    """
    import io

    import pydicom
    from pydicom.dataset import Dataset

    from .._pydicom_quiet import quiet_pydicom

    if isinstance(source, Dataset):
        return source
    with quiet_pydicom("reading a source image for results"):
        try:
            # force: the caller predicted this source already, so it is DICOM; a bare data set (no File Meta,
            # which medge run reads with force=True too) must not fail here.
            if isinstance(source, (bytes, bytearray, memoryview)):
                return pydicom.dcmread(io.BytesIO(bytes(source)), force=True)
            return pydicom.dcmread(source, force=True)
        except Exception as exc:  # noqa: BLE001
            raise DicomError(f"a source image cannot be read again for its results ({type(exc).__name__})") from None


def patient_orientation(header: Any) -> Optional[tuple[str, str]]:
    """Single-letter (row, column) directions for a derived image: from Patient Orientation, else from
    Image Orientation (Patient) (the dominant axis of each direction cosine); None when neither is usable."""
    value = header.get("PatientOrientation")
    if value is not None and len(value) == 2:
        first, second = (str(v)[:1] for v in value)
        if first in "APRLHF" and second in "APRLHF" and first and second:
            return first, second
    iop = header.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        try:
            cosines = [float(v) for v in iop]
        except (TypeError, ValueError):
            return None
        letters = []
        for vector in (cosines[:3], cosines[3:]):
            axis = max(range(3), key=lambda i: abs(vector[i]))
            if abs(vector[axis]) < 1e-6:
                return None
            # DICOM patient axes: +x towards the patient's left, +y posterior, +z head.
            pair = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
            letters.append(pair[0] if vector[axis] > 0 else pair[1])
        return letters[0], letters[1]
    return None


def group_key(header: Any) -> tuple[str, str]:
    """(Study Instance UID, Series Instance UID): results are grouped per source series."""
    return str(header.get("StudyInstanceUID", "")), str(header.get("SeriesInstanceUID", ""))


def sop_uids(headers: Sequence[Any]) -> list[str]:
    return [str(h.SOPInstanceUID) for h in headers]
