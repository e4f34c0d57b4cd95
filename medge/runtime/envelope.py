"""The validated input envelope: what a model was calibrated and validated on, enforced per item.

Built at conversion from the calibration and validation headers, stored in
the manifest (``manifest["envelope"]``), and checked for every item the
runtime predicts. A CR radiograph sent to a CT model, a MONOCHROME1 image to
a model that only saw MONOCHROME2, a 12-bit image to a model validated on
16-bit data: each is refused with a message naming the mismatch, because the
model's answer there was never measured.

Recorded: modality, photometric interpretation, bits stored, the range of
rows and columns, the range of pixel spacing where the headers give it, and
body part examined where present. Values only, never identifiers: modality
and body part are recorded only as the standard's defined terms (see
``medge.dicom``), anything else as "non-standard".

Attributes an item does not carry are not held against it (Body Part
Examined and Pixel Spacing are optional in many IODs), except modality for
items read from DICOM: Modality is Type 1, and an item without it cannot be
shown to be inside the envelope. Arrays passed in code carry no acquisition
(``Image.acquisition`` is None): their caller vouches for what they are, and
only their pixel properties are checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from ..errors import BundleError, MedgeError, OutsideEnvelope
from ..image import Image

_LOG = logging.getLogger("medge.runtime")

#: What ``medge.load(envelope=...)`` accepts.
ENVELOPE_MODES = ("enforce", "warn", "off")
# Spacing read from different scanners of one protocol varies in its last digits; 1% is far below the
# spacing change that alters what a resampled input looks like.
_SPACING_SLACK = 0.01


@dataclass(frozen=True)
class Envelope:
    """What a model was validated on. Empty sets or None ranges mean "not recorded" (not checked).

    Attributes:
        modalities: Modality defined terms seen.
        photometric_interpretations: MONOCHROME1 / MONOCHROME2 seen.
        bits_stored: Bits Stored values seen.
        rows, columns: (min, max) frame size seen.
        pixel_spacing_mm: (min, max) over row and column spacing, where the headers gave it.
        body_parts: Body Part Examined defined terms seen, where present.
        images: how many images (or series, see ``unit``) it was built from.
        sources: which sets (calibration, validation) it was built from.
        unit: what ``images`` counts: "images", or "series" for segmentation bundles (one item per series).
    """

    modalities: frozenset = frozenset()
    photometric_interpretations: frozenset = frozenset()
    bits_stored: frozenset = frozenset()
    rows: Optional[tuple[int, int]] = None
    columns: Optional[tuple[int, int]] = None
    pixel_spacing_mm: Optional[tuple[float, float]] = None
    body_parts: frozenset = frozenset()
    images: int = 0
    sources: tuple = ()
    unit: str = "images"

    # ------------------------------------------------------------------ building

    @classmethod
    def observe(cls, images: Iterable[Image], sources: Iterable[str] = (), unit: str = "images"
                ) -> Optional["Envelope"]:
        """The envelope of ``images`` (None when there are none); ``unit`` names what one item is."""
        modalities, photometrics, bits, body_parts = set(), set(), set(), set()
        rows, columns, spacing = [], [], []
        count = 0
        for image in images:
            count += 1
            sem = image.semantics
            photometrics.add(sem.photometric_interpretation)
            bits.add(int(sem.bits_stored))
            rows.append(int(sem.rows))
            columns.append(int(sem.columns))
            acquisition = image.acquisition
            if acquisition is None:
                continue
            if acquisition.modality:
                modalities.add(acquisition.modality)
            if acquisition.body_part:
                body_parts.add(acquisition.body_part)
            if acquisition.pixel_spacing_mm:
                spacing.extend(acquisition.pixel_spacing_mm)
        if not count:
            return None
        return cls(frozenset(modalities), frozenset(photometrics), frozenset(bits), (min(rows), max(rows)),
                   (min(columns), max(columns)), (min(spacing), max(spacing)) if spacing else None,
                   frozenset(body_parts), count, tuple(sources), unit)

    def to_manifest(self) -> dict:
        return {"modalities": sorted(self.modalities),
                "photometric_interpretations": sorted(self.photometric_interpretations),
                "bits_stored": sorted(self.bits_stored),
                "rows": list(self.rows) if self.rows else None,
                "columns": list(self.columns) if self.columns else None,
                "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
                "body_parts": sorted(self.body_parts), "images": self.images, "sources": list(self.sources),
                "unit": self.unit}

    @classmethod
    def from_manifest(cls, entry: Any) -> Optional["Envelope"]:
        """The envelope a manifest records (None: the bundle records none).

        Raises:
            BundleError: a field of the wrong type.
        """
        if entry is None:
            return None
        if not isinstance(entry, Mapping):
            raise BundleError("the manifest's envelope must be an object or null")

        def strings(key: str) -> frozenset:
            value = entry.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BundleError(f"the manifest's envelope.{key} must be a list of strings")
            return frozenset(value)

        def pair(key: str, kind: type) -> Optional[tuple]:
            value = entry.get(key)
            if value is None:
                return None
            if (not isinstance(value, list) or len(value) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                    or value[0] > value[1]):
                raise BundleError(f"the manifest's envelope.{key} must be [min, max] or null")
            return (kind(value[0]), kind(value[1]))

        bits = entry.get("bits_stored", [])
        if not isinstance(bits, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
            raise BundleError("the manifest's envelope.bits_stored must be a list of integers")
        images = entry.get("images", 0)
        if not isinstance(images, int) or isinstance(images, bool):
            raise BundleError("the manifest's envelope.images must be an integer")
        unit = entry.get("unit", "images")
        if unit not in ("images", "series"):
            raise BundleError("the manifest's envelope.unit must be 'images' or 'series'")
        return cls(strings("modalities"), strings("photometric_interpretations"), frozenset(bits),
                   pair("rows", int), pair("columns", int), pair("pixel_spacing_mm", float), strings("body_parts"),
                   images, tuple(strings("sources")), unit)

    # ------------------------------------------------------------------ checking

    def violations(self, image: Image) -> list[str]:
        """Each way ``image`` lies outside the envelope, in words (empty: inside)."""
        found = []
        sem = image.semantics
        if self.photometric_interpretations and sem.photometric_interpretation not in self.photometric_interpretations:
            found.append(f"photometric interpretation {sem.photometric_interpretation}; this model was validated "
                         f"on {_listed(self.photometric_interpretations)}")
        if self.bits_stored and sem.bits_stored not in self.bits_stored:
            found.append(f"bits stored {sem.bits_stored}; this model was validated on "
                         f"{_listed(str(b) for b in self.bits_stored)}")
        for name, value, bounds in (("rows", sem.rows, self.rows), ("columns", sem.columns, self.columns)):
            if bounds and not bounds[0] <= value <= bounds[1]:
                found.append(f"{value} {name}; this model was validated on {_range(bounds)} {name}")
        acquisition = image.acquisition
        if acquisition is None:
            return found
        if self.modalities:
            if acquisition.modality is None:
                found.append(f"no Modality in the header; this model was validated on {_listed(self.modalities)}")
            elif acquisition.modality not in self.modalities:
                found.append(f"modality {acquisition.modality}; this model was validated on "
                             f"{_listed(self.modalities)}")
        if self.body_parts and acquisition.body_part and acquisition.body_part not in self.body_parts:
            found.append(f"body part {acquisition.body_part}; this model was validated on {_listed(self.body_parts)}")
        if self.pixel_spacing_mm and acquisition.pixel_spacing_mm:
            low, high = self.pixel_spacing_mm
            outside = [s for s in acquisition.pixel_spacing_mm
                       if not low * (1 - _SPACING_SLACK) <= s <= high * (1 + _SPACING_SLACK)]
            if outside:
                found.append(f"pixel spacing {_mm(acquisition.pixel_spacing_mm)} mm; this model was validated on "
                             f"{_range(self.pixel_spacing_mm, _spacing_number)} mm")
        return found

    def describe(self) -> list[str]:
        """One line per recorded field (what ``medge inspect`` prints)."""
        lines = [f"modality {_listed(self.modalities) or 'not recorded'}",
                 f"photometric {_listed(self.photometric_interpretations) or 'not recorded'}",
                 f"bits stored {_listed(str(b) for b in self.bits_stored) or 'not recorded'}",
                 f"rows {_range(self.rows) if self.rows else 'not recorded'}, "
                 f"columns {_range(self.columns) if self.columns else 'not recorded'}",
                 f"pixel spacing {(_range(self.pixel_spacing_mm, _spacing_number) + ' mm') if self.pixel_spacing_mm else 'not recorded'}",
                 f"body part {_listed(self.body_parts) or 'not recorded'}"]
        return lines + [f"from {self.images} {self.unit} ({', '.join(self.sources) or 'unknown sets'})"]


class EnvelopeCheck:
    """Applies an envelope per item: "enforce" refuses, "warn" flags (and logs once per kind), "off" skips."""

    def __init__(self, envelope: Optional[Envelope], mode: str) -> None:
        if mode not in ENVELOPE_MODES:
            raise MedgeError(f"envelope must be one of {', '.join(ENVELOPE_MODES)}, got {mode!r}")
        self.envelope = envelope
        self.mode = mode
        self._warned: set = set()

    def __call__(self, image: Image) -> tuple[str, ...]:
        """The warnings to attach to this item's predictions; raises OutsideEnvelope when enforcing."""
        if self.envelope is None or self.mode == "off":
            return ()
        found = self.envelope.violations(image)
        if not found:
            return ()
        if self.mode == "enforce":
            raise OutsideEnvelope("input outside the model's validated envelope: " + "; ".join(found)
                                  + ' (medge.load(..., envelope="warn") to predict anyway, flagged)')
        for line in found:
            kind = line.split(";")[0]
            if kind not in self._warned:
                self._warned.add(kind)
                _LOG.warning("medge: input outside the validated envelope, predicted anyway (envelope='warn'): %s",
                             line)
        return tuple(f"outside the validated envelope: {line}" for line in found)


def _listed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _mm(values: Iterable[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def _range(bounds: tuple, number=str) -> str:
    low, high = number(bounds[0]), number(bounds[1])
    return low if low == high else f"{low}-{high}"


def _spacing_number(value: float) -> str:
    return f"{value:.4g}"
