"""``medge export-triton BUNDLE -o REPO``: the bundle as a Triton Inference Server model repository.

The bundle is verified (every hash; the signature with ``--trusted-key``)
before anything is written, and the repository appears whole or not at all.
Precisions whose accuracy gates failed (or were never measured) at conversion
are left out, or refused when named with ``--precision``, unless
``--allow-failed-gates``. What the repository holds, and how to run it, is in
its README.md; the layout is described in :mod:`medge.serve.triton`.

Exit status 0 on success; 2 for a user error (a bundle that does not verify,
an unknown or refused precision, an existing repository), printed in one line.
"""

from __future__ import annotations

import argparse

_DESCRIPTION = """\
Write a Triton Inference Server model repository that serves the bundle: per
precision, the network as an onnxruntime model (and, for TensorRT engines
made with full TensorRT, a tensorrt_plan model with a plan per compute
capability), medge's own runtime as a python-backend model, medge's DICOM
preprocessing as a python-backend model (enforcing the bundle's validated
envelope), and ensembles taking DICOM bytes and returning SCORES, LABEL and
the network's outputs. The bundle is verified first; the repository gets a
copy of the manifest, the SHA-256 of every file it holds, and a README on
running it in the NGC container or where only the python backend exists.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export-triton`` on the ``medge`` command's subparsers; returns the new parser."""
    parser = subparsers.add_parser(
        "export-triton", help="write a Triton Inference Server model repository serving a bundle",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory (NAME.medge)")
    parser.add_argument("-o", "--output", required=True, metavar="REPO",
                        help="the model repository folder to create (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--precision", nargs="+", metavar="GRAPH",
                        choices=["fp32", "fp16", "int8", "int8-ort"],
                        help="graphs to export: fp32, fp16, int8 (TensorRT's Q/DQ placement), int8-ort (ONNX "
                             "Runtime's) (default: every graph that passed its accuracy gates)")
    parser.add_argument("--kind", default="cpu", choices=["cpu", "gpu"],
                        help="instance kind of the preprocessing and network models; gpu also routes the "
                             "ensembles through the TensorRT plans where the bundle has them (default: cpu)")
    parser.add_argument("--trusted-key", metavar="PEM",
                        help="Ed25519 public key (PEM) the bundle must be signed with")
    parser.add_argument("--allow-failed-gates", action="store_true",
                        help="with --precision: export graphs that failed (or never ran) their accuracy gates")
    parser.add_argument("--instances", type=int, default=1, metavar="N",
                        help="instances of each model (instance_group count) (default: 1)")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, metavar="US",
                        help="dynamic batching: how long a request may wait for batch-mates, in microseconds "
                             "(default: 2000)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads of each instance's preprocessing and ONNX Runtime (default: 0, all cores)")
    parser.add_argument("--name", metavar="NAME",
                        help="model name prefix: letters, digits and '_' (default: the bundle's model name)")
    parser.add_argument("--execution-env", metavar="PATH",
                        help="record a packed Python environment as EXECUTION_ENV_PATH in every python-backend "
                             "model, e.g. '$$TRITON_MODEL_DIRECTORY/../medge_env.tar.gz'")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a repository that medge export-triton wrote before")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``medge export-triton``. Returns 0; user errors raise MedgeError (exit 2 via main)."""
    from ..serve.triton import export_triton

    result = export_triton(args.bundle, args.output, precisions=args.precision, kind=args.kind,
                           trusted_key=args.trusted_key, allow_failed_gates=args.allow_failed_gates,
                           instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                           threads=args.threads, name=args.name, execution_env=args.execution_env,
                           overwrite=args.overwrite, log=lambda line: print(f"  {line}"))
    print(f"wrote {result.repository} ({len(result.models)} models, {len(result.files)} files hashed in "
          f"medge_export.json)")
    for graph, name in result.ensembles.items():
        print(f"  {graph:9s} ensemble {name}  (needs Triton's onnxruntime/tensorrt backends); "
              f"python backend only: {result.medge_ensembles[graph]}")
    print(f"how to run it: {result.repository / 'README.md'}")
    return 0
