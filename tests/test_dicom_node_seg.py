"""medge serve with a segmentation bundle: series in by C-STORE, one DICOM SEG per series out, on loopback.

Senders are pynetdicom storage SCUs (``send`` of test_dicom_node); the
destination is a pynetdicom storage SCP that keeps every SEG it receives.
The bundle and the series are the session fixtures of the segmentation tests
(a small trained 3-D MONAI UNet; 24-slice 48x48 synthetic CT series, one of
them with a slice missing), so a full run converts nothing more for these
tests. Patient values are planted in every instance sent and must appear in
no log record.

What must hold: each complete series gets exactly one SEG, which highdicom
reads back with the mask ``model.segment(read_series(the same instances))``
gives in memory, referencing its source series; a gapped series gets none
and is counted failed while the others are delivered; nothing is lost while
the destination is down; a graceful stop segments what was accepted and
leaves the spool empty; ``medge serve`` does the same from the command line.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("pynetdicom", reason='pynetdicom is not installed: pip install "medge[serve]"')
pytest.importorskip("prometheus_client", reason='prometheus-client is not installed: pip install "medge[serve]"')
pytest.importorskip("onnxruntime", reason='onnxruntime is not installed: pip install "medge[convert]"')
hd = pytest.importorskip("highdicom", reason='highdicom is not installed: pip install "medge[dicom-out]"')

import pydicom  # noqa: E402

import medge  # noqa: E402

from .segmentation_fixtures import seg_bundle, seg_data  # noqa: E402,F401 - fixtures
from .test_dicom_node import free_port, send, until  # noqa: E402

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PLANTED = {"PatientName": "PLANTED^SEGSECRET", "PatientID": "PLANTED-SEG-4711", "PatientBirthDate": "19010203",
           "InstitutionName": "PLANTED-HOSPITAL", "AccessionNumber": "PLANTEDACC2"}


class SegSCP:
    """The destination: a pynetdicom storage SCP on 127.0.0.1 that keeps every Segmentation it receives."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.received: list = []
        self._lock = threading.Lock()
        self.server = None

    def start(self) -> "SegSCP":
        from pynetdicom import AE, evt

        ae = AE(ae_title="DEST")
        ae.add_supported_context(SEG_CLASS, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
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

    def segs(self) -> dict:
        """Source Series Instance UID -> the SEGs received for it (as highdicom Segmentations)."""
        with self._lock:
            received = list(self.received)
        out: dict = {}
        for ds in received:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            seg = hd.seg.segread(io.BytesIO(buffer.getvalue()))
            out.setdefault(str(ds.ReferencedSeriesSequence[0].SeriesInstanceUID), []).append(seg)
        return out


@pytest.fixture(scope="module")
def model(seg_bundle):
    with medge.load(seg_bundle.bundle_path, backend="onnxruntime") as loaded:
        yield loaded


@pytest.fixture(scope="module")
def series(seg_data):
    """name -> the instances of that deploy series as pydicom Datasets, patient values planted."""
    root, _ = seg_data
    out = {}
    for name in ("one", "two", "gapped"):
        datasets = []
        for path in sorted((root / "deploy" / name).glob("*.dcm")):
            ds = pydicom.dcmread(path)
            for keyword, value in PLANTED.items():
                setattr(ds, keyword, value)
            datasets.append(ds)
        out[name] = datasets
    return out


@pytest.fixture
def node_factory(model, tmp_path):
    from medge.serve.dicom_node import DicomNode

    made = []

    def make(**kwargs):
        kwargs.setdefault("spool", tmp_path / "spool")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("settle_s", 0.2)
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
        scp = SegSCP(**kwargs).start()
        scps.append(scp)
        return scp

    yield make
    for scp in scps:
        scp.stop()


def uid_of(datasets) -> str:
    return str(datasets[0].SeriesInstanceUID)


def assert_seg_matches(seg, datasets, model) -> None:
    """The SEG references ``datasets``' series and instances and holds the mask segmenting them in memory gives."""
    volume = medge.read_series([copy.deepcopy(ds) for ds in datasets])
    expected = model.segment(volume).label_map
    assert expected.any() and not expected.all()  # a mask with both labels: the comparison means something
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == uid_of(datasets)
    decoded = seg.get_pixels_by_source_instance(list(volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(decoded, expected)
    assert seg.SegmentSequence[0].SegmentLabel == "sphere"
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != uid_of(datasets)


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_dicom_node.py"
    spec = importlib.util.spec_from_file_location("bench_dicom_node", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def spooled_files(node) -> list:
    return [p for p in (node.spool / "series").rglob("*") if p.is_file()] if (node.spool / "series").exists() else []


def test_two_series_over_two_associations_give_exactly_two_segs(node_factory, destination, series, model, caplog):
    caplog.set_level(logging.DEBUG)
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", metrics_port=0)
    assert node.segmenting and "1.2.840.10008.5.1.4.1.1.2" in node.sop_classes  # CT Image Storage: the envelope
    statuses: dict = {}
    senders = [threading.Thread(target=lambda n=n: statuses.__setitem__(n, send(node.port, series[n])))
               for n in ("one", "two")]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    assert statuses == {"one": [0] * 24, "two": [0] * 24}
    assert node.wait_idle(60)
    segs = dest.segs()
    assert sorted(segs) == sorted(uid_of(series[n]) for n in ("one", "two"))
    for name in ("one", "two"):
        assert len(segs[uid_of(series[name])]) == 1
        assert_seg_matches(segs[uid_of(series[name])][0], series[name], model)
    stats = node.stats()
    assert stats["received"] == 48 and stats["segmented_series"] == 2 and stats["delivered_series"] == 2
    assert stats["forwarded"] == {"seg": 2}
    assert not any(stats["failed_series"].values()) and spooled_files(node) == []
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
    assert re.search(r"^medge_dicom_segmented_series_total 2\.0$", text, re.MULTILINE)
    assert re.search(r"^medge_dicom_series_latency_seconds_count 2\.0$", text, re.MULTILINE)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "segmented: 24 instances" in logged
    assert "PLANTED" not in logged
    # highdicom, building the SEG in the node's process, logs source attributes at INFO: kept out.
    assert not [r for r in caplog.records if r.name.startswith("highdicom") and r.levelno < logging.WARNING]
    # tools/bench_dicom_node.py --series reads its stage times from these lines: they must still parse.
    bench = _bench_module()
    assert len(bench._SEGMENTED.findall(logged)) == 2 and len(bench._DELIVERED.findall(logged)) == 2


def test_a_series_with_a_missing_slice_gets_no_seg_and_the_other_still_does(node_factory, destination, series,
                                                                             model, caplog):
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST")
    # Both series in one association: the gapped one must not hold up or spoil the other.
    assert send(node.port, series["gapped"] + series["one"]) == [0] * (23 + 24)
    assert node.wait_idle(60)
    segs = dest.segs()
    assert list(segs) == [uid_of(series["one"])] and len(segs[uid_of(series["one"])]) == 1
    assert_seg_matches(segs[uid_of(series["one"])][0], series["one"], model)
    stats = node.stats()
    assert stats["failed_series"] == {"read": 1, "segment": 0, "write": 0, "deliver": 0}
    assert stats["failed"]["segment"] == 23 and stats["segmented_series"] == 1
    assert spooled_files(node) == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"series {uid_of(series['gapped'])} (23 instances) gets no SEG" in logged and "missing" in logged
    assert "PLANTED" not in logged
    # The failed series' instances may be sent again (complete, this time): they are not taken for duplicates.
    assert send(node.port, series["gapped"][:1]) == [0]
    assert node.stats()["duplicates"] == 0


def test_destination_down_then_up_loses_nothing(node_factory, destination, series, model):
    port = free_port()
    node = node_factory(forward=f"127.0.0.1:{port}:DEST", retry_initial_s=0.05, retry_max_s=0.3)
    assert send(node.port, series["one"]) == [0] * 24
    until(lambda: node.stats()["forward_failures"] >= 2 and node.outbox.files == 1, 60, "failed deliveries")
    dest = destination(port=port)
    assert send(node.port, series["two"]) == [0] * 24
    assert node.wait_idle(60)
    segs = dest.segs()
    assert sorted(segs) == sorted(uid_of(series[n]) for n in ("one", "two"))
    assert all(len(v) == 1 for v in segs.values())
    assert_seg_matches(segs[uid_of(series["one"])][0], series["one"], model)
    assert node.outbox.files == 0 and node.stats()["delivered_series"] == 2


def test_stop_segments_what_was_accepted_and_cleans_the_spool(node_factory, destination, series, model):
    dest = destination()
    # Without the stop nothing would be segmented for a minute (settle and idle times).
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", series_idle_s=60, settle_s=60)
    assert send(node.port, series["two"]) == [0] * 24
    assert len(spooled_files(node)) == 24 + 1  # the instances and the series' key file
    assert dest.segs() == {} and node.stats()["segmented_series"] == 0
    stats = node.stop(grace_s=5, deliver_timeout_s=30)
    assert stats["segmented_series"] == 1 and stats["delivered_series"] == 1 and stats["outbox_files"] == 0
    segs = dest.segs()
    assert list(segs) == [uid_of(series["two"])]
    assert_seg_matches(segs[uid_of(series["two"])][0], series["two"], model)
    assert spooled_files(node) == [] and not any((node.spool / "series").iterdir())


def test_instances_received_twice_are_one_slice_of_one_seg(node_factory, destination, series, model):
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", duplicate_window_s=0)  # no duplicate detection
    assert send(node.port, series["one"] + series["one"][:5]) == [0] * 29
    assert node.wait_idle(60)  # every acknowledgement settled, although 5 were the same instances again
    segs = dest.segs()
    assert list(segs) == [uid_of(series["one"])] and len(segs[uid_of(series["one"])]) == 1
    assert_seg_matches(segs[uid_of(series["one"])][0], series["one"], model)


def test_without_forward_the_seg_is_written_to_the_spool(node_factory, series, model):
    node = node_factory()
    assert send(node.port, series["two"]) == [0] * 24
    assert node.wait_idle(60)
    written = sorted((node.spool / "results").glob("*.dcm"))
    assert len(written) == 1 and not list((node.spool / "results").glob("*.json"))
    assert_seg_matches(hd.seg.segread(written[0]), series["two"], model)
    assert node.stats()["delivered_series"] == 1 and spooled_files(node) == []


def test_a_series_spooled_before_a_crash_is_segmented_at_the_next_start(node_factory, destination, series, model,
                                                                        tmp_path):
    import json

    spool = tmp_path / "spool"
    folder = spool / "series" / "00000000000000000001-000000"
    folder.mkdir(parents=True)
    for ds in series["one"]:
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    (folder / "series.json").write_text(json.dumps({"study_instance_uid": str(series["one"][0].StudyInstanceUID),
                                                    "series_instance_uid": uid_of(series["one"])}))
    (folder / "half-written.dcm.partial").write_bytes(b"DICM")
    dest = destination()
    node = node_factory(forward=f"127.0.0.1:{dest.port}:DEST", spool=spool)
    assert node.wait_idle(60)
    segs = dest.segs()
    assert list(segs) == [uid_of(series["one"])]
    assert_seg_matches(segs[uid_of(series["one"])][0], series["one"], model)
    assert spooled_files(node) == []


def test_medge_serve_on_a_segmentation_bundle(seg_bundle, destination, series, tmp_path):
    """The real command: a series sent, SIGTERM, its SEG delivered; exit 0; no patient value on stderr."""
    dest = destination()
    command = [sys.executable, "-m", "medge", "serve", str(seg_bundle.bundle_path), "--port", "0", "--forward",
               f"127.0.0.1:{dest.port}:DEST", "--spool", str(tmp_path / "spool"), "--metrics-port", "0",
               "--series-idle", "30", "--backend", "onnxruntime", "--device", "cpu", "--log-level", "debug"]
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
        assert ready.wait(90), "".join(lines)
        port = int(re.search(r"ready on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        assert send(port, series["one"]) == [0] * 24
        process.send_signal(signal.SIGTERM)  # the series may be being segmented or not yet due: either way
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(5)
    output = "".join(lines)
    assert list(dest.segs()) == [uid_of(series["one"])], output
    assert "24 received, 1 series segmented, 0 failed, 1 SEGs delivered, 0 result files left" in output
    assert "PLANTED" not in output
    assert not any((tmp_path / "spool" / "series").iterdir())
