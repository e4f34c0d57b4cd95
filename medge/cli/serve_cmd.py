"""``medge serve BUNDLE``: run a bundle as a DICOM node (``medge.serve.dicom_node``).

Everything that can be refused before the model loads is refused first
(``--forward``, TLS files, the AE title, the spool folder); the node then runs
in the foreground until SIGTERM or Ctrl-C, drains (every accepted instance is
predicted and its result written to the outbox, and delivered for up to
``--drain-timeout`` seconds) and exits 0. Undelivered results stay in the
spool's outbox and are sent first at the next start.

Exit status: 0 after a clean stop; 2 for user errors (printed in one line).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..errors import MedgeError

_DESCRIPTION = """\
Run a bundle as a DICOM node: C-ECHO, and a C-STORE SCP that accepts the
storage SOP classes of the modalities the bundle was validated on. Every
accepted image is predicted (dynamic batching across associations); each
series gets a Comprehensive SR (TID 1500: finding, score, threshold, the
bundle's name, version and manifest SHA-256), heatmaps become Secondary
Capture overlays, and results are sent by C-STORE to --forward, through an
on-disk outbox with retries (nothing is lost while the destination is down).

A segmentation bundle (medge-convert --task segmentation) answers series,
not images: accepted instances are spooled per series under --spool, and
each complete series (its associations closed, or --series-idle) is read as
a volume (a series with missing, duplicated or unevenly spaced slices gets
no result and is counted failed), segmented, and sent on as one DICOM SEG.
--sr-max-instances does not apply to it (a SEG needs the whole series).

Per-instance C-STORE statuses: 0x0000 accepted; 0xA700 busy or shutting down
(send again later); 0xA900 SOP class differs from the presentation context;
0xC210 unreadable (damaged, truncated, undecodable); 0xC211 outside the
bundle's validated envelope. Error Comment says why.

Logs never carry patient attributes. SIGTERM or Ctrl-C: stop gracefully."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` on the ``medge`` command's subparsers; returns the new parser."""
    parser = subparsers.add_parser(
        "serve", help="run a bundle as a DICOM node (C-STORE in; SR and overlays, or one SEG per series, out to "
                      "--forward)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="NAME.medge bundle")
    parser.add_argument("--ae-title", default="MEDGE", help="the node's AE title (default: MEDGE)")
    parser.add_argument("--port", type=int, default=11112, help="DICOM port to listen on (default: 11112)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every "
                             "interface, i.e. to receive from scanners and PACS)")
    parser.add_argument("--forward", metavar="HOST:PORT:AE",
                        help="where results are sent by C-STORE (default: none; results are written to "
                             "SPOOL/results)")
    parser.add_argument("--spool", default="medge-spool",
                        help="folder of the result outbox (and, for segmentation bundles, of the series being "
                             "received), kept across restarts (default: ./medge-spool)")
    tls = parser.add_argument_group("TLS (transport encryption of patient data)")
    tls.add_argument("--tls-cert", metavar="PEM", help="the node's certificate (PEM); with --tls-key makes the "
                                                       "port TLS-only")
    tls.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert (PEM)")
    tls.add_argument("--tls-client-ca", metavar="PEM",
                     help="require senders to present a certificate signed by this CA (mutual TLS)")
    tls.add_argument("--forward-tls-ca", metavar="PEM",
                     help="connect to --forward over TLS, trusting this CA (the destination's certificate must "
                          "name its host)")
    tls.add_argument("--forward-tls-cert", metavar="PEM", help="client certificate for --forward (PEM)")
    tls.add_argument("--forward-tls-key", metavar="PEM", help="the key of --forward-tls-cert (PEM)")
    ops = parser.add_argument_group("operation")
    ops.add_argument("--metrics-port", type=int, default=9464,
                     help="Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: 9464; 0: off)")
    ops.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint "
                                                                 "(default: 127.0.0.1)")
    ops.add_argument("--max-delay-ms", type=float, default=5.0,
                     help="how long an image waits for batch-mates (default: 5)")
    ops.add_argument("--series-idle", type=float, default=5.0, metavar="S",
                     help="write a series' SR (segment it, for a segmentation bundle) once none of its images "
                          "arrived for S seconds, even if its association is still open (default: 5; it is "
                          "written sooner when every association that sent it has closed)")
    ops.add_argument("--sr-max-instances", type=int, default=100, metavar="N",
                     help="at most N images per SR (default: 100): a longer series gets several SRs in one SR "
                          "series, the first written while the rest still arrives; 1 gives one SR per image, at once")
    ops.add_argument("--sr-workers", type=int, default=None, metavar="N",
                     help="processes building SRs beside the node (default: CPU count - 1, at most 4; 0: in the "
                          "node's own process)")
    ops.add_argument("--outbox-max-files", type=int, default=10000,
                     help="refuse new images (0xA700) while this many results wait for delivery (default: 10000)")
    ops.add_argument("--outbox-max-mb", type=int, default=2048,
                     help="... or while they take this many MiB (default: 2048)")
    ops.add_argument("--retry-max", type=float, default=30.0, metavar="S",
                     help="longest wait between delivery attempts while the destination is down (default: 30)")
    ops.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                     help="on SIGTERM, how long to keep delivering results (default: 30); the rest stay in "
                          "the outbox")
    ops.add_argument("--no-overlays", action="store_true", help="do not write heatmap overlays")
    ops.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="log level on stderr (default: info)")
    model = parser.add_argument_group("model")
    model.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "tensorrt_rtx"],
                       help="inference backend (default: auto)")
    model.add_argument("--device", default="0", help="cpu, cuda, cuda:N or N (default: 0; without a usable GPU, "
                                                     "--backend auto runs on the CPU)")
    model.add_argument("--precision", choices=["fp32", "fp16", "int8"], help="graph or engine precision")
    model.add_argument("--allow-failed-gates", action="store_true",
                       help="with --precision: run it although it failed its accuracy gates")
    model.add_argument("--envelope", default="enforce", choices=["enforce", "warn"],
                       help="images outside the validated envelope: refuse them with 0xC211 (enforce, default), "
                            "or predict them and flag the finding in the SR (warn)")
    model.add_argument("--trusted-key", metavar="PEM", help="Ed25519 public key the bundle must be signed with")
    parser.set_defaults(func=run)
    return parser


def _tls_contexts(args):
    from ..serve.dicom_node import client_tls_context, server_tls_context

    server = client = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise MedgeError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise MedgeError("--tls-client-ca needs --tls-cert and --tls-key")
    if args.tls_cert:
        server = server_tls_context(args.tls_cert, args.tls_key, client_ca=args.tls_client_ca)
    if (args.forward_tls_cert or args.forward_tls_key) and not args.forward_tls_ca:
        raise MedgeError("--forward-tls-cert / --forward-tls-key need --forward-tls-ca")
    if bool(args.forward_tls_cert) != bool(args.forward_tls_key):
        raise MedgeError("--forward-tls-cert and --forward-tls-key go together")
    if args.forward_tls_ca:
        if not args.forward:
            raise MedgeError("--forward-tls-ca needs --forward")
        client = client_tls_context(args.forward_tls_ca, cert=args.forward_tls_cert, key=args.forward_tls_key)
    return server, client


def run(args) -> int:
    """Run ``medge serve`` until SIGTERM / SIGINT; returns 0 after a clean stop."""
    from ..runtime.model import load, parse_device
    from ..serve.dicom_node import Destination, DicomNode

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    forward = Destination.parse(args.forward) if args.forward else None
    server_tls, forward_tls = _tls_contexts(args)
    if not 0 <= args.port < 65536 or not 0 <= args.metrics_port < 65536:
        raise MedgeError("--port and --metrics-port must be within 0..65535")
    if args.sr_max_instances < 1 or args.outbox_max_files < 1 or args.outbox_max_mb < 1:
        raise MedgeError("--sr-max-instances, --outbox-max-files and --outbox-max-mb must be positive")
    if args.sr_workers is not None and args.sr_workers < 0:
        raise MedgeError("--sr-workers must be >= 0")
    if args.series_idle < 0 or args.drain_timeout < 0 or args.retry_max <= 0 or args.max_delay_ms < 0:
        raise MedgeError("--series-idle, --drain-timeout and --max-delay-ms must be >= 0, --retry-max > 0")
    device = parse_device(args.device)

    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with load(args.bundle, backend=args.backend, device=device, precision=args.precision,
                  trusted_key=args.trusted_key, allow_failed_gates=args.allow_failed_gates,
                  envelope=args.envelope) as model:
            node = DicomNode(model, ae_title=args.ae_title, host=args.host, port=args.port, forward=forward,
                             spool=args.spool, ssl_context=server_tls, forward_tls=forward_tls,
                             metrics_port=args.metrics_port or None, metrics_host=args.metrics_host,
                             max_delay_ms=args.max_delay_ms, series_idle_s=args.series_idle,
                             max_per_sr=args.sr_max_instances, outbox_max_files=args.outbox_max_files,
                             outbox_max_bytes=args.outbox_max_mb << 20, retry_max_s=args.retry_max,
                             overlays=not args.no_overlays, sr_workers=args.sr_workers)
            node.start()
            # Ready line on stderr for supervisors and scripts (the port is the bound one when --port 0).
            print(f"medge serve: ready on {args.host}:{node.port} as {args.ae_title}"
                  + (f", metrics on {args.metrics_host}:{node.metrics_port}" if node.metrics_port else ""),
                  file=sys.stderr, flush=True)
            try:
                while not stop.wait(0.5):
                    pass
            finally:
                stats = node.stop(deliver_timeout_s=args.drain_timeout)
            if node.segmenting:
                done = (f"{stats['segmented_series']} series segmented, {sum(stats['failed_series'].values())} "
                        f"failed, {stats['delivered_series']} SEGs delivered")
            else:
                done = f"{stats['predicted']} predicted, {stats['delivered_instances']} results delivered"
            print(f"medge serve: stopped: {stats['received']} received, {done}, {stats['outbox_files']} result "
                  f"files left in the outbox", file=sys.stderr, flush=True)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
