"""medge serve's DICOM node on loopback, against real pynetdicom peers.

Senders are pynetdicom storage SCUs; the destination is a pynetdicom storage
SCP that records what it receives. Instances are 64x64 synthetic CT slices
with planted patient values (test_dicom_out.PLANTED), cloned with new SOP
Instance UIDs so that hundreds cost no pixel generation. The bundle is the
tiny classifier of test_dicom_out.

What must hold: every accepted instance's result reaches the destination in
exactly one SR; a corrupt instance is refused alone (the others of its
association are not affected); nothing accepted is lost while the destination
is down, nor across a restart; TLS associations work and a plain one to the
TLS port fails without harming the node; SIGTERM drains; no log record (nor
the medge serve process's stderr) carries a patient value.
"""

from __future__ import annotations

import collections
import copy
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

pytest.importorskip("pynetdicom", reason='pynetdicom is not installed: pip install "medge[serve]"')
pytest.importorskip("prometheus_client", reason='prometheus-client is not installed: pip install "medge[serve]"')

from pydicom.uid import generate_uid  # noqa: E402

from medge.errors import MedgeError  # noqa: E402

from .test_dicom_out import MARKER, clone, hd, model, planted_ct, sr_references, tiny_bundle  # noqa: E402,F401

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


# ---------------------------------------------------------------------------------------------- peers


class StorageSCP:
    """The destination: a pynetdicom storage SCP on 127.0.0.1 that keeps every data set it receives."""

    def __init__(self, port: int = 0, ssl_context=None) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self.received: list = []
        self._lock = threading.Lock()
        self.server = None

    def start(self) -> "StorageSCP":
        from pynetdicom import AE, evt

        ae = AE(ae_title="DEST")
        for uid in (SR_CLASS, SC_CLASS):
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=self.ssl_context,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]
        return self

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def srs(self) -> list:
        """The SRs received, once per SOP Instance UID (a resent result is the same instance, as in a PACS)."""
        with self._lock:
            unique = {str(ds.SOPInstanceUID): ds for ds in self.received if ds.SOPClassUID == SR_CLASS}
        return list(unique.values())

    def referenced(self) -> collections.Counter:
        """How often each source instance is referenced by the SRs received."""
        return collections.Counter(uid for sr in self.srs() for uid, _ in sr_references(sr))


def send(port: int, datasets, *, tls=None, contexts=None, answers: bool = False, keep_open: bool = False):
    """C-STORE ``datasets`` as a storage SCU does; returns each response's status (``answers``: the response
    data sets; ``keep_open``: also the last association, not released).

    pynetdicom's requestor can lose a C-STORE response to its own reactor
    thread (a check-then-act race in ``send_c_store``, seen under heavy CPU
    load as "Received unexpected C-STORE service message"; see
    ``paused_requestor_reactor``, used here as medge serve's sender uses it).
    Should a response be lost anyway, this sender, like a real SCU, associates
    again and resends from the unanswered instance; medge serve acknowledges
    an instance it already accepted without a second result.
    """
    from pynetdicom import AE, StoragePresentationContexts

    from medge.serve.dicom_node import paused_requestor_reactor

    ae = AE(ae_title="SENDER")
    ae.requested_contexts = contexts or StoragePresentationContexts
    ae.dimse_timeout = 20
    responses: list = []
    attempts = 0
    association = None
    while len(responses) < len(datasets) or association is None:
        attempts += 1
        assert attempts <= 5, f"no answer after {attempts - 1} associations"
        association = ae.associate("127.0.0.1", port, ae_title="MEDGE", tls_args=tls)
        assert association.is_established
        for ds in datasets[len(responses):]:
            with paused_requestor_reactor(association):
                answer = association.send_c_store(ds)
            if answer is None or "Status" not in answer:
                break  # lost response or aborted association: resend it on a new one
            responses.append(answer)
        if len(responses) < len(datasets) and association.is_established:
            association.abort()
    if association.is_established and not keep_open:
        association.release()
    result = responses if answers else [int(a.Status) for a in responses]
    return (result, association) if keep_open else result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def metrics(node) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in the metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def base_slices():
    """Four distinct 64x64 slices (two with a nodule) to clone instances from."""
    study = generate_uid()
    return [planted_ct(seed, series=generate_uid(), study=study) for seed in range(4)]


def instances(base_slices, count: int, *, series: str, start: int = 0) -> list:
    return [clone(base_slices[i % len(base_slices)], number=start + i + 1, series=series) for i in range(count)]


@pytest.fixture
def node_factory(model, tmp_path):
    """Make DicomNodes on free ports with a per-test spool; every one is stopped at the end."""
    from medge.serve.dicom_node import DicomNode

    made = []

    def make(**kwargs):
        kwargs.setdefault("spool", tmp_path / "spool")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("settle_s", 0.2)
        kwargs.setdefault("sr_workers", 0)  # SRs in-process: no worker start per test (the main test uses them)
        node = DicomNode(model, **kwargs).start()
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop(grace_s=1, deliver_timeout_s=1)


@pytest.fixture
def destination():
    scps = []

    def make(**kwargs):
        scp = StorageSCP(**kwargs).start()
        scps.append(scp)
        return scp

    yield make
    for scp in scps:
        scp.stop()


# ---------------------------------------------------------------------------------------------- the main path


def test_four_associations_500_instances_each_result_arrives_once(node_factory, destination, base_slices, caplog):
    """4 concurrent associations, 500 instances (one corrupt): 499 results exactly once, the corrupt one refused."""
    caplog.set_level(logging.DEBUG)
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", metrics_port=0, sr_workers=None)  # default workers
    series = [generate_uid(), generate_uid()]  # two associations feed each series at the same time
    batches = [instances(base_slices, 125, series=series[k % 2], start=125 * k) for k in range(4)]
    corrupt = batches[2][60]
    corrupt.PixelData = corrupt.PixelData[:100]
    statuses: dict = {}

    def sender(k):
        statuses[k] = send(node.port, batches[k])

    started = time.perf_counter()
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    sent = time.perf_counter()
    assert node.wait_idle(120)
    elapsed, drained = sent - started, time.perf_counter() - started
    for k in range(4):
        expected = [0xC210 if (k, i) == (2, 60) else 0x0000 for i in range(125)]
        assert statuses[k] == expected
    valid = {str(ds.SOPInstanceUID) for batch in batches for ds in batch if ds is not corrupt}
    counts = dest.referenced()
    assert set(counts) == valid and set(counts.values()) == {1}  # every result exactly once, nothing else
    for sr in dest.srs():  # one source series per SR, patient taken from the source
        assert sr.PatientName == "PLANTED^SECRETNAME"
        refs = {uid for uid, _ in sr_references(sr)}
        assert len({str(ds.SeriesInstanceUID) for b in batches for ds in b if str(ds.SOPInstanceUID) in refs}) == 1
    text = metrics(node)
    assert metric(text, "medge_dicom_received_total") == 499
    assert metric(text, 'medge_dicom_refused_total{reason="unreadable"}') == 1
    assert metric(text, "medge_dicom_predicted_total") == 499
    assert metric(text, 'medge_dicom_forwarded_total{kind="sr"}') == len(dest.srs())
    assert metric(text, "medge_dicom_latency_seconds_count") == 499
    assert metric(text, "medge_dicom_prediction_latency_seconds_count") == 499
    assert metric(text, "medge_dicom_outbox_files") == 0
    assert "medge_dicom_latency_seconds_bucket" in text
    print(f"\n500 instances over 4 associations: sent in {elapsed:.1f} s, all results delivered after {drained:.1f} s,"
          f" {len(dest.srs())} SRs")
    assert MARKER not in caplog.text
    assert "SECRETNAME" not in caplog.text


def test_an_instance_sent_again_gets_one_result(node_factory, destination, base_slices):
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST")
    batch = instances(base_slices, 3, series=generate_uid())
    assert send(node.port, batch) == [0] * 3
    assert send(node.port, batch[1:2]) == [0]  # a sender that missed the answer sends it again
    assert node.wait_idle(30)
    counts = collections.Counter(uid for ds in dest.received if ds.SOPClassUID == SR_CLASS
                                 for uid, _ in sr_references(ds))
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in batch} and set(counts.values()) == {1}
    assert node.stats()["duplicates"] == 1 and node.stats()["received"] == 3


def test_one_sr_per_instance_at_once(node_factory, destination, base_slices):
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", max_per_sr=1)
    batch = instances(base_slices, 6, series=generate_uid())
    assert send(node.port, batch) == [0] * 6
    assert node.wait_idle(30)
    assert len(dest.srs()) == 6 and set(dest.referenced().values()) == {1}


def test_a_dead_sr_worker_is_replaced_by_building_in_process(node_factory, destination, base_slices, caplog):
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", max_per_sr=1, sr_workers=1)
    batch = instances(base_slices, 5, series=generate_uid())
    assert send(node.port, batch[:2]) == [0, 0]
    assert node.wait_idle(60)
    for process in list(node._pool._processes.values()):
        process.kill()
    assert send(node.port, batch[2:]) == [0, 0, 0]
    assert node.wait_idle(60)
    counts = dest.referenced()
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in batch} and set(counts.values()) == {1}
    assert "building SRs in this process" in caplog.text


def test_overlays_are_sent_for_heatmaps(node_factory, destination, base_slices, model, monkeypatch):
    """When predictions carry a heatmap, a Secondary Capture per image goes out with the SR."""
    import numpy as np

    from .test_dicom_out import with_heatmap

    original = model.predict_each

    def predict_with_maps(items, **kwargs):
        out = original(items, **kwargs)
        return [[with_heatmap(p, np.full((64, 64), 0.5, np.float32)) for p in r] if isinstance(r, list) else r
                for r in out]

    monkeypatch.setattr(model, "predict_each", predict_with_maps)
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST")
    batch = instances(base_slices, 3, series=generate_uid())
    assert send(node.port, batch) == [0] * 3
    assert node.wait_idle(30)
    overlays = [ds for ds in dest.received if ds.SOPClassUID == SC_CLASS]
    assert sorted(o.SourceImageSequence[0].ReferencedSOPInstanceUID for o in overlays) == sorted(
        str(ds.SOPInstanceUID) for ds in batch)
    assert node.stats()["forwarded"] == {"sr": 1, "overlay": 3}


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals_at_association_and_per_instance(node_factory, base_slices):
    from pynetdicom import build_context
    from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification

    from medge.synthetic import monochrome1_cr

    node = node_factory()
    from pynetdicom import AE

    ae = AE(ae_title="SENDER")
    for uid in (Verification, CTImageStorage, ComputedRadiographyImageStorage):
        ae.add_requested_context(uid)
    association = ae.associate("127.0.0.1", node.port, ae_title="MEDGE")
    assert association.is_established
    accepted = {str(c.abstract_syntax) for c in association.accepted_contexts}
    assert str(CTImageStorage) in accepted and str(ComputedRadiographyImageStorage) not in accepted  # CT-only bundle
    assert association.send_c_echo().Status == 0
    with pytest.raises(ValueError, match="presentation context"):
        association.send_c_store(monochrome1_cr())
    good = instances(base_slices, 3, series=generate_uid())
    other_modality = copy.deepcopy(good[1])
    other_modality.Modality = "MR"  # a CT Image Storage object that says MR: outside the envelope
    from medge.synthetic import ct_slice

    bigger = ct_slice(seed=9, size=128, lesion=False)  # 128 rows: the model was validated on 64
    association.release()
    answers = send(node.port, [good[0], other_modality, bigger, good[2]], answers=True)
    assert [int(a.Status) for a in answers] == [0x0000, 0xC211, 0xC211, 0x0000]
    assert "modality MR" in answers[1].ErrorComment and len(answers[1].ErrorComment) <= 64
    assert "128 rows" in answers[2].ErrorComment
    assert node.stats()["refused"]["outside_envelope"] == 2
    assert build_context(CTImageStorage)  # pynetdicom import sanity


def test_sop_class_not_matching_its_context_is_refused(node_factory, base_slices):
    """0xA900 when the data set's SOP Class UID is not the presentation context's (a lying sender)."""
    from types import SimpleNamespace

    node = node_factory()
    ds = copy.deepcopy(base_slices[0])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage, sent in a CT context
    event = SimpleNamespace(dataset=ds, file_meta=ds.file_meta, assoc=SimpleNamespace(),
                            context=SimpleNamespace(abstract_syntax="1.2.840.10008.5.1.4.1.1.2"))
    answer = node._on_store(event)
    assert answer.Status == 0xA900


def test_a_full_outbox_refuses_new_instances_instead_of_losing_them(node_factory, base_slices):
    node = node_factory(forward=f"127.0.0.1:{free_port()}:DEST", outbox_max_files=1, max_per_sr=1,
                        retry_initial_s=5, retry_max_s=5)
    batch = instances(base_slices, 2, series=generate_uid())
    assert send(node.port, batch[:1]) == [0]
    until(lambda: node.outbox.files == 1, 10, "the first result in the outbox")
    assert send(node.port, batch[1:]) == [0xA700]
    assert node.stats()["refused"]["busy"] == 1 and node.stats()["received"] == 1


# ---------------------------------------------------------------------------------------------- delivery


def test_destination_down_then_up_loses_nothing(node_factory, destination, base_slices):
    port = free_port()
    node = node_factory(forward=f"127.0.0.1:{port}:DEST", retry_initial_s=0.05, retry_max_s=0.3)
    batch = instances(base_slices, 30, series=generate_uid())
    assert send(node.port, batch[:20]) == [0] * 20  # accepted while the destination is down
    until(lambda: node.stats()["forward_failures"] >= 3 and node.outbox.files >= 1, 20, "failed deliveries")
    dest = destination(port=port)
    assert send(node.port, batch[20:]) == [0] * 10
    assert node.wait_idle(30)
    counts = dest.referenced()
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in batch} and set(counts.values()) == {1}


def test_results_left_in_the_outbox_at_stop_go_out_at_the_next_start(model, tmp_path, destination, base_slices):
    from medge.serve.dicom_node import DicomNode

    port = free_port()
    spool = tmp_path / "spool"
    first = DicomNode(model, port=0, forward=f"127.0.0.1:{port}:DEST", spool=spool, settle_s=0.1, sr_workers=0,
                      retry_initial_s=0.05, retry_max_s=0.2).start()
    batch = instances(base_slices, 8, series=generate_uid())
    assert send(first.port, batch) == [0] * 8
    stats = first.stop(grace_s=1, deliver_timeout_s=0.5)  # destination still down
    assert stats["received"] == 8 and stats["outbox_files"] >= 1
    dest = destination(port=port)
    second = DicomNode(model, port=0, forward=f"127.0.0.1:{port}:DEST", spool=spool, sr_workers=0).start()
    try:
        assert second.wait_idle(30)
    finally:
        second.stop()
    counts = dest.referenced()
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in batch} and set(counts.values()) == {1}


def test_without_forward_results_are_written_to_the_spool(node_factory, base_slices, tmp_path):
    node = node_factory(spool=tmp_path / "spool")
    batch = instances(base_slices, 4, series=generate_uid())
    assert send(node.port, batch) == [0] * 4
    assert node.wait_idle(30)
    files = list((tmp_path / "spool" / "results").glob("*.dcm"))
    assert len(files) == 1 and not list((tmp_path / "spool" / "results").glob("*.json"))


# ---------------------------------------------------------------------------------------------- TLS


def test_tls_association_works_and_a_plain_one_fails_cleanly(node_factory, destination, base_slices, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from medge.serve.dicom_node import client_tls_context, make_self_signed_certificate, server_tls_context

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed_certificate(cert, key, hosts=("localhost", "127.0.0.1"))
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    dest = destination(ssl_context=server_tls_context(cert, key))  # the destination speaks TLS too
    node = node_factory(ssl_context=server_tls_context(cert, key), forward=f"127.0.0.1:{dest.port}:DEST",
                        forward_tls=client_tls_context(cert))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    batch = instances(base_slices, 3, series=generate_uid())
    assert send(node.port, batch[:2], tls=(client, "localhost")) == [0, 0]

    ae = AE(ae_title="PLAIN")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    started = time.monotonic()
    plain = ae.associate("127.0.0.1", node.port, ae_title="MEDGE")
    assert not plain.is_established and time.monotonic() - started < 5  # refused at the handshake, no hang

    assert send(node.port, batch[2:], tls=(client, "localhost")) == [0]  # the node is unharmed
    assert node.wait_idle(30)
    assert set(dest.referenced()) == {str(ds.SOPInstanceUID) for ds in batch}
    assert node.stats()["received"] == 3


def test_a_silent_client_on_the_tls_port_does_not_block_others(node_factory, base_slices, tmp_path):
    """pynetdicom handshakes in its accept loop: medge's server context gives up on a client that says nothing."""
    from medge.serve.dicom_node import make_self_signed_certificate, server_tls_context

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make_self_signed_certificate(cert, key)
    context = server_tls_context(cert, key)
    context.handshake_timeout_s = 1.0
    node = node_factory(ssl_context=context)
    silent = socket.create_connection(("127.0.0.1", node.port))  # connects, never speaks
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        started = time.monotonic()
        assert send(node.port, instances(base_slices, 1, series=generate_uid()), tls=(client, "localhost")) == [0]
        assert time.monotonic() - started < 10
    finally:
        silent.close()


# ---------------------------------------------------------------------------------------------- the command


def test_medge_serve_drains_on_sigterm(tiny_bundle, destination, base_slices, tmp_path):
    """The real command: results of everything accepted are delivered after SIGTERM; exit 0; no patient value."""
    dest = destination()
    command = [sys.executable, "-m", "medge", "serve", str(tiny_bundle), "--port", "0", "--host", "127.0.0.1",
               "--forward", f"127.0.0.1:{dest.port}:DEST", "--spool", str(tmp_path / "spool"), "--metrics-port",
               str(free_port()), "--series-idle", "30", "--device", "cpu", "--log-level", "debug"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list = []
    ready = threading.Event()

    def read():
        for line in process.stderr:
            lines.append(line)
            if "ready on" in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "".join(lines)
        ready_line = next(line for line in lines if "ready on" in line)
        port = int(re.search(r"ready on 127\.0\.0\.1:(\d+)", ready_line).group(1))
        metrics_port = int(re.search(r"metrics on 127\.0\.0\.1:(\d+)", ready_line).group(1))
        batch = instances(base_slices, 40, series=generate_uid())
        statuses, association = send(port, batch, keep_open=True)
        assert statuses == [0] * 40
        # The association stays open and --series-idle is 30 s: nothing would be written yet without SIGTERM.
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert metric(text, "medge_dicom_received_total") == 40
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        association.release()
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
    output = "".join(lines)
    counts = dest.referenced()
    assert set(counts) == {str(ds.SOPInstanceUID) for ds in batch} and set(counts.values()) == {1}, output
    assert "40 received, 40 predicted, 40 results delivered, 0 result files left" in output
    assert MARKER not in output and "SECRETNAME" not in output


def test_serve_user_errors_exit_2_before_loading(tiny_bundle, capsys, tmp_path):
    from medge.cli.main import main

    for argv, message in (
        (["--forward", "pacs:104"], "HOST:PORT:AE"),
        (["--forward", "pacs:104:AN_AE_TITLE_LONGER_THAN_16"], "HOST:PORT:AE"),
        (["--tls-cert", str(tmp_path / "c.pem")], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")], "cannot use the TLS"),
        (["--forward-tls-ca", str(tmp_path / "ca.pem")], "--forward-tls-ca needs --forward"),
        (["--sr-max-instances", "0"], "must be positive"),
    ):
        assert main(["serve", str(tmp_path / "missing.medge"), *argv]) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pieces


def test_destination_parsing():
    from medge.serve.dicom_node import Destination

    assert Destination.parse("pacs.local:104:PACS") == Destination("pacs.local", 104, "PACS")
    assert Destination.parse("[::1]:11112:DEST") == Destination("::1", 11112, "DEST")
    for bad in ("pacs:104", "pacs:0:PACS", "pacs:x:PACS", ":104:PACS", "pacs:104:", "pacs:104:A\\B"):
        with pytest.raises(MedgeError):
            Destination.parse(bad)


def test_sop_classes_follow_the_envelope():
    from types import SimpleNamespace

    from medge.serve.dicom_node import allowed_sop_classes

    ct = allowed_sop_classes(SimpleNamespace(modalities=frozenset({"CT"})))
    assert ct[0] == "1.2.840.10008.5.1.4.1.1.2" and len(ct) == 3
    everything = allowed_sop_classes(None)
    assert set(ct) < set(everything) and "1.2.840.10008.5.1.4.1.1.1" in everything  # CR among them


def test_pynetdicom_records_are_dropped_or_scrubbed():
    from medge.serve.dicom_node import _PynetdicomLogFilter

    keep = _PynetdicomLogFilter()
    info = logging.LogRecord("pynetdicom.dsutils", logging.INFO, __file__, 1, "value %s", ("PLANTED^X",), None)
    assert not keep.filter(info)
    warning = logging.LogRecord("pynetdicom.dsutils", logging.ERROR, __file__, 1, "bad %s", ("PLANTED^X",), None)
    assert keep.filter(warning) and MARKER not in warning.getMessage()
    network = logging.LogRecord("pynetdicom.transport", logging.WARNING, __file__, 1, "connection refused", (), None)
    assert keep.filter(network) and network.getMessage() == "connection refused"  # network layers pass as they are
    try:
        raise ValueError("Invalid value for VR PN: 'PLANTED^X'")
    except ValueError as exc:
        decoding = logging.LogRecord("pynetdicom.association", logging.ERROR, __file__, 1, exc, (), sys.exc_info())
    assert keep.filter(decoding) and MARKER not in decoding.getMessage() and decoding.exc_info is None


def test_paused_requestor_reactor_closes_pynetdicoms_response_race():
    """A fake requestor with pynetdicom 3.0's reactor loop and send_c_store pause, the reactor preempted between
    its wait and its flag: without the extra pause it steals responses, with it none."""
    import queue

    from medge.serve.dicom_node import paused_requestor_reactor

    class Requestor:
        is_established = True

        def __init__(self):
            self._reactor_checkpoint = threading.Event()
            self._reactor_checkpoint.set()
            self._is_paused = False
            self.responses: queue.Queue = queue.Queue()
            self.stolen = 0
            self.running = True

        def reactor(self):  # association.py _run_reactor, with the preemption made long
            while self.running:
                time.sleep(0.001)
                self._is_paused = True
                self._reactor_checkpoint.wait()
                time.sleep(0.004)  # preempted here
                self._is_paused = False
                try:
                    self.responses.get_nowait()
                    self.stolen += 1  # "Received unexpected C-STORE service message"
                except queue.Empty:
                    pass

        def send_c_store(self):  # association.py send_c_store: pause, send; the answer is queued before it waits
            self._reactor_checkpoint.clear()
            while not self._is_paused:
                time.sleep(0.0001)
            self.responses.put("C-STORE-RSP")  # a fast peer on loopback
            time.sleep(0.003)  # this thread preempted before it waits for the answer
            try:
                answer = self.responses.get(timeout=0.02)
            except queue.Empty:
                answer = None
            self._reactor_checkpoint.set()
            return answer

    def run(paused: bool) -> int:
        requestor = Requestor()
        thread = threading.Thread(target=requestor.reactor, daemon=True)
        thread.start()
        for _ in range(40):
            time.sleep(0.003)
            if paused:
                with paused_requestor_reactor(requestor):
                    requestor.send_c_store()
            else:
                requestor.send_c_store()
        requestor.running = False
        requestor._reactor_checkpoint.set()
        thread.join(5)
        return requestor.stolen

    assert run(paused=False) > 0
    assert run(paused=True) == 0


def test_node_refuses_a_task_without_dicom_results(model, tmp_path, monkeypatch):
    from medge.serve.dicom_node import DicomNode

    class Other:  # segmentation has its writer (tests/test_dicom_node_seg.py); detection has none
        manifest = {"task": {"kind": "detection"}}

    with pytest.raises(MedgeError, match="classification"):
        DicomNode(Other(), spool=tmp_path)
