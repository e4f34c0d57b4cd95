"""``medge`` command line: ``demo``, ``preprocess``, ``inspect``, ``run``, ``keygen``.

``run`` and ``inspect`` live in their own modules. Which files a command
reads (folders searched by content, every skipped file listed) is decided in
``_inputs``, shared by ``preprocess`` and ``run``, so no command module
imports another.

User errors (MedgeError) are printed as one line without a traceback and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .._progress import Progress
from ..errors import MedgeError
from .._inputs import collect_inputs

def _spec_from_args(args):
    from ..preprocess import PreprocessSpec

    if args.spec:
        try:
            text = Path(args.spec).read_text()
        except OSError as exc:
            raise MedgeError(f"cannot read the spec file {args.spec}: {exc.strerror}") from exc
        return PreprocessSpec.from_json(text)
    kwargs = dict(height=args.size[0], width=args.size[1], channels=args.channels, fit=args.fit,
                  resample=args.resample, dtype=args.dtype)
    if args.window:
        kwargs.update(voi="window", window=tuple(args.window))
    elif args.range:
        kwargs.update(voi="range", value_range=tuple(args.range))
    return PreprocessSpec(**kwargs)


def _describe_image(image, spec) -> str:
    sem = image.semantics
    if spec.voi == "dicom" and sem.windows:
        window = sem.windows[min(spec.window_index, len(sem.windows) - 1)]
        voi = f"window {window.center:g}/{window.width:g} {sem.voi_function}"
    elif spec.voi == "window":
        voi = f"window {spec.window[0]:g}/{spec.window[1]:g} {spec.voi_function or 'LINEAR'}"
    else:
        voi = f"range {spec.value_range}"
    return (f"{sem.number_of_frames}x{sem.rows}x{sem.columns} {image.pixels.dtype} "
            f"(bits stored {sem.bits_stored}, {sem.photometric_interpretation}), "
            f"rescale {sem.rescale_slope:g}*x{sem.rescale_intercept:+g}, {voi}")


def _preprocess_files(files: list, spec, device: str, show_progress: bool):
    """Preprocess ``files`` (``_inputs.InputFile``s, or paths named by their file name) one by one."""
    from ..dicom import read_dicom
    from ..preprocess import preprocess

    outputs, rows, failures = [], [], 0
    progress = Progress("preprocessing", len(files), enabled=show_progress)
    for file in files:
        path, name, bare = (file, file.name, False) if isinstance(file, Path) else (file.path, file.name, file.bare)
        progress.update()
        try:
            started = time.perf_counter()
            image = read_dicom(path, force=bare)
            read_ms = (time.perf_counter() - started) * 1e3
            started = time.perf_counter()
            result = preprocess(image, spec, device=device)
            prep_ms = (time.perf_counter() - started) * 1e3
        except MedgeError as exc:  # report, skip, go on: one bad file must not stop a folder
            failures += 1
            rows.append(f"  {name}: FAILED: {exc}")
            continue
        array = result if isinstance(result, np.ndarray) else result.to_host()
        outputs.append(array)
        uid = image.sop_instance_uid or "(no SOP Instance UID)"
        rows.append(f"  {name}: {uid}\n      {_describe_image(image, spec)}\n"
                    f"      -> {tuple(array.shape)} {array.dtype} in [{float(array.min()):.3f}, "
                    f"{float(array.max()):.3f}], read {read_ms:.1f} ms, preprocess {prep_ms:.2f} ms")
    progress.close()
    return outputs, rows, failures


def cmd_demo(args) -> int:
    """Generate the built-in synthetic sample DICOMs, preprocess them, and say what was done."""
    from ..preprocess import PreprocessSpec, cuda_available
    from ..synthetic import write_samples

    directory = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="medge-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    files = write_samples(directory)
    print(f"wrote {len(files)} synthetic sample DICOM files to {directory}")
    # Each image's own first window: CT soft tissue for the CT slices, the CR's own for the radiograph.
    spec = PreprocessSpec(224, 224, voi="dicom", resample="bilinear_antialias", dtype="float16")
    device = "cuda" if (args.device == "auto" and cuda_available()) else ("cpu" if args.device == "auto" else args.device)
    print(f"preprocessing on {device} with spec {spec.to_json()}")
    outputs, rows, failures = _preprocess_files(sorted(files), spec, device, show_progress=False)
    print("\n".join(rows))
    total = sum(o.shape[0] for o in outputs)
    print(f"done: {total} frame(s) from {len(files) - failures} file(s) -> model input "
          f"{(total, *spec.output_shape_per_image)} {spec.dtype}; {failures} failed")
    return 1 if failures else 0


def cmd_preprocess(args) -> int:
    """Preprocess DICOM files/folders into one .npy batch."""
    spec = _spec_from_args(args)
    found = collect_inputs(args.inputs)
    for skipped in found.skipped:
        print(f"  {skipped.name}: skipped: {skipped.reason}")
    if not found.files:
        raise MedgeError("no DICOM files found in the given inputs"
                         + (f" ({found.summary()}, listed above)" if found.skipped else ""))
    files = found.files
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    outputs, rows, failures = _preprocess_files(files, spec, args.device, show or False)
    if args.verbose or failures:
        print("\n".join(rows))
    if outputs:
        batch = np.concatenate(outputs)
        out = Path(args.output)
        tmp = out.with_name(out.name + ".partial")
        with open(tmp, "wb") as f:  # write then rename: an interrupted run never leaves a truncated .npy
            np.save(f, batch)
        os.replace(tmp, out)
        print(f"wrote {tuple(batch.shape)} {batch.dtype} to {out} ({len(files) - failures} of {len(files)} files"
              + (f"; {found.summary()}" if found.skipped else "") + ")")
    return 1 if failures or found.unreadable else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medge",
        description="medge: fused DICOM preprocessing and edge deployment of medical-imaging networks.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"medge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to do; medge COMMAND --help says more")

    demo = sub.add_parser("demo", help="preprocess built-in synthetic sample DICOMs and report what was done")
    demo.add_argument("-o", "--output", help="folder for the sample DICOMs (default: a new temporary folder)")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                      help="where to preprocess (default: auto, cuda when a CUDA device is usable)")
    demo.set_defaults(func=cmd_demo)

    pre = sub.add_parser(
        "preprocess",
        help="preprocess DICOM files or folders into one .npy batch (N, C, H, W)",
        description="Read DICOM files, apply rescale, VOI, polarity, resampling and normalisation as the "
                    "model expects, and save the batch as .npy. The preprocessing is given by --spec "
                    "(a PreprocessSpec JSON file, as stored in bundles) or by the flags below. Folders are read as "
                    "by medge run (files taken by their DICOM content; skipped ones listed). Exit status 1 when "
                    "a file failed or could not be read.",
    )
    pre.add_argument("inputs", nargs="+",
                     help="DICOM files or folders (searched recursively; files are taken by their content, "
                          "and skipped ones are listed)")
    pre.add_argument("-o", "--output", required=True, help="output .npy file")
    pre.add_argument("--spec", help="PreprocessSpec JSON file (overrides the flags below)")
    pre.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"),
                     help="model input height and width (default: 224 224)")
    pre.add_argument("--channels", type=int, default=1, choices=[1, 3],
                     help="1, or 3 with the grey value replicated (default: 1)")
    group = pre.add_mutually_exclusive_group()
    group.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                       help="fixed window for every image (default: each image's own first window)")
    group.add_argument("--range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="fixed modality-value range mapped to [0, 1] instead of a window")
    pre.add_argument("--fit", default="stretch", choices=["stretch", "letterbox"],
                     help="stretch to the size, or letterbox (keep the aspect ratio, pad) (default: stretch)")
    pre.add_argument("--resample", default="bilinear_antialias", choices=["bilinear", "bilinear_antialias"],
                     help="bilinear, or bilinear_antialias as torchvision antialias=True (default)")
    pre.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                     help="output dtype (default: float32)")
    pre.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    pre.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr (default: when stderr is a terminal)")
    pre.add_argument("-v", "--verbose", action="store_true", help="one line per file")
    pre.set_defaults(func=cmd_preprocess)

    from . import inspect_cmd

    inspect_cmd.add_parser(sub)

    from . import run_cmd

    run_cmd.add_parser(sub)

    from . import export_triton

    export_triton.add_parser(sub)

    from . import serve_cmd

    serve_cmd.add_parser(sub)

    keygen = sub.add_parser(
        "keygen", help="create an Ed25519 key pair for signing bundles (medge-convert --sign-key)",
        description="Create an Ed25519 key pair: the private key (PEM, mode 0600) signs bundles with "
                    "medge-convert --sign-key; the public key is what deployments trust "
                    "(medge inspect --trusted-key, medge.load(trusted_key=...)). Existing files are never overwritten.")
    keygen.add_argument("private_key", help="where to write the private key (PEM)")
    keygen.add_argument("public_key", help="where to write the public key (PEM)")
    keygen.set_defaults(func=cmd_keygen)
    return parser


def cmd_keygen(args) -> int:
    from ..bundle import generate_signing_key

    fingerprint = generate_signing_key(args.private_key, args.public_key)
    print(f"wrote {args.private_key} (keep it secret) and {args.public_key}; public key SHA-256 {fingerprint}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._run import run_command

    args = build_parser().parse_args(argv)
    return run_command("medge", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
