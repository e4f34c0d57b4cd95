"""``medge inspect BUNDLE``: what a bundle holds, and optionally whether it is intact and trusted.

Prints :func:`medge.bundle.describe` (or, with ``--json``, the manifest and
signature status as one JSON document). ``--verify`` hashes every file and
refuses unlisted ones; ``--trusted-key PUBLIC.pem`` also checks the signature
and implies ``--verify``. A failed check raises BundleError / SignatureError,
which the ``medge`` entry point prints without a traceback (exit status 2).
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``inspect`` on the ``medge`` command's subparsers; returns the new parser."""
    parser = subparsers.add_parser(
        "inspect",
        help="describe a .medge bundle (model, preprocessing, accuracy, engines, files); --verify checks it",
        description="Describe a medge bundle: model, inputs and outputs, preprocessing, labels, precision "
                    "graphs, calibration, accuracy per precision and batch size, engines, signature and "
                    "files. --verify recomputes every file's SHA-256; --trusted-key also checks the "
                    "Ed25519 signature against that public key.",
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle directory (NAME.medge)")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file against the manifest and refuse unlisted files")
    parser.add_argument("--trusted-key", metavar="PEM",
                        help="Ed25519 public key (PEM) the bundle must be signed with; implies --verify")
    parser.add_argument("--json", action="store_true",
                        help="print {bundle, manifest_sha256, manifest, signature[, verification]} as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``medge inspect``. Returns 0; verification failures raise BundleError (exit 2 via main)."""
    from ..bundle import Bundle, describe, describe_json

    bundle = Bundle.open(args.bundle)
    check = bool(args.verify or args.trusted_key)
    if args.json:
        # Verify first: on failure nothing half-true reaches stdout.
        verification = bundle.verify(trusted_key=args.trusted_key) if check else None
        print(json.dumps(describe_json(bundle, verification), indent=2, sort_keys=True, ensure_ascii=False))
        return 0
    # Describe first: when verification fails, what was printed helps to see why.
    print(describe(bundle), flush=True)
    if check:
        print(f"Verify    {bundle.verify(trusted_key=args.trusted_key)}")
    return 0
