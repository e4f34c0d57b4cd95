"""``medge run BUNDLE INPUTS...``: predictions for DICOM files and folders, one line per image.

Lines are keyed by SOP Instance UID (and the file name, which the caller
chose); never by patient identifiers. Unreadable files are reported and
skipped, the run goes on, and the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="predict DICOM files or folders with a bundle",
        description="Load a bundle (verified first), predict every DICOM file given (folders are searched "
                    "recursively), and write one line per image: SOP Instance UID, file, label, scores. "
                    "Unreadable files are reported and skipped; the exit status is 1 if any failed.")
    parser.add_argument("bundle", help="NAME.medge bundle")
    parser.add_argument("inputs", nargs="+", help="DICOM files or folders")
    parser.add_argument("--out", help="results file: .jsonl or .csv (default: JSON lines on stdout)")
    parser.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "tensorrt_rtx"])
    parser.add_argument("--device", default="0", help="CUDA device index, or cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"])
    parser.add_argument("--batch", type=int, default=0, help="images per batch (default: the bundle's max)")
    parser.add_argument("--trusted-key", metavar="PEM", help="Ed25519 public key the bundle must be signed with")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from .._progress import Progress
    from ..errors import MedgeError
    from ..runtime.model import load
    from .main import _collect_files

    files = _collect_files(args.inputs)
    device = "cpu" if args.device == "cpu" else int(args.device)
    with load(args.bundle, backend=args.backend, device=device, precision=args.precision,
              trusted_key=args.trusted_key) as model:
        print(f"medge run: {model.backend}", file=sys.stderr)
        batch = args.batch or model.max_batch
        if not 1 <= batch <= model.max_batch:
            raise MedgeError(f"--batch must be within 1..{model.max_batch} for this bundle")
        sink = _Sink(args.out, model.labels)
        failures = 0
        try:
            with Progress("predicting", len(files), enabled=args.progress) as bar:
                for start in range(0, len(files), batch):
                    chunk = files[start : start + batch]
                    for path, entry in zip(chunk, model.predict_each(chunk, return_exceptions=True)):
                        if isinstance(entry, MedgeError):
                            failures += 1
                            print(f"medge run: skipped {path.name}: {entry}", file=sys.stderr)
                            continue
                        for prediction in entry:
                            sink.write(path, prediction)
                    bar.update(len(chunk))
        finally:
            sink.close()
    print(f"medge run: {len(files) - failures} of {len(files)} files predicted"
          + (f", {failures} failed" if failures else ""), file=sys.stderr)
    return 1 if failures else 0


class _Sink:
    """JSON lines (stdout or .jsonl) or CSV, written as results arrive (a crash keeps what was done)."""

    def __init__(self, path, labels) -> None:
        self.labels = list(labels)
        self.csv = None
        if path is None:
            self.stream, self.owned = sys.stdout, False
        else:
            self.stream, self.owned = open(path, "w", newline=""), True
            if str(path).endswith(".csv"):
                self.csv = csv.writer(self.stream)
                self.csv.writerow(["sop_instance_uid", "file", "frame", "label"]
                                  + [f"score_{name}" for name in self.labels or ["0"]])

    def write(self, path: Path, prediction) -> None:
        if self.csv is not None:
            self.csv.writerow([prediction.sop_instance_uid or "", path.name, prediction.frame, prediction.label or ""]
                              + [f"{float(s):.6g}" for s in prediction.scores])
        else:
            record = {"sop_instance_uid": prediction.sop_instance_uid, "file": path.name, "frame": prediction.frame,
                      "label": prediction.label, "scores": [round(float(s), 6) for s in prediction.scores]}
            self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.owned:
            self.stream.close()
