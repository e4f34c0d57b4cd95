#!/usr/bin/env python
"""DICOM reading in medge, measured side by side (issue 13): readers, decoders, overlap.

Three sections (``--only`` picks some):

- ``reader``: per 512 x 512 int16 slice of the demo bundle's kind (Explicit VR Little
  Endian, written by medge.demo.write_demo_dicoms), a raw ``open().read()`` of the file
  against ``medge.read_dicom`` (fast reader; pydicom only, as before, via
  MEDGE_DICOM_READER=pydicom; from bytes and from an mmap; with a cold header cache) and
  the other candidates: pydicom ``dcmread().pixel_array``, ``pydicom.pixels.pixel_array``,
  ``dcmread(specific_tags=...)`` + the Pixel Data bytes, and dicomsdl when importable
  (``--extra-path`` puts a folder holding it on sys.path; it is not a medge dependency).
  A second table runs the fast reader on the same slices with a 250-element header
  (private tags and sequences added), as real scanners write them.
- ``decoders``: per compressed transfer syntax, a 512 x 512 12-bit CT frame (8-bit for
  JPEG baseline) encoded with pydicom's encoders or imagecodecs (``pip install
  imagecodecs``: JPEG, lossless JPEG and HTJ2K encoders), decoded by each installed
  pydicom plugin, by pydicom's default choice, and by medge.read_dicom (which names the
  fastest installed plugin, medge.dicom.DECODING_PLUGINS); whether every plugin gives the
  same pixels.
- ``overlap``: the demo bundle (built with ``--engine none`` unless ``--bundle``), 64 slices
  in batches of 8: reading in line with inference (the model reads each chunk, as medge
  run did) against reading the next chunk in 2 reader threads (medge run now), each with
  the pydicom-only reader and the fast reader; and a Batcher with readers=0 against its
  default (2 reader threads); the same with the slices compressed as JPEG 2000 lossless,
  where reading (decoding) costs more than inference.

Timing: interleaved rounds (the candidates' order rotates every round), the median of the
rounds, per slice; wall time and CPU time of this process (the machine may be shared: CPU
time is the steadier, and ratios measured in one run are what to quote). The output names
the machine, its load average and the versions.

Usage::

    python tools/bench_read.py                      # everything (several minutes on 2 cores)
    python tools/bench_read.py --only reader --rounds 31
    python tools/bench_read.py --only decoders --json decoders.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import mmap
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _machine import machine_name  # noqa: E402

SLICE_TAGS = (0x00020003, 0x00020010, 0x00080005, 0x00080018, 0x00080060, 0x00180015, 0x00181164, 0x00280002,
              0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280030, 0x00280100, 0x00280101, 0x00280103,
              0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x00281055, 0x00281056, 0x7FE00010)


# --------------------------------------------------------------------------- timing


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, per_call: int = 1) -> dict[str, dict]:
    """Median wall and CPU ms per unit over ``rounds`` rounds; each round runs every candidate once."""
    names = list(candidates)
    wall: dict[str, list] = {name: [] for name in names}
    cpu: dict[str, list] = {name: [] for name in names}
    for name in names:  # warm-up: imports, caches, page cache
        candidates[name]()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            w, c = time.perf_counter(), time.process_time()
            candidates[name]()
            cpu[name].append((time.process_time() - c) * 1e3 / per_call)
            wall[name].append((time.perf_counter() - w) * 1e3 / per_call)
    return {name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])}
            for name in names}


@contextlib.contextmanager
def pydicom_only():
    """read_dicom without its fast reader (what MEDGE_DICOM_READER=pydicom does at import)."""
    import medge.dicom as dicom

    saved, dicom._FAST_READER = dicom._FAST_READER, False
    try:
        yield
    finally:
        dicom._FAST_READER = saved


def table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


# --------------------------------------------------------------------------- reader


def _slices(folder: pathlib.Path, count: int) -> list[pathlib.Path]:
    from medge.demo import write_demo_dicoms

    paths, _ = write_demo_dicoms(folder, "validation", count)
    return list(paths)


def _with_big_header(paths: list, folder: pathlib.Path) -> list[pathlib.Path]:
    """The same slices with ~200 more elements: private tags, and sequences of both lengths."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        for group in (0x0009, 0x0019, 0x0021, 0x0043):
            ds.private_block(group, "BENCH CREATOR", create=True)
            for element in range(0x10, 0x10 + 48):
                ds.add_new((group << 16) | 0x1000 | element, "LO", f"value {group:04X}{element:02X}")
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6"
        ds.ReferencedImageSequence = Sequence([ref, copy.deepcopy(ref)])
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113691", "DCM", "IPP"
        ds.DerivationCodeSequence = Sequence([code])
        ds["DerivationCodeSequence"].is_undefined_length = True
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def bench_reader(rounds: int, count: int) -> dict:
    import pydicom
    import pydicom.pixels

    import medge.dicom as dicom
    from medge.dicom import read_dicom

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="medge_bench_read_"))
    paths = _slices(tmp / "slices", count)
    size = paths[0].stat().st_size
    blobs = [p.read_bytes() for p in paths]
    n = len(paths)
    keywords = [pydicom.datadict.keyword_for_tag(t) for t in SLICE_TAGS if t >> 16 != 2]

    def each(fn):
        return lambda: [fn(p) for p in paths]

    def raw(p):
        with open(p, "rb") as handle:
            return handle.read()

    def old(p):
        with pydicom_only():
            return read_dicom(p)

    def cold(p):
        dicom._FAST_HEADERS.clear()
        return read_dicom(p)

    def mapped(p):
        with open(p, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as m:
            image = read_dicom(m)
        return image

    def specific(p):
        ds = pydicom.dcmread(p, specific_tags=keywords)
        return np.frombuffer(ds.PixelData, "<i2").reshape(ds.Rows, ds.Columns)

    candidates = {
        "raw open().read()": each(raw),
        "medge.read_dicom(path), fast reader": each(read_dicom),
        "medge.read_dicom(path), pydicom only (before)": each(old),
        "medge.read_dicom(bytes), fast reader": lambda: [read_dicom(b) for b in blobs],
        "medge.read_dicom(mmap), fast reader": each(mapped),
        "medge.read_dicom(path), fast reader, header cache cold": each(cold),
        "pydicom dcmread(path).pixel_array": each(lambda p: pydicom.dcmread(p).pixel_array),
        "pydicom.pixels.pixel_array(path)": each(pydicom.pixels.pixel_array),
        "pydicom dcmread(specific_tags) + Pixel Data bytes": each(specific),
    }
    try:
        import dicomsdl

        def sdl(p):
            d = dicomsdl.open(str(p))
            info = d.getPixelDataInfo()
            out = np.empty((info["Rows"], info["Cols"]), np.int16)
            d.copyFrameData(0, out)
            return out

        from importlib.metadata import PackageNotFoundError, version

        try:
            sdl_version = version("dicomsdl")
        except PackageNotFoundError:
            sdl_version = "?"
        candidates[f"dicomsdl {sdl_version} open + copyFrameData"] = each(sdl)
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timings = interleaved(candidates, rounds, per_call=n)
    base = timings["raw open().read()"]
    rows = [(name, f"{t['wall_ms']:.3f}", f"{t['wall_ms'] / base['wall_ms']:.2f}x", f"{t['cpu_ms']:.3f}",
             f"{t['cpu_ms'] / base['cpu_ms']:.2f}x") for name, t in timings.items()]
    table(f"Reading one {size:,}-byte 512 x 512 int16 slice (Explicit VR LE; {n} files, page cache warm; "
          f"{rounds} interleaved rounds, medians)", rows, ("reader", "wall ms", "vs raw", "CPU ms", "vs raw"))

    big = _with_big_header(paths, tmp / "big_header")
    elements = len(pydicom.dcmread(big[0], stop_before_pixels=True)) + len(pydicom.dcmread(big[0]).file_meta)
    big_candidates = {
        "raw open().read()": lambda: [raw(p) for p in big],
        "medge.read_dicom(path), fast reader": lambda: [read_dicom(p) for p in big],
        "medge.read_dicom(path), pydicom only (before)": lambda: [old(p) for p in big],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big_timings = interleaved(big_candidates, rounds, per_call=n)
    base = big_timings["raw open().read()"]
    table(f"The same slices with a {elements}-element header ({big[0].stat().st_size:,} bytes)",
          [(name, f"{t['wall_ms']:.3f}", f"{t['wall_ms'] / base['wall_ms']:.2f}x", f"{t['cpu_ms']:.3f}",
            f"{t['cpu_ms'] / base['cpu_ms']:.2f}x") for name, t in big_timings.items()],
          ("reader", "wall ms", "vs raw", "CPU ms", "vs raw"))
    return {"file_bytes": size, "files": n, "timings": timings, "big_header": {
        "elements": elements, "timings": big_timings}}


# --------------------------------------------------------------------------- decoders

#: The plugin pydicom chose with medge[codecs] as it was (pylibjpeg + -libjpeg + -openjpeg): no
#: pylibjpeg-rle, so RLE fell to pydicom's own decoder; libjpeg before pyjpegls for JPEG-LS.
BEFORE = {"RLE Lossless": "pydicom"}


def _frames():
    from medge import synthetic

    ds = synthetic.ct_slice(seed=3, size=512, lesion=True)
    stored = np.clip(ds.pixel_array.astype(np.int32) + 1024, 0, 4095)
    return ds, stored.astype(np.uint16), (stored >> 4).astype(np.uint8)


def _encoded_cases() -> list[tuple[str, str, bytes]]:
    """(name, transfer syntax, file bytes) per syntax this machine can encode."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    base, u12, u8 = _frames()

    def native(array, bits_stored):
        ds = copy.deepcopy(base)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
            array.dtype.itemsize * 8, bits_stored, bits_stored - 1, 0)
        ds.RescaleIntercept = -1024
        ds.PixelData = array.tobytes()
        return ds

    def encapsulated(syntax, frame, array, bits_stored):
        ds = native(array, bits_stored)
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        return ds

    def save(ds):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    cases = []

    def attempt(name, syntax, make):
        try:
            cases.append((name, syntax, save(make())))
        except Exception as exc:  # noqa: BLE001 - an encoder missing here: the row says so
            print(f"  ({name}: not encoded here: {type(exc).__name__}: {str(exc)[:100]})")

    def compressed(syntax, plugin, **kw):
        def make():
            ds = native(u12, 12)
            ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False, **kw)
            return ds
        return make

    attempt("RLE Lossless", "1.2.840.10008.1.2.5", compressed("1.2.840.10008.1.2.5", "pydicom"))
    attempt("JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", compressed("1.2.840.10008.1.2.4.80", "pyjpegls"))
    attempt("JPEG-LS Near-Lossless (error 3)", "1.2.840.10008.1.2.4.81",
            compressed("1.2.840.10008.1.2.4.81", "pyjpegls", jls_error=3))
    attempt("JPEG 2000 Lossless", "1.2.840.10008.1.2.4.90", compressed("1.2.840.10008.1.2.4.90", "pylibjpeg"))
    attempt("JPEG 2000 (20:1)", "1.2.840.10008.1.2.4.91",
            compressed("1.2.840.10008.1.2.4.91", "pylibjpeg", j2k_cr=[20]))
    try:
        import imagecodecs as ic
    except ImportError:
        print("  (imagecodecs not installed: no JPEG baseline / extended / lossless / HTJ2K rows)")
        return cases
    attempt("JPEG Baseline (8-bit)", "1.2.840.10008.1.2.4.50",
            lambda: encapsulated("1.2.840.10008.1.2.4.50", ic.jpeg8_encode(u8, level=90), u8, 8))
    attempt("JPEG Extended (12-bit)", "1.2.840.10008.1.2.4.51",
            lambda: encapsulated("1.2.840.10008.1.2.4.51", ic.jpeg8_encode(u12, level=90, bitspersample=12), u12,
                                 12))
    attempt("JPEG Lossless (process 14)", "1.2.840.10008.1.2.4.57",
            lambda: encapsulated("1.2.840.10008.1.2.4.57", ic.ljpeg_encode(u12, bitspersample=12), u12, 12))
    attempt("HTJ2K Lossless", "1.2.840.10008.1.2.4.201",
            lambda: encapsulated("1.2.840.10008.1.2.4.201", ic.htj2k_encode(u12), u12, 12))
    return cases


def bench_decoders(rounds: int) -> dict:
    import pydicom
    from pydicom.pixels import get_decoder

    import medge.dicom as dicom
    from medge.dicom import read_dicom

    rows, report = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = _encoded_cases()
        for name, syntax, data in cases:
            decoder = get_decoder(syntax)
            plugins = list(decoder._available)
            ds = pydicom.dcmread(io.BytesIO(data))

            def decode(plugin):
                return lambda: decoder.as_array(ds, decoding_plugin=plugin)[0]

            candidates, outputs = {}, {}
            for plugin in plugins:
                try:
                    outputs[plugin] = decode(plugin)()
                    candidates[plugin] = decode(plugin)
                except Exception as exc:  # noqa: BLE001 - a plugin that cannot decode this syntax variant
                    report.setdefault(name, {}).setdefault("fails", {})[plugin] = type(exc).__name__
            candidates["pydicom default"] = decode("")
            chosen = dicom.decoding_plugin(syntax, decoder)
            before = BEFORE.get(name, "pylibjpeg")

            def read_with(plugin):
                def run():
                    saved = dicom.DECODING_PLUGINS.get(syntax)
                    dicom.DECODING_PLUGINS[syntax] = (plugin,)
                    try:
                        return read_dicom(data)
                    finally:
                        dicom.DECODING_PLUGINS[syntax] = saved
                return run

            candidates["read_dicom before"] = read_with(before)
            candidates["read_dicom now"] = lambda: read_dicom(data)
            timings = interleaved(candidates, rounds)
            reference = next(iter(outputs.values()))
            same = all(o.shape == reference.shape and np.array_equal(o, reference) for o in outputs.values())
            diff = max(int(np.abs(o.astype(np.int64) - reference.astype(np.int64)).max()) for o in outputs.values())
            t = {k: v["cpu_ms"] for k, v in timings.items()}
            per_plugin = ", ".join(f"{p} {t[p]:.2f}" for p in plugins if p in t)
            rows.append((name, f"{len(data) / 1e3:.0f} kB", per_plugin, f"{t['pydicom default']:.2f}",
                         f"{before} {t['read_dicom before']:.2f}", f"{chosen} {t['read_dicom now']:.2f}",
                         f"{t['read_dicom before'] / t['read_dicom now']:.1f}x",
                         "identical" if same else f"max diff {diff}"))
            report[name] = {"syntax": syntax, "bytes": len(data), "timings": timings, "plugins": plugins,
                            "medge_plugin": chosen, "before_plugin": before, "identical": same, "max_diff": diff}
    table(f"Decoding one 512 x 512 frame, CPU ms of this process ({rounds} interleaved rounds, medians). "
          "'pydicom default': pydicom's own choice among what is installed here; read_dicom 'before': with the "
          "plugin pydicom chose from medge[codecs] as it was; 'now': with the plugin medge names", rows,
          ("transfer syntax", "size", "each installed plugin alone", "pydicom default", "read_dicom before",
           "read_dicom now", "speed-up", "plugins agree"))
    return report


# --------------------------------------------------------------------------- overlap


def bench_overlap(rounds: int, bundle: Optional[str], count: int = 64, batch: int = 8) -> dict:
    import concurrent.futures

    import medge
    from medge.cli import run_cmd
    from medge.runtime.batcher import Batcher

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="medge_bench_overlap_"))
    if bundle is None:
        from medge.convert.demo import convert_demo

        bundle = str(tmp / "demo.medge")
        print("  building the demo bundle (--engine none)...")
        convert_demo(bundle, engine="none", log=lambda _: None)
    native_paths = _slices(tmp / "slices", count)
    j2k_paths = _compressed_copies(native_paths, tmp / "j2k", "1.2.840.10008.1.2.4.90")
    report: dict = {}
    with medge.load(bundle, device="cpu") as model:
        backend = str(model.backend)

        def in_line(paths):  # medge run before: the model reads each chunk itself, then runs it
            def run():
                for i in range(0, len(paths), batch):
                    model.predict_each(paths[i:i + batch])
            return run

        def ahead(paths):  # medge run now: the next chunk is read in reader threads meanwhile
            chunks = [paths[i:i + batch] for i in range(0, len(paths), batch)]

            def run():
                with concurrent.futures.ThreadPoolExecutor(run_cmd.READERS) as readers:
                    reads = [readers.submit(medge.read_dicom, p) for p in chunks[0]]
                    for i in range(len(chunks)):
                        current = reads
                        following = chunks[i + 1] if i + 1 < len(chunks) else []
                        reads = [readers.submit(medge.read_dicom, p) for p in following]
                        model.predict_each([r.result() for r in current])
            return run

        def read_only(paths):
            def run():
                for p in paths:
                    medge.read_dicom(p)
            return run

        def batcher(readers, paths):
            def run():
                with Batcher(model, readers=readers, max_delay_ms=2.0) as b:
                    for f in [b.submit(p, block=True) for p in paths]:
                        f.result()
            return run

        def old(fn):
            def run():
                with pydicom_only():
                    fn()
            return run

        candidates = {
            "read only (no inference), pydicom only": old(read_only(native_paths)),
            "read only (no inference), fast reader": read_only(native_paths),
            "in line (medge run before), pydicom only": old(in_line(native_paths)),
            "in line, fast reader": in_line(native_paths),
            "read ahead in 2 threads (medge run now), pydicom only": old(ahead(native_paths)),
            "read ahead in 2 threads (medge run now), fast reader": ahead(native_paths),
            "Batcher readers=0, fast reader": batcher(0, native_paths),
            "Batcher readers=2 (default), fast reader": batcher(2, native_paths),
            "JPEG 2000 lossless slices: read only": read_only(j2k_paths),
            "JPEG 2000 lossless slices: in line": in_line(j2k_paths),
            "JPEG 2000 lossless slices: read ahead in 2 threads": ahead(j2k_paths),
            "JPEG 2000 lossless slices: Batcher readers=0": batcher(0, j2k_paths),
            "JPEG 2000 lossless slices: Batcher readers=2": batcher(2, j2k_paths),
        }
        timings = interleaved(candidates, rounds, per_call=count)
    base = timings["in line (medge run before), pydicom only"]["wall_ms"]
    j2k_base = timings["JPEG 2000 lossless slices: in line"]["wall_ms"]
    table(f"End to end per slice: demo bundle ({backend}), {count} slices in batches of {batch} "
          f"({rounds} interleaved rounds, medians)",
          [(name, f"{t['wall_ms']:.2f}", "" if "read only" in name else
            f"{(j2k_base if name.startswith('JPEG 2000') else base) / t['wall_ms']:.2f}x",
            f"{t['cpu_ms']:.2f}") for name, t in timings.items()],
          ("pipeline", "wall ms / slice", "vs before", "CPU ms / slice (all threads)"))
    report.update({"backend": backend, "count": count, "batch": batch, "timings": timings})
    return report


def _compressed_copies(paths: list, folder: pathlib.Path, syntax: str) -> list[pathlib.Path]:
    """The slices compressed with pydicom's encoder for ``syntax`` (JPEG 2000: pylibjpeg-openjpeg)."""
    import pydicom

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(syntax, generate_instance_uid=False)
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=["reader", "decoders", "overlap"],
                        help="run only this section (repeatable; default: all)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default 21)")
    parser.add_argument("--slices", type=int, default=16, help="files in the reader section (default 16)")
    parser.add_argument("--bundle", help="a .medge bundle for the overlap section (default: build the demo's)")
    parser.add_argument("--extra-path", help="a folder put first on sys.path (e.g. one holding dicomsdl or "
                                             "python-gdcm, installed there with pip install --target)")
    parser.add_argument("--json", type=pathlib.Path, help="write the numbers here")
    args = parser.parse_args(argv)
    sections = args.only or ["reader", "decoders", "overlap"]
    if args.extra_path:  # before pydicom looks for its plugins (python-gdcm can be tried this way too)
        sys.path.insert(0, args.extra_path)

    import numpy
    import pydicom

    import medge

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    print(f"medge {medge.__version__}, pydicom {pydicom.__version__}, numpy {numpy.__version__}, "
          f"Python {platform.python_version()}")
    print(f"machine: {machine_name()} ({platform.node()}); load average {load[0]:.2f} / {load[1]:.2f} / "
          f"{load[2]:.2f} at start")
    report: dict = {"machine": machine_name(), "load_average_at_start": list(load)}
    if "reader" in sections:
        report["reader"] = bench_reader(args.rounds, args.slices)
    if "decoders" in sections:
        report["decoders"] = bench_decoders(max(5, args.rounds // 2))
    if "overlap" in sections:
        report["overlap"] = bench_overlap(max(3, args.rounds // 4), args.bundle)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    print(f"\nload average at the end: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    report["load_average_at_end"] = list(load)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
