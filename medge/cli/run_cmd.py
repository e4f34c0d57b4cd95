"""``medge run BUNDLE INPUTS...``: predictions for DICOM files and folders, one line per image.

What is read (rules in :mod:`medge._inputs`): files named on the command
line are always tried; folders are searched recursively and every regular
file that is DICOM by its content is read, whatever its name (UID-named
exports included). Every file left out is listed on stderr with the reason
and counted in the final summary line.

Rows are keyed by SOP Instance UID and name the file by its path relative to
the input folder it came from (a file named on the command line: as given);
never by patient identifiers.

Everything that can be refused without the model is refused before the
bundle is loaded: ``--device``, ``--out`` (suffix, folder, permissions),
``--batch``, missing inputs, and inputs without any DICOM file.

Segmentation bundles (``medge-convert --task segmentation``): the DICOM
files are grouped into series (Series Instance UID); each series is read
with ``read_series`` (a gapped or otherwise irregular series is refused, and
skipped), segmented, and gives one JSON line (series UID, grid, per-label
volumes in mL, precision, timings) and with ``--out-dicom`` one DICOM
Segmentation. A failed series counts as a failed file below.

Exit status:

- 0: every DICOM file found was predicted. Files skipped as not DICOM (or a
  DICOMDIR, a hidden or symlinked folder, not a regular file) do not change
  it: export folders normally hold such files, and they are listed.
- 1: a file failed to predict (damaged, unsupported), or a file or folder
  could not be read (permission denied, broken symlink): images may have
  been missed. The other files are still predicted.
- 2: a user error (bad flag, unwritable ``--out``, a bundle that does not
  verify, no DICOM file at all), printed in one line; nothing was predicted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Union

from ..errors import MedgeError
from .._inputs import collect_inputs

OUT_SUFFIXES = (".jsonl", ".csv")
#: Threads reading the next chunk of files while the model runs the current one.
READERS = 2

_DESCRIPTION = """\
Load a bundle (verified first) and predict DICOM files and folders: one line
per image (per frame) with SOP Instance UID, file, frame, label and scores.

Inputs: files named here are always tried. Folders are searched recursively
and every regular file that is DICOM by its content is read, whatever its
name (UID-named files included): 'DICM' at byte 128, or a bare data set
header. Files named *.dcm, *.dicom or *.ima are tried even when they are not
DICOM by content (they are probably damaged). Skipped, and listed on stderr
with the reason: files that are not DICOM, a DICOMDIR, hidden folders,
symlinks to folders (not followed), anything that is not a regular file, and
unreadable files or folders.

Rows name each file by its path relative to the folder it was found in
(files named here: as given).

Segmentation bundles: the files are grouped into series, one JSON line and
(with --out-dicom) one DICOM Segmentation per series; a series that cannot
be read (e.g. missing slices) is reported and skipped.

Exit status: 0 when every DICOM file found was predicted (skipped non-DICOM
files do not count); 1 when a file failed, or a file or folder could not be
read; 2 for user errors (printed in one line, nothing predicted)."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``run`` on the ``medge`` command's subparsers; returns the new parser."""
    parser = subparsers.add_parser(
        "run", help="predict DICOM files or folders with a bundle",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="NAME.medge bundle")
    parser.add_argument("inputs", nargs="+", help="DICOM files or folders (folders are searched recursively)")
    parser.add_argument("--out", metavar="FILE",
                        help="results file, .jsonl or .csv; checked before the model loads, written as results "
                             "arrive (default: JSON lines on stdout)")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "tensorrt_rtx"],
                        help="inference backend (default: auto, the fastest usable here; medge inspect lists "
                             "what the bundle holds)")
    parser.add_argument("--device", default="0",
                        help="cpu, cuda, cuda:N or a CUDA device index N (default: 0; without a usable GPU, "
                             "--backend auto runs on the CPU)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"],
                        help="graph or engine precision to run (default: the fastest the bundle has for the "
                             "backend; the first line on stderr says what runs)")
    parser.add_argument("--out-dicom", metavar="DIR",
                        help="also write DICOM results to DIR: a Comprehensive SR (TID 1500) per source series, "
                             "and for --explain bundles heatmap overlays (Secondary Capture and PNG); for "
                             "segmentation bundles one DICOM Segmentation per series; needs "
                             'pip install "medge[dicom-out]"')
    parser.add_argument("--allow-failed-gates", action="store_true",
                        help="with --precision: run it even though it failed (or never ran) its accuracy gates "
                             "at conversion (a warning is logged)")
    parser.add_argument("--envelope", default="enforce", choices=["enforce", "warn", "off"],
                        help="images outside what the model was validated on (modality, photometric, bits, "
                             "size, spacing, body part): enforce refuses them (default), warn predicts them "
                             "flagged in a 'warnings' field, off does not check")
    parser.add_argument("--batch", type=int, default=0,
                        help="images per batch (default: the bundle's max); segmentation: windows per backend "
                             "call (default: the bundle's sliding-window batch)")
    parser.add_argument("--trusted-key", metavar="PEM", help="Ed25519 public key the bundle must be signed with")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=run)
    return parser


def parse_device(text: str) -> Union[int, str]:
    """``"cpu"`` -> "cpu"; ``"cuda"`` -> 0; ``"cuda:N"`` or ``"N"`` -> N. Raises MedgeError otherwise."""
    value = text.strip().lower()
    if value == "cpu":
        return "cpu"
    if value == "cuda":
        return 0
    index = value[len("cuda:"):] if value.startswith("cuda:") else value
    if index.isascii() and index.isdigit():
        return int(index)
    raise MedgeError(f"--device must be cpu, cuda, cuda:N or a CUDA device index N, got {text!r}")


def check_out(out: Optional[str]) -> Optional[Path]:
    """Refuse a results file that cannot be written, before anything slow happens. Returns its Path."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise MedgeError(f"--out {out}: the results file must end in .jsonl or .csv")
    if path.is_dir():
        raise MedgeError(f"--out {out} is a folder; give a .jsonl or .csv file")
    parent = path.parent
    if not parent.is_dir():
        raise MedgeError(f"--out {out}: the folder {parent} does not exist")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise MedgeError(f"--out {out}: the file exists and is not writable (permission denied)")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise MedgeError(f"--out {out}: cannot create files in {parent} (permission denied)")
    return path


def run(args) -> int:
    """Run ``medge run``; returns the exit status described in this module's docstring."""
    from .._progress import Progress
    from ..runtime.model import load

    device = parse_device(args.device)
    out = check_out(args.out)
    if args.batch < 0:
        raise MedgeError("--batch must be a positive number of images (0: the bundle's max)")
    found = collect_inputs(args.inputs)
    for skipped in found.skipped:
        print(f"medge run: skipped {skipped.name}: {skipped.reason}", file=sys.stderr)
    if not found.files:
        listed = f" ({found.summary()}, listed above)" if found.skipped else ""
        raise MedgeError(f"no DICOM files found in the given inputs{listed}")
    files = found.files
    segmenting = _task_kind(args.bundle) == "segmentation"
    if segmenting and out is not None and out.suffix.lower() != ".jsonl":
        raise MedgeError(f"--out {args.out}: a segmentation bundle writes one JSON line per series (per-class "
                         "volumes): give a .jsonl file")
    if args.out_dicom:
        if segmenting:
            from ..seg_out import _import_highdicom

            _import_highdicom()  # a missing highdicom is said before the model loads
        else:
            from ..dicom_out import ensure_available

            ensure_available()  # a missing highdicom is said before the model loads
    results_for_dicom: list = []
    if segmenting:
        return _run_segmentation(args, device, out, found)

    with load(args.bundle, backend=args.backend, device=device, precision=args.precision,
              trusted_key=args.trusted_key, allow_failed_gates=args.allow_failed_gates,
              envelope=args.envelope) as model:
        print(f"medge run: {model.backend}", file=sys.stderr)
        batch = args.batch or model.max_batch
        if not 1 <= batch <= model.max_batch:
            raise MedgeError(f"--batch must be within 1..{model.max_batch} for this bundle")
        # One score column per output: a single sigmoid output scores its positive (second) label.
        classes = getattr(model.task, "classes", len(model.labels))
        sink = _Sink(out, model.labels if len(model.labels) == classes else model.labels[-1:])
        failures = 0
        chunks = [files[start : start + batch] for start in range(0, len(files), batch)]
        # Reading overlaps with inference: the next chunk's files are read (in READERS threads,
        # mostly outside the GIL) while the model preprocesses and runs this one.
        readers = concurrent.futures.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="medge-run-reader")
        try:
            with Progress("predicting", len(files), enabled=args.progress) as bar:
                reads = [readers.submit(_read, file) for file in chunks[0]]
                for index, chunk in enumerate(chunks):
                    current = reads
                    following = chunks[index + 1] if index + 1 < len(chunks) else []
                    reads = [readers.submit(_read, file) for file in following]
                    for file, entry in zip(chunk, _predict_each(model, [read.result() for read in current])):
                        if isinstance(entry, MedgeError):
                            failures += 1
                            print(f"medge run: skipped {file.name} (failed): {entry}", file=sys.stderr)
                            continue
                        for prediction in entry:
                            sink.write(file.name, prediction)
                        if args.out_dicom:
                            results_for_dicom.append((file.path, entry))
                    bar.update(len(chunk))
            if args.out_dicom:
                from ..dicom_out import write_results

                written = write_results(args.out_dicom, results_for_dicom, model)
                print(f"medge run: {len(written)} DICOM result file(s) in {args.out_dicom}", file=sys.stderr)
        finally:
            readers.shutdown(wait=True, cancel_futures=True)
            sink.close()
    summary = f"medge run: {len(files) - failures} of {len(files)} files predicted"
    summary += f", {failures} failed" if failures else ""
    summary += f"; {found.summary()}" if found.skipped else ""
    print(summary, file=sys.stderr)
    return 1 if failures or found.unreadable else 0


def _task_kind(bundle: str) -> str:
    """The bundle's task kind from its manifest (opening checks its schema; load verifies it later)."""
    from ..bundle import Bundle

    task = Bundle.open(bundle).manifest.get("task")
    return task.get("kind", "") if isinstance(task, dict) else ""


def _run_segmentation(args, device, out: Optional[Path], found) -> int:
    """Segmentation bundles: the inputs grouped into series, one Segmentation (and SEG) per series.

    A series that cannot be read (gapped, damaged, outside the envelope) is
    reported and skipped; the others go on. One JSON line per series: its
    Series Instance UID, grid, per-label volumes in mL, precision, backend,
    timings, and the SEG file written; never a patient value.
    """
    from .._progress import Progress
    from ..runtime.model import load
    from ..series import group_series, read_series

    files = found.files
    groups, unreadable = group_series([file.path for file in files])
    failures = 0
    for index, reason in unreadable:
        failures += 1
        print(f"medge run: skipped {files[index].name} (failed): {reason}", file=sys.stderr)
    done = 0
    with load(args.bundle, backend=args.backend, device=device, precision=args.precision,
              trusted_key=args.trusted_key, allow_failed_gates=args.allow_failed_gates,
              envelope=args.envelope) as model:
        print(f"medge run: {model.backend}", file=sys.stderr)
        if args.batch and not 1 <= args.batch <= model.max_batch:
            raise MedgeError(f"--batch must be within 1..{model.max_batch} for this bundle")
        try:
            stream = open(out, "w") if out is not None else sys.stdout
        except OSError as exc:
            raise MedgeError(f"cannot write --out {out}: {exc.strerror}") from exc
        try:
            with Progress("segmenting series", len(groups), enabled=args.progress) as bar:
                for uid, sources in sorted(groups.items()):
                    bar.update()
                    try:
                        started = time.perf_counter()
                        volume = read_series(sources)
                        read_ms = (time.perf_counter() - started) * 1e3
                        result = model.segment(volume, batch_size=args.batch or None)
                        record = {"series_instance_uid": uid, "files": len(sources), **result.to_dict()}
                        record["timings_ms"]["read"] = round(read_ms, 3)  # segment() was given the Volume
                        if args.out_dicom:
                            written = model.write_segmentation(volume, result, args.out_dicom)
                            record["seg_file"] = Path(written.filename).name
                    except MedgeError as exc:
                        failures += 1
                        print(f"medge run: series {uid} skipped (failed): {exc}", file=sys.stderr)
                        continue
                    done += 1
                    stream.write(json.dumps(record) + "\n")
                    stream.flush()
        finally:
            if out is not None:
                stream.close()
    summary = f"medge run: {done} of {len(groups)} series segmented"
    summary += f", {failures} failed" if failures else ""
    if args.out_dicom:
        summary += f"; {done} DICOM Segmentation(s) in {args.out_dicom}"
    summary += f"; {found.summary()}" if found.skipped else ""
    print(summary, file=sys.stderr)
    return 1 if failures or found.unreadable else 0


def _read(file):
    """The file's Image, or the MedgeError it failed with (bare data sets, without File Meta: force=True)."""
    from ..dicom import read_dicom

    try:
        return read_dicom(file.path, force=file.bare)
    except MedgeError as exc:
        return exc


def _predict_each(model, items) -> list:
    """Per item (an Image or the MedgeError its read failed with): its Predictions or its MedgeError."""
    ready = [item for item in items if not isinstance(item, MedgeError)]
    results = iter(model.predict_each(ready, return_exceptions=True))
    return [item if isinstance(item, MedgeError) else next(results) for item in items]


class _Sink:
    """JSON lines (stdout or .jsonl) or CSV, written as results arrive (a crash keeps what was done)."""

    def __init__(self, path: Optional[Path], labels) -> None:
        self.labels = list(labels)
        self.csv = None
        if path is None:
            self.stream, self.owned = sys.stdout, False
        else:
            try:
                self.stream, self.owned = open(path, "w", newline=""), True
            except OSError as exc:
                raise MedgeError(f"cannot write --out {path}: {exc.strerror}") from exc
            if path.suffix.lower() == ".csv":
                self.csv = csv.writer(self.stream)
                self.csv.writerow(["sop_instance_uid", "file", "frame", "label"]
                                  + [f"score_{name}" for name in self.labels or ["0"]] + ["warnings"])

    def write(self, name: str, prediction) -> None:
        if self.csv is not None:
            self.csv.writerow([prediction.sop_instance_uid or "", name, prediction.frame, prediction.label or ""]
                              + [f"{float(s):.6g}" for s in prediction.scores] + [" | ".join(prediction.warnings)])
        else:
            record = {"sop_instance_uid": prediction.sop_instance_uid, "file": name, "frame": prediction.frame,
                      "label": prediction.label, "scores": [round(float(s), 6) for s in prediction.scores]}
            if prediction.warnings:
                record["warnings"] = list(prediction.warnings)
            self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.owned:
            self.stream.close()
