"""Comprehensive SR (TID 1500 Measurement Report) with a classifier's findings, built with highdicom.

One SR per source series (or per part of one: medge serve writes a series'
SR when its sender is done with it). Its content tree::

    Imaging Measurement Report (TID 1500)
      observer context: device "medge", model "<bundle name> <version>", UID derived from the manifest hash
      procedure reported: "<modality> unspecified body region" (LOINC) or "Imaging procedure" (SNOMED)
      Imaging Measurements
        Measurement Group (TID 1501), one per source image (per frame of a multi-frame image)
          Tracking Identifier "<bundle name> image <n>" + Tracking UID
          Algorithm Identification (TID 4019): family Artificial Intelligence (DCM 123110), name,
              version, parameters = manifest SHA-256, decision rule, operating point (sensitivity /
              specificity and their 95% intervals), runtime
          Source image: the source SOP Instance (and frame)
          Finding (DCM 121071, TID 1501's finding type) = the predicted class, coded (label, 99MEDGE, label)
          Score of <class> (99MEDGE SCORE-k) = the model's score, unit "no units"
          Threshold Value (DCM 122411) = the decision threshold (binary tasks)
          Input within the validated envelope (99MEDGE ENVELOPE) = No, when the input was predicted
              outside it (``envelope="warn"``)

Class names are not standard codes, so they are coded in medge's private
scheme 99MEDGE with the label as meaning; findings that have a standard code
need a label map from the model's author (not in bundles yet).

Completion flag PARTIAL, verification UNVERIFIED, preliminary PRELIMINARY:
the result of an algorithm nobody has verified.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from ..errors import MedgeError
from ._common import (MANUFACTURER, SR_SERIES_NUMBER, Provenance, frame_predictions, group_key, import_highdicom,
                      result_uid)

__all__ = ["build_sr", "label_concept", "SCHEME", "SR_SOP_CLASS_UID", "sr_series_uid"]

#: Coding scheme designator of medge's private codes (99 prefix: local scheme, PS3.16 8.2).
SCHEME = "99MEDGE"
#: Comprehensive SR Storage.
SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.33"

_SAFE_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,16}$")
# Procedure reported per modality (LOINC "<modality> unspecified body region"); others: SNOMED "Imaging procedure".
_PROCEDURES = {"CT": "CTUnspecifiedBodyRegion", "MR": "MRIUnspecifiedBodyRegion", "PT": "PETUnspecifiedBodyRegion",
               "CR": "XRUnspecifiedBodyRegion", "DX": "XRUnspecifiedBodyRegion"}


def label_concept(label: Any, index: int) -> Any:
    """The coded concept of class ``index`` named ``label`` (scheme 99MEDGE)."""
    hd = import_highdicom("Writing DICOM results")
    meaning = str(label) if label else f"class {index}"
    value = meaning if _SAFE_CODE.match(meaning) else f"CLASS{index}"
    return hd.sr.CodedConcept(value=value, scheme_designator=SCHEME, meaning=meaning[:64])


def sr_series_uid(provenance: Provenance, header: Any) -> str:
    """The SR series for results of ``header``'s source series by this bundle (the same for every part)."""
    study, series = group_key(header)
    return result_uid("medge-sr-series", provenance.manifest_sha256, study, series)


def build_sr(results: Sequence[tuple[Any, Any]], provenance: Any, *, instance_number: int = 1) -> Any:
    """A Comprehensive SR with one measurement group per predicted image (frame).

    Args:
        results: (source header, predictions) per source image, all of one
            study (normally one series): the header is a pydicom Dataset (see
            ``reference_header``: the SR copies its patient and study
            attributes), the predictions a Prediction, a list of them (one per
            frame) or a MedgeError (skipped).
        provenance: a Provenance, medge.Model, Bundle or bundle path.
        instance_number: Instance Number of the SR within its series.

    Returns:
        The ``highdicom.sr.ComprehensiveSR`` (a pydicom Dataset). Its SOP
        Instance UID is derived from the bundle and the images it reports on,
        so writing it again gives the same UID.

    Raises:
        MedgeError: nothing to report, or sources from more than one study.
        MissingDependency: highdicom is not installed (``medge[dicom-out]``).
    """
    hd = import_highdicom("Writing DICOM Structured Reports")
    from pydicom.sr.codedict import codes

    from .._pydicom_quiet import quiet_pydicom

    provenance = Provenance.of(provenance)
    entries = [(header, frame_predictions(predictions)) for header, predictions in results]
    entries = [(header, predictions) for header, predictions in entries if predictions]
    if not entries:
        raise MedgeError("no prediction to report: every source failed")
    studies = {str(header.StudyInstanceUID) for header, _ in entries}
    if len(studies) != 1:
        raise MedgeError(f"one SR reports on one study; got images of {len(studies)} studies")
    task = provenance.task_object
    binary = bool(getattr(task, "binary", False))
    labels = provenance.labels
    with quiet_pydicom("writing a DICOM SR"):
        algorithm = hd.sr.AlgorithmIdentification(name=provenance.name[:64], version=provenance.version[:64],
                                                  parameters=provenance.parameters(),
                                                  family=codes.DCM.ArtificialIntelligence)
        no_units = codes.UCUM.NoUnits
        groups = []
        referenced = []
        for header, predictions in entries:
            frames = int(header.get("NumberOfFrames", 1) or 1)
            source = str(header.SOPInstanceUID)
            for prediction in predictions:
                frame = int(getattr(prediction, "frame", 0) or 0)
                referenced.append(f"{source}/{frame}")
                number = header.get("InstanceNumber")
                name = f"image {number}" if number not in (None, "") else f"image {len(groups) + 1}"
                if frames > 1:
                    name += f" frame {frame + 1}"
                tracking = hd.sr.TrackingIdentifier(
                    uid=result_uid("medge-tracking", provenance.manifest_sha256, source, frame),
                    identifier=f"{provenance.name} {name}"[:64])
                image = hd.sr.SourceImageForMeasurementGroup.from_source_image(
                    header, referenced_frame_numbers=[frame + 1] if frames > 1 else None)
                index = int(prediction.index)
                label = prediction.label if prediction.label else (labels[index] if index < len(labels) else None)
                evaluations = []
                if getattr(prediction, "warnings", ()):
                    evaluations.append(hd.sr.QualitativeEvaluation(
                        hd.sr.CodedConcept("ENVELOPE", SCHEME, "Input within the validated envelope"),
                        codes.SCT.No))
                measurements = _measurements(hd, codes, prediction, provenance, task, binary, no_units)
                groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking, finding_type=label_concept(label, index), algorithm_id=algorithm,
                    source_images=[image], qualitative_evaluations=evaluations or None,
                    measurements=measurements or None))
        first = entries[0][0]
        modality = str(first.get("Modality", "") or "")
        procedure = getattr(codes.LN, _PROCEDURES[modality]) if modality in _PROCEDURES else codes.SCT.ImagingProcedure
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("medge-device", provenance.manifest_sha256), name=MANUFACTURER,
            manufacturer_name=MANUFACTURER, model_name=f"{provenance.name} {provenance.version}"[:64])
        context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=procedure,
                                         imaging_measurements=groups)
        try:
            sr = hd.sr.ComprehensiveSR(
                evidence=[header for header, _ in entries], content=report[0],
                series_instance_uid=sr_series_uid(provenance, first), series_number=SR_SERIES_NUMBER,
                sop_instance_uid=result_uid("medge-sr", provenance.manifest_sha256, *sorted(referenced)),
                instance_number=int(instance_number), manufacturer=MANUFACTURER)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # highdicom's checks of the evidence (a SOP class it does not know, a malformed UID); its text can
            # quote header values, so only the kind is passed on.
            raise MedgeError(f"the SR could not be built from these sources ({type(exc).__name__} in highdicom)") \
                from None
        sr.SeriesDescription = f"medge {provenance.name} {provenance.version}"[:64]
    return sr


def _measurements(hd, codes, prediction, provenance: Provenance, task, binary: bool, no_units) -> list:
    scores = [float(s) for s in getattr(prediction, "scores", ())]
    labels = provenance.labels
    out = []
    if binary:
        k = 0 if task.classes == 1 else task.positive_index
        name, score = provenance.positive_label(), scores[k] if k < len(scores) else math.nan
    else:
        k = int(prediction.index)
        name = labels[k] if k < len(labels) else f"class {k}"
        score = scores[k] if k < len(scores) else math.nan
    if math.isfinite(score):
        out.append(hd.sr.Measurement(name=hd.sr.CodedConcept(f"SCORE-{k}", SCHEME, f"Score of {name}"[:64]),
                                     value=score, unit=no_units))
    if binary:
        out.append(hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=provenance.threshold(), unit=no_units))
    return out
