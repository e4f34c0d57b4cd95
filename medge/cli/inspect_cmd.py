"""``medge inspect BUNDLE``: what a bundle holds, and optionally whether it is intact and trusted.

Prints :func:`medge.bundle.describe` (or, with ``--json``, the manifest and
signature status as one JSON document). ``--verify`` hashes every file and
refuses unlisted ones; ``--trusted-key PUBLIC.pem`` also checks the signature
and implies ``--verify``. ``--self-test`` runs the bundle's check vectors on
every graph here (exit status 1 when one the runtime would choose fails). A failed check raises BundleError / SignatureError,
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
    parser.add_argument("--self-test", action="store_true",
                        help="also run the bundle's check vectors on every graph here (ONNX Runtime CPU, and "
                             "each engine precision on a GPU) against its FP32 outputs; implies --verify; exit "
                             "status 1 if a graph the runtime would choose by default fails")
    parser.add_argument("--json", action="store_true",
                        help="print {bundle, manifest_sha256, manifest, signature[, verification]} as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``medge inspect``. Returns 0; verification failures raise BundleError (exit 2 via main)."""
    from ..bundle import Bundle, describe, describe_json

    bundle = Bundle.open(args.bundle)
    check = bool(args.verify or args.trusted_key or args.self_test)
    if args.json:
        # Verify first: on failure nothing half-true reaches stdout.
        verification = bundle.verify(trusted_key=args.trusted_key) if check else None
        document = describe_json(bundle, verification)
        if args.self_test:
            document["self_test"] = _self_test(bundle, args)
        print(json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False))
        return _self_test_status(document.get("self_test"))
    # Describe first: when verification fails, what was printed helps to see why.
    print(describe(bundle), flush=True)
    if check:
        print(f"Verify    {bundle.verify(trusted_key=args.trusted_key)}")
    if not args.self_test:
        return 0
    results = _self_test(bundle, args)
    print("Self-test (check vectors against FP32, on this machine)")
    for r in results:
        outcome = "passed" if r["passed"] else "FAILED: " + "; ".join(r["failures"])
        print(f"  {r['graph']:9s} {r['backend']:18s} gates {r['verdict']:13s} {outcome}")
    return _self_test_status(results)


def _self_test(bundle, args) -> list:
    from ..runtime.model import self_test

    return self_test(bundle.path, trusted_key=args.trusted_key)


def _self_test_status(results) -> int:
    """1 when a graph the runtime would choose by default fails its self-test here."""
    from ..tasks.base import DEFAULT_CHOICE_VERDICTS

    failed = [r for r in results or [] if not r["passed"] and r["verdict"] in DEFAULT_CHOICE_VERDICTS]
    return 1 if failed else 0
