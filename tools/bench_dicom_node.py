#!/usr/bin/env python3
"""medge serve throughput and latency, C-STORE in to result delivered, on loopback.

The node is the real command (``python -m medge serve BUNDLE``) in its own
process, as deployed. This script plays the scanner and the PACS: pynetdicom
storage SCUs (one association per series, ``--associations`` at once, as
modalities send) and a pynetdicom storage SCP as the ``--forward``
destination, recording when each SR arrives and which instances it reports.

Per instance, latency = from the moment its C-STORE request is issued to the
moment the destination has received the SR that carries its result (an upper
bound of "received by medge serve -> result delivered": on loopback the
transfer of a 64 KiB or 512 KiB instance takes well under a millisecond).
Throughput = instances / (first C-STORE issued -> last SR received).

Two result modes, run alternately in every round (a fresh node per run, one
warm-up series first):

- ``instance``: ``--sr-max-instances 1``, an SR per instance as soon as it is
  predicted: the latency of the pipeline itself;
- ``series``: the default, an SR per series (in parts of 100), written when
  the sender closes its association: each result then waits for the end of
  its series, which is what the median shows.

Segmentation bundles (``--series N``): the node answers each series with one
DICOM SEG. The script sends N synthetic CT volume series
(``medge.synthetic.ct_volume_series``, ``--slices`` x ``--size`` x ``--size``,
0.7 mm pixels, 2.5 mm slices), one association per series,
``--associations`` at once, and records per series: the last C-STORE answered
(the series is complete as far as the sender knows) -> its SEG at the
destination; the first C-STORE issued -> SEG; and the node's own time to read,
segment and write it (from its log line). The latency includes the node's
settle time (0.5 s after the association closes; a node cannot know sooner
that a series is complete). ``--bundle seg`` (the default with ``--series``)
converts a MONAI 3-D UNet (random weights: this measures the node, not the
masks; channels 8, 16, 32, strides 2, 2, batch norm) with a spleen-like recipe (resampled
to 1.5 x 1.5 x 2.0 mm, window 40/400, ROI 64 x 96 x 96, overlap 0.25) for the
series size, FP32 only; or give a segmentation bundle's path.

The 1-minute load average is printed before and after: on a shared machine
every absolute number moves with it. Absolute times are for the machine named
in the output.

Usage: python tools/bench_dicom_node.py [--bundle demo|tiny|PATH] [--instances 500] [--associations 4]
       [--rounds 3] [--size 512] [--out bench/results/dicom_node_cpu]
       python tools/bench_dicom_node.py --series 4 [--slices 64] [--size 256] [--associations 1] [--rounds 2]
       [--bundle seg|PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="demo",
                        help="demo (the demo bundle, 512x512 CT, converted first), tiny (a 2-class CNN on 32x32, "
                             "64x64 CT), or a bundle path (default: demo)")
    parser.add_argument("--instances", type=int, default=500, help="instances per run (default: 500)")
    parser.add_argument("--associations", type=int, default=4, help="concurrent associations = series (default: 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every mode once (default: 3)")
    parser.add_argument("--modes", nargs="+", default=["instance", "series"], choices=["instance", "series"],
                        help="result modes to run (default: both)")
    parser.add_argument("--size", type=int, default=None,
                        help="rows = columns of the synthetic CT instances (default: 512 for demo, 64 for tiny; "
                             "the bundle's envelope must accept it)")
    parser.add_argument("--sr-workers", type=int, default=None, help="the node's --sr-workers (default: its own)")
    parser.add_argument("--backend", default="auto", help="the node's --backend (default: auto)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="instances per second per association (default: 0, as fast as the node answers: "
                             "throughput at saturation; a rate the node keeps up with shows the pipeline's own "
                             "latency)")
    parser.add_argument("--out", help="folder for dicom_node.json and dicom_node.md (dicom_node_seg.* with --series)")
    seg = parser.add_argument_group("segmentation bundles")
    seg.add_argument("--series", type=int, default=0, metavar="N",
                     help="segmentation mode: send N volume series per round and time each one's SEG (default: 0, "
                          "off; --bundle then defaults to seg, --size to 256, --associations to 1)")
    seg.add_argument("--slices", type=int, default=64, help="slices per series in segmentation mode (default: 64)")
    args = parser.parse_args(argv)
    if args.series:
        if args.bundle == "demo":
            args.bundle = "seg"
        if "--associations" not in (argv if argv is not None else sys.argv):
            args.associations = 1
    return args


# ---------------------------------------------------------------------------------------------- inputs


def make_bundle(which: str, work: Path) -> Path:
    if which not in ("demo", "tiny"):
        return Path(which)
    if which == "demo":
        from medge.convert.demo import convert_demo

        return Path(convert_demo(work / "demo.medge", engine="none", precisions=["fp32"], log=lambda _: None)
                    .bundle_path)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_dicom_out import build_tiny_bundle

    return build_tiny_bundle(work / "tiny")


def make_series(count: int, associations: int, size: int) -> list:
    """``associations`` series of synthetic CT instances (8 distinct slices, cloned with new UIDs)."""
    from pydicom.uid import generate_uid

    from medge.synthetic import ct_slice

    base = [ct_slice(seed=s, size=size, lesion=bool(s % 2)) for s in range(8)]
    study = generate_uid()
    per = [count // associations + (1 if k < count % associations else 0) for k in range(associations)]
    out = []
    for n in per:
        series = generate_uid()
        batch = []
        for i in range(n):
            ds = copy.deepcopy(base[i % len(base)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = i + 1
            batch.append(ds)
        out.append(batch)
    return out


# ---------------------------------------------------------------------------------------------- peers


class Destination:
    """Storage SCP recording (arrival time, referenced SOP Instance UIDs) of every SR."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.lock = threading.Lock()
        self.arrivals: dict = {}
        self.srs = 0
        ae = AE(ae_title="DEST")
        for uid in ("1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.7"):
            ae.add_supported_context(uid, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.server_address[1]

    def on_store(self, event):
        now = time.monotonic()
        ds = event.dataset
        if ds.SOPClassUID != "1.2.840.10008.5.1.4.1.1.88.33":
            return 0
        uids = []

        def walk(items):
            for item in items:
                if item.get("ValueType") == "IMAGE":
                    uids.append(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
                if "ContentSequence" in item:
                    walk(item.ContentSequence)

        walk(ds.ContentSequence)
        with self.lock:
            self.srs += 1
            for uid in uids:
                self.arrivals.setdefault(uid, now)
        return 0

    def reset(self) -> None:
        with self.lock:
            self.arrivals.clear()
            self.srs = 0

    def stop(self) -> None:
        self.server.shutdown()


def send_series(port: int, batch: list, issued: dict, rate: float = 0.0, resent: list = None) -> list:
    """One series over one association, as a modality sends it; returns each instance's C-STORE status.

    pynetdicom's requestor can lose a response to its own reactor thread (a
    race in ``send_c_store``, more likely on a loaded machine): the send times
    out and the association is aborted. Like a real SCU this sender then
    associates again and resends from the unanswered instance (counted in
    ``resent``); medge serve acknowledges an instance it already accepted
    without a second result. The latency of such an instance counts from its
    first C-STORE.
    """
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from medge.serve.dicom_node import paused_requestor_reactor

    ae = AE(ae_title="SCANNER")
    ae.dimse_timeout = 30
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    statuses: list = []
    started = time.monotonic()
    for _attempt in range(5):
        association = ae.associate("127.0.0.1", port, ae_title="MEDGE")
        if not association.is_established:
            raise SystemExit("the node refused the association")
        for i in range(len(statuses), len(batch)):
            ds = batch[i]
            if rate > 0:
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
            issued.setdefault(str(ds.SOPInstanceUID), time.monotonic())
            with paused_requestor_reactor(association):  # pynetdicom's requestor race, as medge serve does
                answer = association.send_c_store(ds)
            if answer is None or "Status" not in answer:
                if resent is not None:
                    resent.append(str(ds.SOPInstanceUID))
                break
            statuses.append(int(answer.Status))
        if len(statuses) == len(batch):
            association.release()
            return statuses
        if association.is_established:
            association.abort()
    return statuses + [None] * (len(batch) - len(statuses))


class Node:
    """``python -m medge serve`` in a child process."""

    def __init__(self, bundle: Path, destination_port: int, spool: Path, mode: str, sr_workers, backend: str,
                 log_level: str = "warning") -> None:
        command = [sys.executable, "-m", "medge", "serve", str(bundle), "--port", "0", "--host", "127.0.0.1",
                   "--forward", f"127.0.0.1:{destination_port}:DEST", "--spool", str(spool), "--metrics-port", "0",
                   "--device", "cpu", "--log-level", log_level, "--backend", backend]
        if mode == "instance":
            command += ["--sr-max-instances", "1"]
        if sr_workers is not None:
            command += ["--sr-workers", str(sr_workers)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        self.lines: list = []
        ready = threading.Event()

        def read():
            for line in self.process.stderr:
                self.lines.append(line)
                if "ready on" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(180):
            self.process.kill()
            raise SystemExit("medge serve did not start:\n" + "".join(self.lines))
        self.port = int(re.search(r"ready on 127\.0\.0\.1:(\d+)", "".join(self.lines)).group(1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(120)


# ---------------------------------------------------------------------------------------------- segmentation


def make_seg_bundle(work: Path, slices: int, size: int) -> Path:
    """A MONAI 3-D UNet (random weights) converted FP32 for ``slices`` x ``size`` x ``size`` CT series."""
    import torch
    from monai.networks.nets import UNet

    from medge.convert.pipeline import convert
    from medge.synthetic import write_ct_volume_series
    from medge.volume import VolumeSpec

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
               num_res_units=1, norm="batch").eval()  # batch norm: eval mode is well conditioned
    write_ct_volume_series(work / "validation" / "a", seed=1, slices=slices, rows=size, columns=size,
                           pixel_spacing=(0.7, 0.7))
    result = convert(net, work / "seg.medge", task="segmentation",
                     volume_spec=VolumeSpec(voi="window", window=(40.0, 400.0), target_spacing=(1.5, 1.5, 2.0)),
                     roi=(64, 96, 96), overlap=0.25, validation=work / "validation", precisions=["fp32"],
                     class_labels=["background", "organ"], batch=(1, 2, 2), engine="none", name="bench-unet3d",
                     version="1", log=lambda _: None)
    return Path(result.bundle_path)


def make_volume_series(count: int, slices: int, size: int, first_seed: int = 100) -> list:
    from medge.synthetic import ct_volume_series

    return [ct_volume_series(seed=first_seed + k, slices=slices, rows=size, columns=size, pixel_spacing=(0.7, 0.7))[0]
            for k in range(count)]


class SegDestination:
    """Storage SCP recording when the SEG of each source series arrives."""

    def __init__(self) -> None:
        from pynetdicom import AE, evt

        self.lock = threading.Lock()
        self.arrivals: dict = {}  # source Series Instance UID -> arrival (monotonic)
        self.segs = 0
        ae = AE(ae_title="DEST")
        ae.maximum_pdu_size = 0
        ae.add_supported_context("1.2.840.10008.5.1.4.1.1.66.4", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.port = self.server.server_address[1]

    def on_store(self, event):
        now = time.monotonic()
        source = str(event.dataset.ReferencedSeriesSequence[0].SeriesInstanceUID)
        with self.lock:
            self.segs += 1
            self.arrivals.setdefault(source, now)
        return 0

    def reset(self) -> None:
        with self.lock:
            self.arrivals.clear()
            self.segs = 0

    def stop(self) -> None:
        self.server.shutdown()


_SEGMENTED = re.compile(r"series (\S+) segmented: (\d+) instances, (\d+) ms \(read (\d+), preprocess (\d+), "
                        r"infer (\d+), sliding window (\d+), postprocess (\d+), SEG (-?\d+)\) after (-?\d+) ms "
                        r"to completeness and (\d+) ms queued")
_DELIVERED = re.compile(r"SEG of series (\S+) delivered, (\d+) ms after its last instance arrived")


def run_seg_once(bundle: Path, destination: SegDestination, volumes: list, warmup: list, work: Path,
                 backend: str) -> dict:
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
    node = Node(bundle, destination.port, spool, "series", None, backend, log_level="info")
    try:
        send_series(node.port, warmup, {})  # loads the backend's sessions, fills caches
        _wait_for_series(destination, {str(warmup[0].SeriesInstanceUID)}, 300)
        destination.reset()
        first_issued: dict = {}
        completed: dict = {}
        statuses: dict = {}
        queue = list(range(len(volumes)))
        lock = threading.Lock()

        def sender():
            while True:
                with lock:
                    if not queue:
                        return
                    k = queue.pop(0)
                issued: dict = {}
                statuses[k] = send_series(node.port, volumes[k], issued)
                uid = str(volumes[k][0].SeriesInstanceUID)
                first_issued[uid] = min(issued.values())
                completed[uid] = time.monotonic()  # the last C-STORE answered, the association released

        started = time.monotonic()
        threads = [threading.Thread(target=sender) for _ in range(min(len(volumes), _ASSOCIATIONS[0]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = {str(v[0].SeriesInstanceUID) for v in volumes}
        try:
            _wait_for_series(destination, expected, 900)
        except SystemExit:
            print("".join(node.lines[-40:]), file=sys.stderr)
            raise
        with destination.lock:
            arrivals = dict(destination.arrivals)
            segs = destination.segs
    finally:
        node.stop()
    log = "".join(node.lines)
    (work / f"node-seg-{time.time_ns()}.log").write_text(log)
    stages = {m.group(1): {"instances": int(m.group(2)), "node_ms": int(m.group(3)), "read": int(m.group(4)),
                           "preprocess": int(m.group(5)), "infer": int(m.group(6)),
                           "sliding_window": int(m.group(7)), "postprocess": int(m.group(8)), "seg": int(m.group(9)),
                           "settle": int(m.group(10)), "queued": int(m.group(11))}
              for m in _SEGMENTED.finditer(log)}
    for m in _DELIVERED.finditer(log):
        stages.setdefault(m.group(1), {})["node_latency"] = int(m.group(2))
    per_series = []
    for uid in sorted(expected):
        per_series.append({"series": uid, "complete_to_seg_ms": (arrivals[uid] - completed[uid]) * 1e3,
                           "first_store_to_seg_ms": (arrivals[uid] - first_issued[uid]) * 1e3,
                           "send_ms": (completed[uid] - first_issued[uid]) * 1e3, **stages.get(uid, {})})
    refused = sum(1 for s in statuses.values() for code in s if code != 0)
    return {"series": len(expected), "segs": segs, "refused": refused, "total_s": max(arrivals.values()) - started,
            "per_series": per_series,
            "node_warnings": [line.strip() for line in log.splitlines()
                              if " WARNING " in line or " ERROR " in line][:20]}


_ASSOCIATIONS = [1]


def _wait_for_series(destination: SegDestination, uids: set, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with destination.lock:
            if uids <= set(destination.arrivals):
                return
        time.sleep(0.01)
    raise SystemExit(f"SEGs missing after {timeout} s")


def main_segmentation(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_name  # tools/_machine.py

    size = args.size or 256
    _ASSOCIATIONS[0] = max(1, args.associations)
    work = Path(tempfile.mkdtemp(prefix="medge-bench-node-seg-"))
    bundle = make_seg_bundle(work, args.slices, size) if args.bundle == "seg" else Path(args.bundle)
    warmup = make_volume_series(1, args.slices, size, first_seed=99)[0]
    destination = SegDestination()
    load_before = os.getloadavg()[0]
    runs = []
    try:
        for round_index in range(args.rounds):
            volumes = make_volume_series(args.series, args.slices, size, first_seed=1000 * (round_index + 1))
            run = run_seg_once(bundle, destination, volumes, warmup, work, args.backend)
            run["round"] = round_index
            runs.append(run)
            for row in run["per_series"]:
                print(f"round {round_index + 1}: series of {row.get('instances', '?')}: sent in "
                      f"{row['send_ms']:.0f} ms; complete -> SEG delivered {row['complete_to_seg_ms']:.0f} ms "
                      f"(node: read {row.get('read', '?')}, preprocess {row.get('preprocess', '?')}, infer "
                      f"{row.get('infer', '?')}, sliding window {row.get('sliding_window', '?')}, postprocess "
                      f"{row.get('postprocess', '?')}, SEG build {row.get('seg', '?')} ms; total "
                      f"{row.get('node_ms', '?')} ms; settle {row.get('settle', '?')}, queued {row.get('queued', '?')} "
                      "ms)", flush=True)
            for line in run["node_warnings"]:
                print(f"    node: {line}", flush=True)
    finally:
        destination.stop()
    load_after = os.getloadavg()[0]
    rows = [row for run in runs for row in run["per_series"]]

    def median(key: str) -> float:
        values = [row[key] for row in rows if key in row]
        return statistics.median(values) if values else float("nan")

    header = (f"medge serve (segmentation) on {machine_name()}; bundle {bundle.name} (--backend {args.backend}); "
              f"{args.series} series of {args.slices} CT slices {size}x{size} per round, one association each, "
              f"{_ASSOCIATIONS[0]} at once, {args.rounds} rounds ({len(rows)} series); sender, node and destination "
              f"on this machine (loopback); 1-min load average {load_before:.1f} before, {load_after:.1f} after")
    table = ["| per series (median) | ms |", "|---|---:|",
             f"| sending its {args.slices} instances (first C-STORE -> last answered) | {median('send_ms'):.0f} |",
             f"| **series complete (last C-STORE answered) -> SEG delivered** | {median('complete_to_seg_ms'):.0f} |",
             f"| first C-STORE -> SEG delivered | {median('first_store_to_seg_ms'):.0f} |",
             f"| node: last instance received -> SEG delivered (its own clock) | {median('node_latency'):.0f} |",
             f"| node: last instance received -> series found complete (association closed + settle) | "
             f"{median('settle'):.0f} |",
             f"| node: waiting for the segmenting thread (the previous series) | {median('queued'):.0f} |",
             f"| node: read_series + segment + SEG built and in the outbox | {median('node_ms'):.0f} |",
             f"| node: read (read_series, envelope) | {median('read'):.0f} |",
             f"| node: preprocess | {median('preprocess'):.0f} |",
             f"| node: inference (backend) | {median('infer'):.0f} |",
             f"| node: sliding window (window gathering, blending) | {median('sliding_window'):.0f} |",
             f"| node: postprocess (back onto the series' grid) | {median('postprocess'):.0f} |",
             f"| node: SEG (highdicom) + outbox write | {median('seg'):.0f} |"]
    worst = max(row["complete_to_seg_ms"] for row in rows)
    table.append(f"| worst series complete -> SEG delivered | {worst:.0f} |")
    print("\n" + header + "\n" + "\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dicom_node_seg.json").write_text(json.dumps({"machine": machine_name(), "header": header,
                                                             "runs": runs}, indent=2))
        (out / "dicom_node_seg.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- runs


def run_once(bundle: Path, destination: Destination, series: list, warmup: list, mode: str, sr_workers,
             work: Path, rate: float, backend: str) -> dict:
    spool = Path(tempfile.mkdtemp(prefix="spool-", dir=work))
    node = Node(bundle, destination.port, spool, mode, sr_workers, backend)
    try:
        issued: dict = {}
        send_series(node.port, warmup, issued)  # loads the worker, fills caches
        _wait_for(destination, set(issued), 120)
        destination.reset()
        issued.clear()
        started = time.monotonic()
        results: dict = {}
        resent: list = []
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(
                       k, send_series(node.port, series[k], issued, rate, resent))) for k in range(len(series))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent = time.monotonic()
        expected = {str(ds.SOPInstanceUID) for k, batch in enumerate(series) for ds, status in zip(batch, results[k])
                    if status == 0}
        try:
            _wait_for(destination, expected, 600)
        except SystemExit:
            print("".join(node.lines[-40:]), file=sys.stderr)
            raise
        with destination.lock:
            arrivals = dict(destination.arrivals)
            srs = destination.srs
    finally:
        node.stop()
    log = "".join(node.lines)
    (work / f"node-{mode}-{time.time_ns()}.log").write_text(log)
    refused = sum(1 for statuses in results.values() for s in statuses if s != 0)  # refused, or never answered
    latencies = sorted((arrivals[uid] - issued[uid]) * 1e3 for uid in expected)
    finished = max(arrivals[uid] for uid in expected)
    return {"mode": mode, "instances": len(expected), "refused": refused, "srs": srs,
            "send_s": sent - started, "total_s": finished - started,
            "throughput_per_s": len(expected) / (finished - started),
            "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "max_ms": latencies[-1], "latencies_ms": latencies, "resent": len(resent),
            "node_warnings": [line.strip() for line in log.splitlines()
                              if " WARNING " in line or " ERROR " in line][:20]}


def _wait_for(destination: Destination, uids: set, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with destination.lock:
            if uids <= set(destination.arrivals):
                return
        time.sleep(0.01)
    raise SystemExit(f"results missing after {timeout} s")


def _percentile(sorted_values: list, p: float) -> float:
    index = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def main(argv=None) -> int:
    args = parse_args(argv)
    import logging

    # The scanner and PACS sides' own errors (pynetdicom; synthetic data, nothing to hide) go to stderr.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s bench %(levelname)s %(name)s: %(message)s")
    if args.series:
        return main_segmentation(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import machine_name  # tools/_machine.py

    work = Path(tempfile.mkdtemp(prefix="medge-bench-node-"))
    bundle = make_bundle(args.bundle, work)
    size = args.size or (64 if args.bundle == "tiny" else 512)
    series = make_series(args.instances, args.associations, size)
    warmup = make_series(8, 1, size)[0]
    destination = Destination()
    load_before = os.getloadavg()[0]
    runs = []
    try:
        for round_index in range(args.rounds):
            for mode in args.modes:
                run = run_once(bundle, destination, series, warmup, mode, args.sr_workers, work, args.rate,
                               args.backend)
                run["round"] = round_index
                runs.append(run)
                print(f"round {round_index + 1} {mode:8s}: {run['throughput_per_s']:6.1f} instances/s, "
                      f"p50 {run['p50_ms']:8.1f} ms, p99 {run['p99_ms']:8.1f} ms, {run['srs']} SRs, "
                      f"{run['refused']} refused or unanswered, {run['resent']} resent after a lost response",
                      flush=True)
                for line in run["node_warnings"]:
                    print(f"    node: {line}", flush=True)
    finally:
        destination.stop()
    load_after = os.getloadavg()[0]
    summary = []
    for mode in args.modes:
        mine = [r for r in runs if r["mode"] == mode]
        everything = sorted(v for r in mine for v in r["latencies_ms"])
        summary.append({"mode": mode, "throughput_per_s": statistics.median(r["throughput_per_s"] for r in mine),
                        "p50_ms": _percentile(everything, 50), "p99_ms": _percentile(everything, 99),
                        "srs_per_run": statistics.median(r["srs"] for r in mine)})
    header = (f"medge serve on {machine_name()}; bundle {bundle.name} (--backend {args.backend}); "
              f"{args.instances} CT instances "
              f"{size}x{size} over {args.associations} concurrent associations (one series each"
              + (f", {args.rate:g} instances/s each" if args.rate else ", as fast as answered") + f"), {args.rounds} "
              f"rounds; sender, node and destination on this machine (loopback); 1-min load average "
              f"{load_before:.1f} before, {load_after:.1f} after")
    table = ["| mode | instances/s (median of rounds) | p50 latency ms | p99 latency ms | SRs per run |",
             "|---|---:|---:|---:|---:|"]
    for row in summary:
        table.append(f"| {row['mode']} | {row['throughput_per_s']:.1f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
                     f"{row['srs_per_run']:.0f} |")
    print("\n" + header + "\n" + "\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for run in runs:
            run.pop("latencies_ms")
        (out / "dicom_node.json").write_text(json.dumps({"machine": machine_name(), "header": header,
                                                         "summary": summary, "runs": runs}, indent=2))
        (out / "dicom_node.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
