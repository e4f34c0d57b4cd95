"""``medge serve``: a DICOM node that predicts what it receives and sends the results on.

::

    scanner / PACS --C-STORE--> [medge serve] --C-STORE--> PACS / viewer (--forward HOST:PORT:AE)
                                 read + check -> Batcher -> SR (+ overlays) -> on-disk outbox -> sender

Receiving (pynetdicom C-STORE SCP, plus C-ECHO):

- Only the storage SOP classes of the modalities in the bundle's validated
  envelope are offered (CT: CT Image Storage, Enhanced and Legacy Converted
  Enhanced CT; ...); a sender proposing another class gets that presentation
  context rejected at association. Transfer syntaxes: the uncompressed ones and
  every compressed one this installation can decode.
- Each instance is decoded and checked before it is acknowledged, so a refusal
  is a C-STORE status of its own and never stops the association:

  ======  ==========================================================
  0x0000  accepted: it will be predicted and its result sent
  0xA700  out of resources: shutting down, the queue or the result outbox is
          full (the sender should retry later)
  0xA900  the data set's SOP Class UID is not the presentation context's
  0xC210  cannot understand: not decodable, or pixels unreadable (damaged,
          truncated, unsupported encoding)
  0xC211  cannot understand: outside the model's validated envelope
          (wrong modality, photometric interpretation, size, ...)
  ======  ==========================================================

  Error Comment carries medge's message (never patient values), cut to 64
  characters.
- An instance whose SOP Instance UID was accepted less than
  ``duplicate_window_s`` ago (10 minutes) is acknowledged without a second
  prediction: a sender that lost a response and sends again gets one result.

Predicting: accepted images go through one ``medge.Batcher`` (dynamic batches
across all associations).

Results: one Comprehensive SR (TID 1500) per source series, written once the
series is complete as far as the node can tell: every association that sent
it has closed (and ``settle_s`` passed without a new one), or no instance of
it arrived for ``series_idle_s``. A long series is written in parts of
``max_per_sr`` images (default 100, all in one SR series), each as soon as it
is full, so results flow while the series still arrives; ``max_per_sr=1``
gives one SR per instance at once. Every instance's result appears in exactly
one SR. SRs are built in ``sr_workers`` processes (highdicom is pure Python,
about 15 ms per image: in the node's own process it would compete with the
receiving threads for the GIL); if a worker dies, the node builds them itself
from then on. An application embedding DicomNode with ``sr_workers > 0`` must
guard its entry point (``if __name__ == "__main__":``), as for any
multiprocessing spawn. Heatmaps, when the bundle gives them, become Secondary
Captures (see ``medge.dicom_out.overlay``).

Segmentation bundles (``model.task.kind == "segmentation"``): a SEG needs
the whole series, so accepted instances (checked as above, then acknowledged
once written) are spooled as received under ``<spool>/series/<folder per
series>`` (stored values on disk, not in memory; nothing of them is
logged), and nothing goes through the Batcher. A series is complete by the
same rules as an SR (its associations closed + ``settle_s``, or
``series_idle_s`` without a new instance); ``max_per_sr`` does not apply.
The complete series is read with ``medge.read_series`` (policy refuse: a
series with missing, duplicated or unevenly spaced slices, or slices that
disagree, gets no SEG; it is counted failed with the reason in the log),
segmented with ``model.segment`` in one segmenting thread (one series at a
time, beside the receiving threads), and its DICOM SEG
(``model.write_segmentation``: the bundle's labels, name, version and
manifest SHA-256) goes to the outbox and on like an SR. Its spool folder is
removed either way. An instance arriving after its series was taken starts
a new series (a SEG of its own, or a failure if it is not a volume on its
own): send a series in one go. Series found in the spool at start (the node
stopped before segmenting them) are segmented first. The spool is not
bounded beyond the disk; the outbox bound holds as for SRs.

Delivering: each result object is first written to the on-disk outbox (file +
JSON sidecar, atomic rename), then sent by C-STORE SCU to ``forward``. A
failed association or a transient status (0xA7xx) is retried with exponential
backoff (``retry_initial_s`` doubling to ``retry_max_s``); a file refused three
times with a permanent status moves to ``outbox/undeliverable`` (kept, logged,
counted). Each send holds pynetdicom's requestor reactor first
(``paused_requestor_reactor``: pynetdicom 3.0 can otherwise lose the response
to that thread under load). What is in the outbox at start is sent first. The outbox is bounded
(``outbox_max_files``, ``outbox_max_bytes``): when full, new instances are
refused with 0xA700 instead of accepted and then lost. Without ``forward``, the
results are written to ``<spool>/results`` instead.

Stopping (``stop()``, SIGTERM in ``medge serve``): stop listening, refuse new
C-STOREs with 0xA700, let open associations finish for ``grace_s`` (then abort
them: what they had not been acknowledged for is the sender's to resend),
predict everything accepted (segment every accepted series), write every
result to the outbox, and deliver for up to ``deliver_timeout_s``. What is still undelivered stays in the outbox
for the next start. Not covered: a crash (SIGKILL, power loss) between an
instance's acknowledgement and its result reaching the outbox (normally
milliseconds to the series' settle time) loses that result.

TLS: ``ssl_context`` (``server_tls_context``) makes the port TLS-only; a
plain association to it fails at the handshake and changes nothing else.
``forward_tls`` (``client_tls_context``) does the same for the destination.

Logs (logger ``medge.serve``) name SOP Instance UIDs, AE titles, addresses
and counts, never patient attributes; pynetdicom's and highdicom's own
records are kept out while the node runs (see ``_PynetdicomLogFilter``),
pydicom's by ``quiet_pydicom``.

Metrics (Prometheus text format, ``metrics_port``): received, refused by
reason, predicted, failed by stage, forwarded by kind, forward failures,
outbox files and bytes, queue depth, and latency histograms (C-STORE received
to prediction; C-STORE received to its SR's delivery). Segmentation bundles:
segmented series, failed series by stage (read, segment, write, deliver),
SEGs forwarded (kind seg), series waiting to be segmented (queue depth), and
the series latency histogram (last instance of the series received to its
SEG delivered, the settle or idle wait included).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import itertools
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from ..errors import MedgeError, MissingDependency, OutsideEnvelope

__all__ = ["DicomNode", "Destination", "server_tls_context", "client_tls_context", "make_self_signed_certificate",
           "paused_requestor_reactor",
           "allowed_sop_classes", "STATUS_SUCCESS", "STATUS_OUT_OF_RESOURCES", "STATUS_SOP_CLASS_MISMATCH",
           "STATUS_UNREADABLE", "STATUS_OUTSIDE_ENVELOPE"]

_LOG = logging.getLogger("medge.serve")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_UNREADABLE = 0xC210
STATUS_OUTSIDE_ENVELOPE = 0xC211

#: Storage SOP classes per modality (pydicom.uid names): what a bundle validated on that modality accepts.
MODALITY_SOP_CLASSES = {
    "CT": ("CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage"),
    "MR": ("MRImageStorage", "EnhancedMRImageStorage", "LegacyConvertedEnhancedMRImageStorage"),
    "CR": ("ComputedRadiographyImageStorage",),
    "DX": ("DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing"),
    "MG": ("DigitalMammographyXRayImageStorageForPresentation", "DigitalMammographyXRayImageStorageForProcessing"),
    "IO": ("DigitalIntraOralXRayImageStorageForPresentation", "DigitalIntraOralXRayImageStorageForProcessing"),
    "US": ("UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage"),
    "NM": ("NuclearMedicineImageStorage",),
    "PT": ("PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
           "LegacyConvertedEnhancedPETImageStorage"),
    "XA": ("XRayAngiographicImageStorage", "EnhancedXAImageStorage"),
    "RF": ("XRayRadiofluoroscopicImageStorage", "EnhancedXRFImageStorage"),
    "OT": ("SecondaryCaptureImageStorage",),
}
_UNCOMPRESSED = ("ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian",
                 "ExplicitVRBigEndian")
_COMPRESSED = ("JPEGBaseline8Bit", "JPEGExtended12Bit", "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless",
               "JPEGLSNearLossless", "JPEG2000Lossless", "JPEG2000", "HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K",
               "RLELossless")
#: What a segmentation bundle's node sends: Segmentation Storage (BINARY, what medge writes) and Label Map
#: Segmentation Storage (medge.seg_out's LABELMAP type).
SEG_SOP_CLASS_UIDS = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0, 3600.0)
# A file refused this many times with a permanent status moves to outbox/undeliverable.
_PERMANENT_ATTEMPTS = 3
# How long an idle association to the destination is kept for the next result.
_KEEP_ASSOCIATION_S = 1.0
# A C-STORE that takes longer than this to accept is logged (senders time out after 30-60 s).
_SLOW_STORE_S = 5.0


def _pynetdicom():
    try:
        import pynetdicom
    except ImportError:
        raise MissingDependency("pynetdicom", "serve", "medge serve (the DICOM node)") from None
    return pynetdicom


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise MissingDependency("prometheus_client", "serve", "medge serve's metrics") from None
    return prometheus_client


# ---------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Destination:
    """Where results go: ``HOST:PORT:AE`` (an IPv6 host in brackets: ``[::1]:104:PACS``)."""

    host: str
    port: int
    ae_title: str

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """Raises MedgeError for anything but HOST:PORT:AE with a port 1-65535 and an AE title of 1-16 characters."""
        value = str(text).strip()
        host, sep, rest = (value[1:].partition("]:") if value.startswith("[") else value.partition(":"))
        port, sep2, ae = rest.partition(":")
        if not (sep and sep2 and host and port.isdigit() and 0 < int(port) < 65536 and _valid_ae(ae)):
            raise MedgeError(f"--forward must be HOST:PORT:AE (AE title 1-16 characters, no backslash), got {text!r}")
        return cls(host, int(port), ae)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _valid_ae(title: str) -> bool:
    return 0 < len(title.strip()) <= 16 and "\\" not in title and title.isprintable()


def allowed_sop_classes(envelope: Any) -> list[str]:
    """Storage SOP Class UIDs for the envelope's modalities (every image class medge knows when none is recorded)."""
    from pydicom import uid as uids

    modalities = sorted(getattr(envelope, "modalities", None) or ())
    chosen = [m for m in modalities if m in MODALITY_SOP_CLASSES] if modalities else list(MODALITY_SOP_CLASSES)
    names = [name for m in chosen for name in MODALITY_SOP_CLASSES[m]]
    return list(dict.fromkeys(str(getattr(uids, name)) for name in names if hasattr(uids, name)))


def decodable_transfer_syntaxes() -> list[str]:
    """The uncompressed transfer syntaxes and every compressed one pydicom can decode here."""
    from pydicom import uid as uids

    out = [str(getattr(uids, name)) for name in _UNCOMPRESSED]
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pragma: no cover - pydicom < 3
        return out
    for name in _COMPRESSED:
        uid = getattr(uids, name, None)
        if uid is None:
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(str(uid))
        except Exception:  # noqa: BLE001 - no decoder registered for it
            continue
    return out


class _ServerTLSContext(ssl.SSLContext):
    """An SSLContext whose server-side handshake gives up after ``handshake_timeout_s``.

    pynetdicom wraps accepted sockets in its accept loop, so a client that
    connects and sends nothing would otherwise hold every new association.
    """

    handshake_timeout_s = 10.0

    def wrap_socket(self, sock, *args, **kwargs):  # noqa: D102 - ssl.SSLContext's
        sock.settimeout(self.handshake_timeout_s)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except BaseException:
            sock.close()
            raise
        wrapped.settimeout(None)
        return wrapped


def server_tls_context(cert: Union[str, os.PathLike], key: Union[str, os.PathLike], *,
                       client_ca: Union[str, os.PathLike, None] = None) -> ssl.SSLContext:
    """TLS for the node's port: TLS 1.2 or newer, ``cert``/``key`` (PEM); with ``client_ca`` peers must present
    a certificate it signed (mutual TLS).

    Raises:
        MedgeError: a file is missing or not a usable certificate / key.
    """
    context = _ServerTLSContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(os.fspath(cert), os.fspath(key))
        if client_ca is not None:
            context.load_verify_locations(cafile=os.fspath(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise MedgeError(f"cannot use the TLS certificate {os.fspath(cert)} / key {os.fspath(key)}"
                         + (f" / client CA {os.fspath(client_ca)}" if client_ca else "") + f": {exc}") from None
    return context


def client_tls_context(ca: Union[str, os.PathLike], *, cert: Union[str, os.PathLike, None] = None,
                       key: Union[str, os.PathLike, None] = None) -> ssl.SSLContext:
    """TLS towards the destination: its certificate must be signed by ``ca`` and name its host; optional
    client certificate ``cert``/``key``.

    Raises:
        MedgeError: a file is missing or unusable.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.fspath(ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            context.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    except (OSError, ssl.SSLError) as exc:
        which = f"the TLS CA {os.fspath(ca)}" + (f" / certificate {os.fspath(cert)}" if cert else "")
        raise MedgeError(f"cannot use {which}: {exc}") from None
    return context


def make_self_signed_certificate(cert_path: Union[str, os.PathLike], key_path: Union[str, os.PathLike], *,
                                 hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365) -> None:
    """Write a self-signed certificate (ECDSA P-256) for ``hosts`` and its key (mode 0600), PEM.

    For trying TLS locally and for tests; in a hospital network use a
    certificate from the site's own CA. The certificate is its own CA: give it
    to the peer as the CA to trust.

    Raises:
        MissingDependency: cryptography is not installed.
    """
    import datetime
    import ipaddress

    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise MissingDependency("cryptography", "runtime", "Making a self-signed TLS certificate") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "medge")])
    alt = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(alt), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    Path(cert_path).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    fd = os.open(os.fspath(key_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)


# ---------------------------------------------------------------------------------------------- logging


class _PynetdicomLogFilter(logging.Filter):
    """Keeps pynetdicom's records out of the node's logs unless they can carry no data set value.

    pynetdicom logs DIMSE messages and, for some services, data set contents
    at INFO/DEBUG, and decoding exceptions with their text (pydicom's can
    quote values). Records below WARNING are dropped; WARNING and above from
    the network layers (transport, association, ACSE, DUL, state machine, AE,
    timer) pass unchanged when they are a plain message without an exception;
    everything else is replaced by a fixed line naming only its module. The
    same filter sits on highdicom's loggers (SRs and SEGs built in the node's
    process).
    """

    NETWORK = ("pynetdicom.transport", "pynetdicom.association", "pynetdicom.acse", "pynetdicom.dul",
               "pynetdicom.fsm", "pynetdicom.ae", "pynetdicom.timer")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if record.name in self.NETWORK and record.exc_info is None and isinstance(record.msg, str):
            return True
        record.msg = "%s reported a %s in %s (text withheld: it can quote data set values)"
        record.args = (record.name.partition(".")[0], record.levelname.lower(), record.name)
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


_FILTER = _PynetdicomLogFilter()
_filter_lock = threading.Lock()
_filter_users = 0


def _pynetdicom_loggers() -> list:
    """pynetdicom's loggers, and highdicom's (its INFO records name source attributes and modules as it copies
    them into an SR or a SEG built in the node's process; its warnings can quote values)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith(("pynetdicom.", "highdicom."))]
    return [logging.getLogger(name) for name in ["pynetdicom", "highdicom", *names]]


def _install_log_filter() -> None:
    global _filter_users
    with _filter_lock:
        _filter_users += 1
        for logger in _pynetdicom_loggers():
            logger.addFilter(_FILTER)


def _remove_log_filter() -> None:
    global _filter_users
    with _filter_lock:
        _filter_users -= 1
        if _filter_users > 0:
            return
        for logger in _pynetdicom_loggers():
            logger.removeFilter(_FILTER)


# ---------------------------------------------------------------------------------------------- metrics


class _Metrics:
    """The node's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        prom = _prometheus()
        self.registry = registry = prom.CollectorRegistry()
        p = "medge_dicom_"
        self.received = prom.Counter(p + "received", "Instances accepted by C-STORE", registry=registry)
        self.refused = prom.Counter(p + "refused", "C-STOREs refused, by reason", ["reason"], registry=registry)
        self.predicted = prom.Counter(p + "predicted", "Accepted instances predicted", registry=registry)
        self.failed = prom.Counter(p + "failed", "Accepted instances without a result, by stage", ["stage"],
                                   registry=registry)
        self.forwarded = prom.Counter(p + "forwarded", "Result objects delivered (or written, without --forward), "
                                      "by kind", ["kind"], registry=registry)
        self.forward_failures = prom.Counter(p + "forward_failures", "Failed delivery attempts, by reason", ["reason"],
                                             registry=registry)
        self.associations = prom.Counter(p + "associations", "Associations accepted", registry=registry)
        self.duplicates = prom.Counter(p + "duplicates", "Instances received again within the duplicate window "
                                       "(acknowledged, not predicted again)", registry=registry)
        self.echoes = prom.Counter(p + "echo", "C-ECHO requests answered", registry=registry)
        self.outbox_files = prom.Gauge(p + "outbox_files", "Result files waiting in the outbox", registry=registry)
        self.outbox_bytes = prom.Gauge(p + "outbox_bytes", "Bytes waiting in the outbox", registry=registry)
        self.queue_depth = prom.Gauge(p + "queue_depth", "Images waiting for the model", registry=registry)
        self.prediction_latency = prom.Histogram(p + "prediction_latency_seconds",
                                                 "C-STORE received to prediction done", registry=registry,
                                                 buckets=_LATENCY_BUCKETS)
        self.latency = prom.Histogram(p + "latency_seconds", "C-STORE received to its SR delivered",
                                      registry=registry, buckets=_LATENCY_BUCKETS)
        # Segmentation bundles: one result per series, so series-level counters and latency.
        self.segmented = prom.Counter(p + "segmented_series", "Series segmented (their SEG written to the outbox)",
                                      registry=registry)
        self.series_failed = prom.Counter(p + "failed_series", "Series without a SEG, by stage (read: not a "
                                          "consistent series; segment; write; deliver)", ["stage"],
                                          registry=registry)
        self.series_latency = prom.Histogram(p + "series_latency_seconds", "Last instance of a series received to "
                                             "its SEG delivered (includes the settle or idle wait)",
                                             registry=registry, buckets=_LATENCY_BUCKETS)

    def value(self, name: str, labels: Optional[dict] = None) -> float:
        return float(self.registry.get_sample_value(name, labels or {}) or 0.0)

    def text(self) -> str:
        return _prometheus().generate_latest(self.registry).decode()


# ---------------------------------------------------------------------------------------------- outbox


class Outbox:
    """Result files waiting for delivery, on disk: ``<name>.dcm`` + ``<name>.json`` (what it is, for whom).

    Names start with a nanosecond timestamp, so delivery is first in, first
    out, also across restarts. Writes are atomic (temporary file, rename); the
    sidecar is written first, so a .dcm never lacks its sidecar.
    """

    def __init__(self, directory: Union[str, os.PathLike], *, max_files: int, max_bytes: int,
                 count_existing: bool = True) -> None:
        self.directory = Path(directory)
        self.undeliverable = self.directory / "undeliverable"
        self.max_files = int(max_files)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._counter = itertools.count()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedgeError(f"cannot create the outbox {self.directory}: {exc.strerror or exc}") from None
        for leftover in self.directory.glob("*.partial"):  # an interrupted write
            leftover.unlink(missing_ok=True)
        for sidecar in self.directory.glob("*.json"):  # a sidecar whose .dcm never arrived
            if not sidecar.with_suffix(".dcm").exists():
                sidecar.unlink(missing_ok=True)
        self.files = 0
        self.bytes = 0
        for path in self.directory.glob("*.dcm") if count_existing else ():
            self.files += 1
            self.bytes += path.stat().st_size

    def full(self) -> Optional[str]:
        """Why no more results fit (None: they do)."""
        with self._lock:
            if self.files >= self.max_files:
                return f"the result outbox holds {self.files} files (limit {self.max_files})"
            if self.bytes >= self.max_bytes:
                return f"the result outbox holds {self.bytes} bytes (limit {self.max_bytes})"
        return None

    def put(self, dataset: Any, meta: dict) -> Path:
        """Write ``dataset`` (a pydicom Dataset, or the bytes of a DICOM file) and its sidecar ``meta``;
        returns the .dcm path.

        Raises:
            MedgeError: it cannot be written (disk full, permissions).
        """
        from ..dicom_out import save_dataset

        stem = f"{time.time_ns():020d}-{next(self._counter):06d}-{meta.get('kind', 'result')}"
        path = self.directory / f"{stem}.dcm"
        sidecar = path.with_suffix(".json")
        tmp = sidecar.with_name(sidecar.name + ".partial")
        try:
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, sidecar)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise MedgeError(f"cannot write to the outbox {self.directory}: {exc.strerror or exc}") from None
        try:
            if isinstance(dataset, (bytes, bytearray)):
                partial = path.with_name(path.name + ".partial")
                try:
                    partial.write_bytes(dataset)
                    os.replace(partial, path)
                except OSError as exc:
                    partial.unlink(missing_ok=True)
                    raise MedgeError(f"cannot write to the outbox {self.directory}: {exc.strerror or exc}") from None
            else:
                save_dataset(dataset, path)
        except MedgeError:
            sidecar.unlink(missing_ok=True)
            raise
        with self._lock:
            self.files += 1
            self.bytes += path.stat().st_size
        return path

    def entries(self) -> list[Path]:
        return sorted(self.directory.glob("*.dcm"))

    def meta(self, path: Path) -> dict:
        try:
            return json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return {}

    def _forget(self, path: Path) -> None:
        with self._lock:
            self.files = max(0, self.files - 1)
            try:
                self.bytes = max(0, self.bytes - path.stat().st_size)
            except OSError:
                pass

    def remove(self, path: Path) -> None:
        """A delivered file: gone."""
        self._forget(path)
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)

    def set_aside(self, path: Path, reason: str) -> Path:
        """A file the destination refuses for good: moved to ``undeliverable/`` with the reason in its sidecar."""
        self._forget(path)
        self.undeliverable.mkdir(exist_ok=True)
        meta = self.meta(path)
        meta["undeliverable"] = reason
        target = self.undeliverable / path.name
        target.with_suffix(".json").write_text(json.dumps(meta))
        path.with_suffix(".json").unlink(missing_ok=True)
        os.replace(path, target)
        return target


# ---------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class _Instance:
    """One accepted instance, from its C-STORE to its place in an SR."""

    uid: str
    header: Any
    image: Any
    key: tuple
    association: int
    received_wall: float
    received: float
    predictions: Any = None
    error: Optional[BaseException] = None
    path: Optional[Path] = None  # segmentation bundles: the instance as received, in the series' spool folder


@dataclass
class _Series:
    key: tuple
    pending: int = 0
    done: list = field(default_factory=list)
    associations: set = field(default_factory=set)
    last_received: float = 0.0
    last_closed: float = 0.0
    parts: int = 0
    overlays: int = 0
    folder: Optional[Path] = None  # segmentation bundles: where its instances are spooled
    taken: float = 0.0  # segmentation bundles: when it was found complete (monotonic)


class DicomNode:
    """A DICOM C-STORE SCP that predicts every accepted image with ``model`` and delivers the results.

    With a segmentation bundle, accepted instances are spooled per series
    instead, and each complete series is segmented into one DICOM SEG (module
    docstring, "Segmentation bundles").

    Args:
        model: a loaded ``medge.Model`` (classification or segmentation); the node does not close it.
        ae_title: the node's AE title.
        host, port: where to listen (port 0: any free port, see ``port`` after ``start``).
        forward: a Destination (or "HOST:PORT:AE") for the results; None: keep them in ``<spool>/results``.
        spool: folder of the outbox (and results without ``forward``), and of the series being received for a
            segmentation bundle; kept across restarts.
        ssl_context: TLS for the port (``server_tls_context``); None: plain TCP.
        forward_tls: TLS towards ``forward`` (``client_tls_context``).
        metrics_port: serve Prometheus metrics on http://metrics_host:metrics_port/ (None: not served;
            0: any free port, see ``metrics_port`` after ``start``).
        max_delay_ms: the Batcher's wait for batch-mates.
        max_queue: images waiting for the model before C-STOREs wait (then 0xA700 after ``queue_timeout_s``).
            These two, ``overlays`` and ``sr_workers`` concern classification bundles only (a segmentation
            bundle's node has no Batcher and builds each SEG in its segmenting thread).
        series_idle_s, settle_s, max_per_sr: when a series' SR (or SEG) is written (module docstring);
            ``max_per_sr`` does not apply to segmentation bundles (a SEG needs the whole series).
        outbox_max_files, outbox_max_bytes: the outbox bound.
        retry_initial_s, retry_max_s: delivery backoff.
        max_associations: concurrent associations.
        overlays: write heatmap overlays (Secondary Capture) when predictions carry a heatmap.
        duplicate_window_s: an instance whose SOP Instance UID was accepted less than this long ago is
            acknowledged again without a second prediction or result (a sender resending after a lost
            response); 0 turns it off.
        sr_workers: processes that build SRs (highdicom is pure Python: about 15 ms per image on one core,
            the node's bottleneck on a CPU, so it runs beside the receiving and predicting threads instead of
            competing with them for the GIL). Default: CPU count - 1, at most 4; 0 builds them in-process.

    Raises:
        MedgeError: the bundle's task has no DICOM result writer, or a setting is out of range.
        MissingDependency: pynetdicom, highdicom or prometheus-client is missing (``medge[serve]``).
    """

    def __init__(self, model: Any, *, ae_title: str = "MEDGE", host: str = "127.0.0.1", port: int = 11112,
                 forward: Union[Destination, str, None] = None, spool: Union[str, os.PathLike] = "medge-spool",
                 ssl_context: Optional[ssl.SSLContext] = None, forward_tls: Optional[ssl.SSLContext] = None,
                 metrics_port: Optional[int] = None, metrics_host: str = "127.0.0.1", max_delay_ms: float = 5.0,
                 max_queue: int = 1024, queue_timeout_s: float = 30.0, series_idle_s: float = 5.0,
                 settle_s: float = 0.5, max_per_sr: int = 100, outbox_max_files: int = 10000,
                 outbox_max_bytes: int = 2 << 30, retry_initial_s: float = 0.5, retry_max_s: float = 30.0,
                 max_associations: int = 16, overlays: bool = True, sr_workers: Optional[int] = None,
                 duplicate_window_s: float = 600.0) -> None:
        _pynetdicom()
        from ..dicom_out import Provenance
        from ..dicom_out._common import import_highdicom

        import_highdicom("medge serve's results")
        if not _valid_ae(ae_title):
            raise MedgeError(f"the AE title must have 1-16 characters without a backslash, got {ae_title!r}")
        kind = (getattr(model, "manifest", {}).get("task") or {}).get("kind")
        if kind not in ("classification", "segmentation"):
            raise MedgeError(f"medge serve writes DICOM results for classification and segmentation bundles; this "
                             f"bundle's task is {kind!r}")
        #: True for a segmentation bundle: series are spooled, segmented whole, and answered with a DICOM SEG.
        self.segmenting = kind == "segmentation"
        for name, value in (("max_per_sr", max_per_sr), ("outbox_max_files", outbox_max_files),
                            ("max_associations", max_associations), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise MedgeError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.provenance = Provenance.of(model)
        self.ae_title = ae_title
        self.host = host
        self.port = int(port)
        self.forward = Destination.parse(forward) if isinstance(forward, str) else forward
        self.spool = Path(spool)
        self.ssl_context = ssl_context
        self.forward_tls = forward_tls
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port
        self.max_delay_ms = float(max_delay_ms)
        self.max_queue = int(max_queue)
        self.queue_timeout_s = float(queue_timeout_s)
        self.series_idle_s = float(series_idle_s)
        self.settle_s = float(settle_s)
        self.max_per_sr = int(max_per_sr)
        self.retry_initial_s = float(retry_initial_s)
        self.retry_max_s = float(retry_max_s)
        self.max_associations = int(max_associations)
        self.overlays = bool(overlays)
        if sr_workers is None:
            sr_workers = max(1, min(4, (os.cpu_count() or 1) - 1))
        if not isinstance(sr_workers, int) or sr_workers < 0:
            raise MedgeError(f"sr_workers must be an integer >= 0, got {sr_workers!r}")
        self.sr_workers = sr_workers
        self.duplicate_window_s = float(duplicate_window_s)
        self.sop_classes = allowed_sop_classes(getattr(model, "envelope", None))
        self.transfer_syntaxes = decodable_transfer_syntaxes()
        # Without a destination the results folder is where results end: files there are not "waiting".
        self.outbox = Outbox(self.spool / ("outbox" if self.forward else "results"), max_files=outbox_max_files,
                             max_bytes=outbox_max_bytes, count_existing=self.forward is not None)
        self.metrics = _Metrics()

        self._lock = threading.Condition()
        self._series: dict[tuple, _Series] = {}
        self._open_associations: set[int] = set()
        self._association_ids = itertools.count(1)
        self._completed: deque = deque()  # instances whose prediction finished, for the results thread
        self._closed: deque = deque()  # (association id, time) closed, for the results thread
        self._accepted = 0
        self._finished = 0  # accepted instances whose SR was delivered, or that failed for good
        self._stopping = False
        self._flush_all = False
        self._results_done = False
        self._deliver_deadline: Optional[float] = None
        self._send_wakeup = threading.Condition()
        self._attempts: dict[str, int] = {}
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None
        self._jobs: list = []  # (future, instances) of SRs being built in the pool
        self._seen: collections.OrderedDict = collections.OrderedDict()  # SOP Instance UID -> accepted at
        self._full_logged = False
        self._server = None
        self._batcher = None
        self._threads: list[threading.Thread] = []
        self._metrics_server = None
        self._started = False
        # Segmentation bundles: complete series wait here for the segmenting thread (one series at a time).
        self._segment_queue: deque = deque()
        self._segment_backlog = 0  # series queued or being segmented
        self._spool_names = itertools.count()

    # ------------------------------------------------------------------------------------------ lifetime

    def start(self) -> "DicomNode":
        """Start the model's Batcher, the results and delivery threads, metrics, and the listener.

        Raises:
            MedgeError: the port cannot be bound (in use, permission).
        """
        from ..runtime.batcher import Batcher

        pynetdicom = _pynetdicom()
        from pynetdicom import evt
        from pynetdicom.sop_class import Verification

        if self._started:
            raise MedgeError("this DicomNode was already started; make a new one")
        self._started = True
        if self.segmenting:
            import highdicom.seg  # noqa: F401 - its module loggers exist before the log filter is installed
        _install_log_filter()
        if self.segmenting:
            self._recover_spooled_series()
        else:
            self._batcher = Batcher(self.model, max_delay_ms=self.max_delay_ms, max_queue=self.max_queue,
                                    name="medge-serve-batcher")
        if self.sr_workers and not self.segmenting:
            import multiprocessing

            # spawn, not fork: this process has threads (the Batcher, the backend's own pools).
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.sr_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_sr_worker_init)
            self._pool.submit(int)  # start a worker now: it imports highdicom while the node starts
        self.metrics.queue_depth.set_function(self._queue_depth)
        self._update_outbox_gauges()
        threads = [(self._results_main, "medge-serve-results"), (self._deliver_main, "medge-serve-send")]
        if self.segmenting:
            threads.append((self._segment_main, "medge-serve-segment"))
        for target, name in threads:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.metrics_port is not None:
            prom = _prometheus()
            try:
                server, _thread = prom.start_http_server(int(self.metrics_port), addr=self.metrics_host,
                                                         registry=self.metrics.registry)
            except OSError as exc:
                self._abort_start()
                raise MedgeError(f"cannot serve metrics on {self.metrics_host}:{self.metrics_port}: "
                                 f"{exc.strerror or exc}") from None
            self._metrics_server = server
            self.metrics_port = server.server_address[1]

        ae = pynetdicom.AE(ae_title=self.ae_title)
        ae.maximum_associations = self.max_associations
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for uid in self.sop_classes:
            ae.add_supported_context(uid, self.transfer_syntaxes)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_CONN_CLOSE, self._on_close)]
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        except OSError as exc:
            self._abort_start()
            raise MedgeError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._ae = ae
        self.port = int(self._server.server_address[1])
        modalities = sorted(getattr(getattr(self.model, "envelope", None), "modalities", None) or ()) or ["any"]
        _LOG.info("medge serve: %s %s listening on %s:%d as %s (%s), %d SOP classes (%s), %s; results %s",
                  self.provenance.name, self.provenance.version, self.host, self.port, self.ae_title,
                  "TLS" if self.ssl_context else "plain TCP", len(self.sop_classes), ", ".join(modalities),
                  f"metrics on http://{self.metrics_host}:{self.metrics_port}/metrics" if self._metrics_server
                  else "no metrics endpoint",
                  f"to {self.forward}" + (" over TLS" if self.forward_tls else "") if self.forward
                  else f"written to {self.outbox.directory}")
        if self.outbox.files:
            _LOG.info("medge serve: %d result files from an earlier run are waiting in %s and go first",
                      self.outbox.files, self.outbox.directory)
        return self

    def _abort_start(self) -> None:
        self._stopping = True
        if self._batcher is not None:
            self._batcher.close(drain=False)
        self._segment_queue.clear()
        self._segment_backlog = 0
        self._flush_all = True
        self._deliver_deadline = time.monotonic()
        with self._lock:
            self._lock.notify_all()
        with self._send_wakeup:
            self._send_wakeup.notify_all()
        for thread in self._threads:
            thread.join(5)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        _remove_log_filter()

    def stop(self, *, grace_s: float = 5.0, deliver_timeout_s: float = 30.0) -> dict:
        """Stop gracefully (module docstring); returns ``stats()``. Idempotent."""
        if not self._started or self._stopping:
            return self.stats()
        _LOG.info("medge serve: stopping: no new associations; finishing what was accepted")
        self._stopping = True
        server = self._server
        if server is not None:
            server.shutdown()  # closes the listening socket; open associations carry on
            deadline = time.monotonic() + max(0.0, grace_s)
            while server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for association in server.active_associations:
                _LOG.warning("medge serve: aborting an association still open after %.1f s", grace_s)
                association.abort()
        if self._batcher is not None:
            self._batcher.close(drain=True)  # every accepted instance is predicted
        with self._lock:
            self._flush_all = True
            self._lock.notify_all()
        self._threads[0].join()  # results thread: every SR (every series' SEG) written to the outbox
        for thread in self._threads[2:]:  # the segmenting thread, done once the results thread is
            thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._deliver_deadline = time.monotonic() + max(0.0, deliver_timeout_s)
        with self._send_wakeup:
            self._send_wakeup.notify_all()
        self._threads[1].join()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        _remove_log_filter()
        stats = self.stats()
        if self.forward and self.outbox.files:
            _LOG.warning("medge serve: stopped with %d result files undelivered in %s; they are sent at the next start",
                         self.outbox.files, self.outbox.directory)
        else:
            _LOG.info("medge serve: stopped; %d accepted, %d results delivered", stats["received"],
                      stats["delivered_series"] if self.segmenting else stats["delivered_instances"])
        return stats

    def __enter__(self) -> "DicomNode":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ status

    def stats(self) -> dict:
        """Counters: received, refused (by reason), predicted, failed (instances, by stage: predict, write,
        deliver), forwarded (by kind: sr, overlay), delivered_instances, outbox_files, queue_depth; and
        segmented_series, failed_series (by stage: read, segment, write, deliver), delivered_series.

        For a segmentation bundle, failed's stages are segment (the series was refused or its segmentation
        failed), write and deliver, forwarded's kind is seg, and queue_depth counts series waiting to be
        segmented."""
        m = self.metrics
        refused = {r: m.value("medge_dicom_refused_total", {"reason": r})
                   for r in ("unreadable", "outside_envelope", "sop_class", "busy")}
        stages = ("segment" if self.segmenting else "predict", "write", "deliver")
        failed = {s: m.value("medge_dicom_failed_total", {"stage": s}) for s in stages}
        return {"received": int(m.value("medge_dicom_received_total")),
                "duplicates": int(m.value("medge_dicom_duplicates_total")),
                "refused": {k: int(v) for k, v in refused.items()},
                "predicted": int(m.value("medge_dicom_predicted_total")),
                "failed": {k: int(v) for k, v in failed.items()},
                "forwarded": {k: int(m.value("medge_dicom_forwarded_total", {"kind": k}))
                              for k in (("seg",) if self.segmenting else ("sr", "overlay"))},
                "delivered_instances": int(m.value("medge_dicom_latency_seconds_count")),
                "forward_failures": int(sum(m.value("medge_dicom_forward_failures_total", {"reason": r})
                                            for r in ("connect", "status", "refused"))),
                "outbox_files": self.outbox.files,
                "queue_depth": self._queue_depth(),
                "segmented_series": int(m.value("medge_dicom_segmented_series_total")),
                "failed_series": {s: int(m.value("medge_dicom_failed_series_total", {"stage": s}))
                                  for s in ("read", "segment", "write", "deliver")},
                "delivered_series": int(m.value("medge_dicom_series_latency_seconds_count"))}

    def _queue_depth(self) -> int:
        """Images waiting for the model; for a segmentation bundle, series waiting to be segmented."""
        if self.segmenting:
            return self._segment_backlog
        return self._batcher.stats().queue_depth if self._batcher else 0

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every accepted instance has its SR delivered (or failed for good) and the outbox is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                settled = self._finished >= self._accepted
            if settled and self.outbox.files == 0:
                return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------------------------------------ receiving

    def _association_id(self, association: Any) -> int:
        ident = getattr(association, "_medge_id", None)
        if ident is None:
            ident = next(self._association_ids)
            association._medge_id = ident
        return ident

    def _on_accepted(self, event: Any) -> None:
        self.metrics.associations.inc()
        ident = self._association_id(event.assoc)
        with self._lock:
            self._open_associations.add(ident)
        requestor = event.assoc.requestor
        _LOG.debug("medge serve: association %d from %s (%s:%s)", ident, requestor.ae_title, requestor.address,
                   requestor.port)

    def _on_close(self, event: Any) -> None:
        ident = getattr(event.assoc, "_medge_id", None)
        if ident is None:
            return
        with self._lock:
            self._open_associations.discard(ident)
            self._closed.append((ident, time.monotonic()))
            self._lock.notify_all()

    def _on_echo(self, event: Any) -> int:
        self.metrics.echoes.inc()
        return STATUS_SUCCESS

    def _refuse(self, status: int, reason: str, comment: str, uid: Optional[str]) -> Any:
        from pydicom.dataset import Dataset

        self.metrics.refused.labels(reason).inc()
        _LOG.warning("medge serve: refused %s (0x%04X): %s", f"instance {uid}" if uid else "an instance", status,
                     comment)
        answer = Dataset()
        answer.Status = status
        answer.ErrorComment = comment[:64]
        return answer

    def _on_store(self, event: Any) -> Any:
        """C-STORE: decode, check, queue for the model; answer only once the instance is ours or refused."""
        from .._pydicom_quiet import quiet_pydicom
        from ..dicom import read_dicom
        from ..dicom_out import reference_header
        from ..dicom_out._common import group_key
        from ..runtime.batcher import BatcherClosed, QueueFull

        received_wall, received = time.time(), time.monotonic()
        if self._stopping:
            return self._refuse(STATUS_OUT_OF_RESOURCES, "busy", "medge serve is shutting down; send it again later",
                                None)
        full = self.outbox.full()
        if full:
            if not self._full_logged:
                self._full_logged = True
                _LOG.error("medge serve: %s; refusing new instances until results are delivered", full)
            return self._refuse(STATUS_OUT_OF_RESOURCES, "busy", "result outbox full: destination unreachable?", None)
        self._full_logged = False
        uid = None
        with quiet_pydicom("receiving a C-STORE"):
            try:
                dataset = event.dataset
                dataset.file_meta = event.file_meta
                uid = str(dataset.get("SOPInstanceUID", "") or "") or None
                sop_class = str(dataset.get("SOPClassUID", "") or "")
            except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a damaged data set
                return self._refuse(STATUS_UNREADABLE, "unreadable",
                                    f"data set cannot be decoded ({type(exc).__name__})", None)
            if sop_class != str(event.context.abstract_syntax):
                return self._refuse(STATUS_SOP_CLASS_MISMATCH, "sop_class",
                                    "SOP Class UID differs from the presentation context's", uid)
            if uid is not None and self._duplicate(uid, received):
                self.metrics.duplicates.inc()
                _LOG.info("medge serve: instance %s received again within %.0f s: acknowledged, its result is "
                          "already on its way", uid, self.duplicate_window_s)
                return STATUS_SUCCESS
            try:
                decoded = time.monotonic()
                image = read_dicom(dataset)
                self.model.envelope_check(image)  # OutsideEnvelope when enforcing; flags come with the prediction
                header = reference_header(dataset)
                checked = time.monotonic()
            except OutsideEnvelope as exc:
                self._forget_seen(uid)
                return self._refuse(STATUS_OUTSIDE_ENVELOPE, "outside_envelope", _short(exc), uid)
            except MedgeError as exc:
                self._forget_seen(uid)
                return self._refuse(STATUS_UNREADABLE, "unreadable", _short(exc), uid)
        del dataset
        if self.segmenting:
            del image  # checked; the series is read again, whole, from the spool when it is complete
            return self._spool_instance(event, header, received_wall, received)
        instance = _Instance(uid=str(header.SOPInstanceUID), header=header, image=image, key=group_key(header),
                             association=self._association_id(event.assoc), received_wall=received_wall,
                             received=received)
        self._register(instance)
        try:
            future = self._batcher.submit(image, block=True, timeout=self.queue_timeout_s)
        except (QueueFull, BatcherClosed) as exc:
            self._unregister(instance)
            self._forget_seen(instance.uid)
            return self._refuse(STATUS_OUT_OF_RESOURCES, "busy", "the model's queue is full; send it again later"
                                if isinstance(exc, QueueFull) else "medge serve is shutting down", uid)
        self.metrics.received.inc()
        future.add_done_callback(lambda f, i=instance: self._on_predicted(i, f))
        took = time.monotonic() - received
        if took > _SLOW_STORE_S:  # the sender waits for this answer; its own timeouts are often 30-60 s
            _LOG.warning("medge serve: instance %s took %.1f s to accept (decode %.1f s, read and check %.1f s, "
                         "queue %.1f s): the machine is overloaded", instance.uid, took, decoded - received,
                         checked - decoded, time.monotonic() - checked)
        return STATUS_SUCCESS

    def _spool_instance(self, event: Any, header: Any, received_wall: float, received: float) -> Any:
        """Segmentation bundles: keep the instance as received (atomic write) in its series' spool folder;
        acknowledged once it is on disk."""
        from ..dicom_out._common import group_key

        uid = str(header.SOPInstanceUID)
        key = group_key(header)
        association = self._association_id(event.assoc)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(key, folder=self._new_series_folder())
            # pending: the series is not due while one of its instances is being written.
            series.pending += 1
            series.associations.add(association)
            self._open_associations.add(association)
            folder = series.folder
        path = folder / f"{_spool_name(uid)}.dcm"
        partial = path.with_name(path.name + ".partial")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            key_file = folder / "series.json"
            if not key_file.exists():
                key_file.write_text(json.dumps({"study_instance_uid": key[0], "series_instance_uid": key[1]}))
            partial.write_bytes(event.encoded_dataset(include_meta=True))  # the stored values, as sent
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            with self._lock:
                series.pending -= 1
                if not series.pending and not series.done and self._series.get(key) is series:
                    del self._series[key]
                    shutil.rmtree(folder, ignore_errors=True)
            self._forget_seen(uid)
            _LOG.error("medge serve: cannot spool instance %s in %s: %s", uid, folder, exc.strerror or exc)
            return self._refuse(STATUS_OUT_OF_RESOURCES, "busy", "cannot spool the instance (disk full?)", uid)
        instance = _Instance(uid=uid, header=None, image=None, key=key, association=association,
                             received_wall=received_wall, received=received, path=path)
        with self._lock:
            series.pending -= 1
            series.done.append(instance)
            series.last_received = max(series.last_received, received)
            self._accepted += 1
        self.metrics.received.inc()
        return STATUS_SUCCESS

    def _new_series_folder(self) -> Path:
        """A spool folder of its own for each series the node collects (a series that arrives again after it
        was segmented gets a new one, so removing the old one never touches it)."""
        return self.spool / "series" / f"{time.time_ns():020d}-{next(self._spool_names):06d}"

    def _recover_spooled_series(self) -> None:
        """Series spooled by an earlier run that stopped before segmenting them (a crash): segmented first."""
        root = self.spool / "series"
        if not root.is_dir():
            return
        now_wall, now = time.time(), time.monotonic()
        recovered = 0
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for leftover in folder.glob("*.partial"):
                leftover.unlink(missing_ok=True)
            files = sorted(folder.glob("*.dcm"))
            try:
                names = json.loads((folder / "series.json").read_text())
                key = (str(names["study_instance_uid"]), str(names["series_instance_uid"]))
            except (OSError, ValueError, KeyError, TypeError):
                files = []
            if not files:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            series = self._series.get(key)
            if series is None:  # one series in several folders (it arrived again): one SEG over all of them
                series = self._series[key] = _Series(key, folder=folder, last_received=now, last_closed=now)
            for path in files:
                received_wall = min(now_wall, path.stat().st_mtime)
                series.done.append(_Instance(uid=path.stem, header=None, image=None, key=key, association=0,
                                             received_wall=received_wall, received=now - (now_wall - received_wall),
                                             path=path))
            self._accepted += len(files)
            recovered += len(files)
        if recovered:
            _LOG.info("medge serve: %d spooled instances of %d series from an earlier run were not segmented; "
                      "segmenting them first", recovered, len(self._series))

    def _duplicate(self, uid: str, now: float) -> bool:
        """Was ``uid`` accepted within the duplicate window? If not, it is recorded as accepted now."""
        if self.duplicate_window_s <= 0:
            return False
        with self._lock:
            seen = self._seen
            while seen:  # forget what left the window (oldest first)
                _oldest, when = next(iter(seen.items()))
                if now - when <= self.duplicate_window_s and len(seen) < 1_000_000:
                    break
                seen.popitem(last=False)
            if uid in seen:
                return True
            seen[uid] = now
            return False

    def _forget_seen(self, uid: str) -> None:
        """An instance that ends without a result may be sent again (and predicted again)."""
        with self._lock:
            self._seen.pop(uid, None)

    def _register(self, instance: _Instance) -> None:
        with self._lock:
            series = self._series.get(instance.key)
            if series is None:
                series = self._series[instance.key] = _Series(instance.key)
            series.pending += 1
            series.associations.add(instance.association)
            series.last_received = instance.received
            self._open_associations.add(instance.association)
            self._accepted += 1

    def _unregister(self, instance: _Instance) -> None:
        with self._lock:
            self._series[instance.key].pending -= 1
            self._accepted -= 1

    def _on_predicted(self, instance: _Instance, future: Any) -> None:
        # In the Batcher's worker thread: record and hand over, nothing slow.
        try:
            instance.predictions = future.result()
        except BaseException as exc:  # noqa: BLE001 - the item's error, or the batch's
            instance.error = exc
        with self._lock:
            self._completed.append(instance)
            self._lock.notify_all()

    # ------------------------------------------------------------------------------------------ results

    def _results_main(self) -> None:
        """Turn predictions into SRs (and overlays) in the outbox, series by series."""
        while True:
            with self._lock:
                if not self._completed and not self._closed and not self._flush_all:
                    self._lock.wait(0.1)
                elif self._flush_all and (self._jobs or self._segment_backlog) and not self._completed:
                    self._lock.wait(0.05)  # draining: wait for the pool's SRs (the SEGs) without spinning
                completed = list(self._completed)
                self._completed.clear()
                closed = list(self._closed)
                self._closed.clear()
                final = self._flush_all
            try:
                for instance in completed:
                    self._take(instance)
                with self._lock:
                    now = time.monotonic()
                    for ident, when in closed:
                        for series in self._series.values():
                            if ident in series.associations:
                                series.last_closed = max(series.last_closed, when)
                    due = [s for s in self._series.values() if self._due(s, now, final)]
                    parts = []
                    for series in due:
                        limit = len(series.done) if self.segmenting else self.max_per_sr  # a SEG needs it all
                        take = series.done[:limit]
                        series.done = series.done[limit:]
                        series.taken = now
                        parts.append((series, take))
                        if not series.pending and not series.done:
                            del self._series[series.key]
                    if self.segmenting:
                        self._segment_queue.extend(parts)
                        self._segment_backlog += len(parts)
                        if parts:
                            self._lock.notify_all()
                if not self.segmenting:
                    for series, instances in parts:
                        self._write_sr(series, instances)
                    self._reap_jobs()
            except Exception:  # noqa: BLE001 - a bug here must not stop the node's results
                _LOG.exception("medge serve: internal error in the results thread")
            if final:
                with self._lock:
                    if (not self._completed and not self._jobs and not self._segment_backlog
                            and not any(s.done or s.pending for s in self._series.values())):
                        self._results_done = True
                        break

    def _due(self, series: _Series, now: float, final: bool) -> bool:
        if not series.done:
            return False
        if self.segmenting:
            if series.pending:  # an instance of it is being written to the spool
                return False
            if final:
                return True
        elif final or len(series.done) >= self.max_per_sr:
            return True
        if series.pending:
            return False
        if not (series.associations & self._open_associations) and now - max(series.last_received,
                                                                              series.last_closed) >= self.settle_s:
            return True
        return now - series.last_received >= self.series_idle_s

    def _take(self, instance: _Instance) -> None:
        """A finished prediction: counted, its overlays written; kept for its series' SR."""
        from ..dicom_out._common import frame_predictions

        image, instance.image = instance.image, None
        predictions = frame_predictions(instance.predictions)
        ok = instance.error is None and predictions
        if ok:
            self.metrics.predicted.inc()
            self.metrics.prediction_latency.observe(time.monotonic() - instance.received)
        else:
            self.metrics.failed.labels("predict").inc()
            self._forget_seen(instance.uid)
            error = instance.error
            message = str(error) if isinstance(error, MedgeError) else type(error).__name__
            _LOG.warning("medge serve: instance %s was accepted but its prediction failed: %s", instance.uid, message)
        with self._lock:
            series = self._series[instance.key]
            series.pending -= 1
            if ok:
                series.done.append(instance)
            else:
                self._finished += 1
        if ok and self.overlays:
            for prediction in predictions:
                if getattr(prediction, "heatmap", None) is not None:
                    self._write_overlay(series, instance, image, prediction)

    # ------------------------------------------------------------------------------------------ segmentation

    def _segment_main(self) -> None:
        """Segment complete series one at a time, beside the receiving threads; until stopped and drained."""
        while True:
            with self._lock:
                while not self._segment_queue and not self._results_done:
                    self._lock.wait(0.2)
                if not self._segment_queue:
                    return
                series, instances = self._segment_queue.popleft()
            try:
                self._segment_series(series, instances)
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the node's other series
                _LOG.error("medge serve: internal error segmenting series %s (%s)", series.key[1],
                           type(exc).__name__)
            finally:
                with self._lock:
                    self._segment_backlog -= 1
                    self._lock.notify_all()

    def _segment_series(self, series: _Series, instances: list) -> None:
        """Read the spooled series (gapped or inconsistent: refused), segment it, put its SEG in the outbox;
        the spool folder(s) are removed whatever happens."""
        from ..series import read_series

        # The same SOP Instance received twice (duplicate window off) is one file: read it once.
        paths = list(dict.fromkeys(i.path for i in instances))
        uids = list(dict.fromkeys(i.uid for i in instances))
        series_uid = series.key[1]
        completed_wall = max(i.received_wall for i in instances)
        # For the log: last instance received -> found complete (the settle or idle wait) -> segmenting starts.
        settle_ms = (series.taken - max(i.received for i in instances)) * 1e3
        queued_ms = (time.monotonic() - series.taken) * 1e3
        stage = "read"
        started = time.perf_counter()
        try:
            try:
                volume = read_series(paths, policy="refuse")
                read_ms = (time.perf_counter() - started) * 1e3
                stage = "segment"
                segmentation = self.model.segment(volume)
                stage = "write"
                dataset = self.model.write_segmentation(volume, segmentation, None)
                took_ms = (time.perf_counter() - started) * 1e3
                # accepted: acknowledgements this SEG settles (one more than the files for an instance stored
                # twice with the duplicate window off), what wait_idle counts.
                meta = {"kind": "seg", "sop_instance_uid": str(dataset.SOPInstanceUID),
                        "series_instance_uid": series_uid, "instances": uids, "accepted": len(instances),
                        "completed": completed_wall, "segment_ms": round(took_ms, 1)}
                path = self.outbox.put(dataset, meta)
            except MedgeError as exc:
                self._series_failed(series_uid, uids, len(instances), stage, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - a bug in a stage; its text could quote values
                self._series_failed(series_uid, uids, len(instances), stage, f"a bug: {type(exc).__name__}")
                return
        finally:
            for folder in {p.parent for p in paths}:
                shutil.rmtree(folder, ignore_errors=True)
        self.metrics.segmented.inc()
        timings = segmentation.timings_ms
        # read: read_series here, plus segment's own "read" (the envelope check of the series).
        stages = [read_ms + float(timings.get("read", 0.0))] + [
            float(timings.get(k, 0.0)) for k in ("preprocess", "infer", "sliding_window", "postprocess")]
        _LOG.info("medge serve: series %s segmented: %d instances, %.0f ms (read %.0f, preprocess %.0f, infer %.0f, "
                  "sliding window %.0f, postprocess %.0f, SEG %.0f) after %.0f ms to completeness and %.0f ms "
                  "queued; SEG %s in the outbox", series_uid, len(uids), took_ms, *stages, took_ms - sum(stages),
                  settle_ms, queued_ms, meta["sop_instance_uid"])
        self._after_put(path, meta)

    def _series_failed(self, series_uid: str, uids: list, accepted: int, stage: str, reason: str) -> None:
        self.metrics.series_failed.labels(stage).inc()
        self.metrics.failed.labels("write" if stage == "write" else "segment").inc(len(uids))
        for uid in uids:  # the sender may send the series again (complete this time) and get a SEG
            self._forget_seen(uid)
        with self._lock:
            self._finished += accepted
        _LOG.error("medge serve: series %s (%d instances) gets no SEG (%s): %s", series_uid, len(uids),
                   {"read": "not a consistent series", "segment": "segmentation failed",
                    "write": "the SEG could not be written"}[stage], reason)

    def _write_overlay(self, series: _Series, instance: _Instance, image: Any, prediction: Any) -> None:
        from ..dicom_out import build_overlay_sc, render_overlay

        try:
            frame = int(getattr(prediction, "frame", 0) or 0)
            rgb, scaling = render_overlay(image, prediction.heatmap, frame=frame,
                                          preprocess=self.provenance.preprocess)
            series.overlays += 1
            sc = build_overlay_sc(instance.header, rgb, self.provenance, frame=frame, prediction=prediction,
                                  scaling=scaling, instance_number=series.overlays)
            meta = {"kind": "overlay", "instances": [instance.uid]}
            path = self.outbox.put(sc, meta)
        except MedgeError as exc:
            self.metrics.failed.labels("write").inc()
            _LOG.warning("medge serve: the overlay of instance %s could not be written: %s", instance.uid, exc)
            return
        self._after_put(path, meta)

    def _write_sr(self, series: _Series, instances: list) -> None:
        """Build the SR of ``instances`` (in the pool when there is one) and put it in the outbox."""
        series.parts += 1
        entries = [(i.header, _sr_predictions(i.predictions)) for i in instances]
        if self._pool is not None:
            try:
                future = self._pool.submit(_encode_sr, entries, self.provenance, series.parts)
            except RuntimeError:  # BrokenProcessPool (a worker died) or shut down: build here from now on
                self._pool_broken()
            else:
                future.add_done_callback(self._wake)
                self._jobs.append((future, entries, series.parts, instances))
                return
        self._finish_sr(instances, lambda: _encode_sr(entries, self.provenance, series.parts))

    def _wake(self, _future: Any) -> None:
        with self._lock:
            self._lock.notify_all()

    def _pool_broken(self) -> None:
        if self._pool is not None:
            _LOG.warning("medge serve: the SR worker process stopped; building SRs in this process from now on")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _reap_jobs(self) -> None:
        """Put the SRs the pool finished into the outbox."""
        waiting = []
        for job in self._jobs:
            future, entries, number, instances = job
            if not future.done():
                waiting.append(job)
                continue
            try:
                encoded = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                self._pool_broken()
                self._finish_sr(instances, lambda e=entries, n=number: _encode_sr(e, self.provenance, n))
                continue
            except BaseException as exc:  # noqa: BLE001 - a MedgeError from build_sr, or a bug in it
                self._finish_sr(instances, None, exc)
                continue
            self._finish_sr(instances, lambda e=encoded: e)
        self._jobs = waiting

    def _finish_sr(self, instances: list, encode, error: Optional[BaseException] = None) -> None:
        if error is None:
            try:
                uid, data = encode()
                meta = {"kind": "sr", "sop_instance_uid": uid, "instances": [i.uid for i in instances],
                        "received": [i.received_wall for i in instances]}
                path = self.outbox.put(data, meta)
            except MedgeError as exc:
                error = exc
        if error is not None:
            self.metrics.failed.labels("write").inc(len(instances))
            with self._lock:
                self._finished += len(instances)
            message = str(error) if isinstance(error, MedgeError) else f"a bug: {type(error).__name__}"
            _LOG.error("medge serve: the SR for %d instances could not be written: %s", len(instances), message)
            return
        _LOG.debug("medge serve: SR for %d instances in the outbox", len(instances))
        self._after_put(path, meta)

    def _after_put(self, path: Path, meta: dict) -> None:
        if self.forward is None:
            # No destination: the results folder is where results end; written is delivered.
            self._delivered(path, meta)
            self.outbox._forget(path)
            path.with_suffix(".json").unlink(missing_ok=True)
            self._update_outbox_gauges()
            return
        self._update_outbox_gauges()
        with self._send_wakeup:
            self._send_wakeup.notify_all()

    def _update_outbox_gauges(self) -> None:
        self.metrics.outbox_files.set(self.outbox.files)
        self.metrics.outbox_bytes.set(self.outbox.bytes)

    # ------------------------------------------------------------------------------------------ delivering

    def _delivered(self, path: Path, meta: dict) -> None:
        kind = meta.get("kind", "result")
        self.metrics.forwarded.labels(kind).inc()
        if kind == "sr":
            now = time.time()
            received = meta.get("received") or []
            for when in received:
                self.metrics.latency.observe(max(0.0, now - float(when)))
            with self._lock:
                self._finished += len(received)
        elif kind == "seg":
            latency = max(0.0, time.time() - float(meta.get("completed") or time.time()))
            self.metrics.series_latency.observe(latency)
            _LOG.info("medge serve: SEG of series %s delivered, %.0f ms after its last instance arrived",
                      meta.get("series_instance_uid"), latency * 1e3)
            with self._lock:
                self._finished += int(meta.get("accepted") or len(meta.get("instances") or []))

    def _deliver_main(self) -> None:
        """Send the outbox to the destination, oldest first, with backoff; until stopped and drained."""
        if self.forward is None:
            while self._deliver_deadline is None:
                with self._send_wakeup:
                    self._send_wakeup.wait(0.5)
            return
        backoff = 0.0
        next_try = 0.0
        unreachable_since: Optional[float] = None
        while True:
            deadline = self._deliver_deadline
            entries = self.outbox.entries()
            now = time.monotonic()
            if deadline is not None and self._results_done and (not entries or now >= deadline):
                return
            if not entries or now < next_try:
                wait = next_try - now if entries else 0.5
                if deadline is not None:
                    wait = min(wait, deadline - now)
                with self._send_wakeup:
                    self._send_wakeup.wait(max(0.01, wait))
                continue
            if self._send_batch():
                if unreachable_since is not None:
                    _LOG.info("medge serve: %s reachable again after %.1f s", self.forward,
                              time.monotonic() - unreachable_since)
                unreachable_since = None
                backoff = next_try = 0.0
            else:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                backoff = min(self.retry_max_s, max(self.retry_initial_s, backoff * 2))
                next_try = time.monotonic() + backoff

    def _send_batch(self) -> bool:
        """One association: send what is in the outbox (and arrives meanwhile). False: retry later."""
        from pynetdicom import AE

        from .._pydicom_quiet import quiet_pydicom
        from ..dicom_out import SC_SOP_CLASS_UID, SR_SOP_CLASS_UID

        ae = AE(ae_title=self.ae_title)
        ae.network_timeout = 30
        ae.acse_timeout = 15
        # A response lost anyway (see paused_requestor_reactor) costs this wait, then a retry (same SOP Instance UID).
        ae.dimse_timeout = 30
        ae.connection_timeout = 10
        for uid in (SEG_SOP_CLASS_UIDS if self.segmenting else (SR_SOP_CLASS_UID, SC_SOP_CLASS_UID)):
            ae.add_requested_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        destination = self.forward
        tls_args = (self.forward_tls, destination.host) if self.forward_tls is not None else None
        association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                   tls_args=tls_args)
        if not association.is_established:
            self.metrics.forward_failures.labels("connect").inc()
            _LOG.warning("medge serve: cannot associate with %s (%s); %d result files wait in the outbox",
                         destination, "rejected" if association.is_rejected else "unreachable or aborted",
                         self.outbox.files)
            return False
        try:
            idle_since = None
            while True:
                entries = self.outbox.entries()
                if not entries:
                    # Keep the association a moment for results about to arrive (setting one up costs more
                    # than a small SR's C-STORE), then release it.
                    if idle_since is None:
                        idle_since = time.monotonic()
                    if time.monotonic() - idle_since > _KEEP_ASSOCIATION_S or self._deliver_deadline is not None:
                        return True
                    with self._send_wakeup:
                        self._send_wakeup.wait(0.05)
                    continue
                idle_since = None
                for path in entries:
                    outcome = self._send_one(association, path, quiet_pydicom)
                    if outcome is False:
                        return False
                    if self._deliver_deadline is not None and time.monotonic() >= self._deliver_deadline:
                        return True
        finally:
            if association.is_established:
                association.release()
            ae.shutdown()

    def _send_one(self, association: Any, path: Path, quiet_pydicom) -> Optional[bool]:
        """True: delivered; None: set aside or retried later; False: the association is unusable."""
        meta = self.outbox.meta(path)
        try:
            with paused_requestor_reactor(association), quiet_pydicom("sending a result"):
                status = association.send_c_store(path)
        except Exception as exc:  # noqa: BLE001 - pynetdicom / pydicom raise many kinds
            if not association.is_established:
                self.metrics.forward_failures.labels("connect").inc()
                _LOG.warning("medge serve: sending to %s failed (%s)", self.forward, type(exc).__name__)
                return False
            # The association is fine, this file is not: no accepted presentation context (ValueError), or unreadable.
            self.metrics.forward_failures.labels("refused").inc()
            return self._permanent(path, meta, f"cannot be sent ({type(exc).__name__}: no accepted presentation "
                                               f"context, or the file is damaged)")
        code = getattr(status, "Status", None) if status is not None else None
        if code is None:  # no response: aborted, timed out
            self.metrics.forward_failures.labels("connect").inc()
            return False
        if code == 0 or 0xB000 <= code <= 0xBFFF:
            self._delivered(path, meta)
            self.outbox.remove(path)
            self._attempts.pop(path.name, None)
            self._update_outbox_gauges()
            return True
        self.metrics.forward_failures.labels("status").inc()
        if 0xA700 <= code <= 0xA7FF:
            _LOG.warning("medge serve: %s is out of resources (0x%04X); retrying later", self.forward, code)
            return False
        return self._permanent(path, meta, f"the destination answered 0x{code:04X}")

    def _permanent(self, path: Path, meta: dict, reason: str) -> Optional[bool]:
        attempts = self._attempts.get(path.name, 0) + 1
        self._attempts[path.name] = attempts
        if attempts < _PERMANENT_ATTEMPTS:
            _LOG.warning("medge serve: %s: %s (attempt %d of %d)", path.name, reason, attempts, _PERMANENT_ATTEMPTS)
            return False
        target = self.outbox.set_aside(path, reason)
        self._attempts.pop(path.name, None)
        if meta.get("kind") == "seg":
            self.metrics.series_failed.labels("deliver").inc()
            self.metrics.failed.labels("deliver").inc(len(meta.get("instances") or []))
            with self._lock:
                self._finished += int(meta.get("accepted") or len(meta.get("instances") or []))
        else:
            self.metrics.failed.labels("deliver").inc(len(meta.get("received") or []) or 0)
        if meta.get("kind") == "sr":
            with self._lock:
                self._finished += len(meta.get("received") or [])
        self._update_outbox_gauges()
        _LOG.error("medge serve: %s set aside as undeliverable (%s): %s", path.name, reason, target)
        return None


@contextlib.contextmanager
def paused_requestor_reactor(association: Any, timeout: float = 0.5) -> Iterator[None]:
    """Hold a pynetdicom requestor's reactor thread around one ``send_c_store`` so it cannot take the response.

    pynetdicom (3.0) pauses the reactor inside ``send_c_store`` by clearing an
    event and waiting for a flag the reactor sets *before* it blocks on that
    event; a reactor preempted between the two (a loaded machine) then reads
    the C-STORE response off the queue itself ("Received unexpected C-STORE
    service message") and the send waits for the DIMSE timeout. Clearing the
    event here and waiting until the reactor thread is really blocked on it
    closes that window. Uses pynetdicom and threading internals defensively:
    where they are missing, nothing is done (the caller's timeout and retry
    still hold). On leaving, the reactor runs again (``send_c_store`` releases
    it itself; an exception before its own pause would not).
    """
    checkpoint = getattr(association, "_reactor_checkpoint", None)
    condition = getattr(checkpoint, "_cond", None)
    if checkpoint is None or condition is None or not hasattr(condition, "_waiters"):
        yield
        return
    checkpoint.clear()
    try:
        deadline = time.monotonic() + timeout
        while not condition._waiters and association.is_established and time.monotonic() < deadline:
            time.sleep(0.0002)
        yield
    finally:
        checkpoint.set()


def _sr_worker_init() -> None:
    """In an SR worker process: nothing it logs reaches a terminal (the node logs outcomes itself)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the node stops us
    logging.getLogger().addHandler(logging.NullHandler())
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    import highdicom  # noqa: F401 - imported once, while the node starts

    from .. import dicom_out  # noqa: F401


def _sr_predictions(predictions: Any) -> list:
    """What an SR needs of each frame's Prediction, as plain Predictions (picklable; no heatmap)."""
    from ..dicom_out._common import frame_predictions
    from ..runtime.model import Prediction

    return [Prediction(scores=p.scores, label=p.label, index=int(p.index), sop_instance_uid=p.sop_instance_uid,
                       frame=int(getattr(p, "frame", 0) or 0), warnings=tuple(getattr(p, "warnings", ()) or ()))
            for p in frame_predictions(predictions)]


def _encode_sr(entries: list, provenance: Any, instance_number: int) -> tuple[str, bytes]:
    """(SOP Instance UID, DICOM file bytes) of the SR for ``entries``; runs in an SR worker or in the node."""
    from .._pydicom_quiet import quiet_pydicom
    from ..dicom_out import build_sr

    sr = build_sr(entries, provenance, instance_number=instance_number)
    buffer = io.BytesIO()
    with quiet_pydicom("encoding a DICOM SR"):
        sr.save_as(buffer, enforce_file_format=True)
    return str(sr.SOPInstanceUID), buffer.getvalue()


def _spool_name(uid: str) -> str:
    """A spool file name for an instance: its SOP Instance UID when it is a well-formed one (so an earlier
    run's spool is readable), else a hash of it."""
    if re.fullmatch(r"[0-9][0-9.]{0,63}", uid):
        return uid
    return "x" + hashlib.sha256(uid.encode()).hexdigest()[:40]


def _short(exc: BaseException) -> str:
    """A MedgeError's message for Error Comment (64 characters; the status code already says the kind)."""
    text = str(exc).replace("\n", " ")
    if isinstance(exc, OutsideEnvelope):
        text = text.replace("input outside the model's validated envelope: ", "").replace(
            "this model was validated on", "validated on")
    return text if len(text) <= 64 else text[:61] + "..."
