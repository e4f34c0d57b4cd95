"""medge.load and Model: a verified bundle, a backend, and the prediction pipeline.

DICOM (path, bytes, Dataset) or Image or stored-value array
  -> read_dicom                  stored values + semantics, per item (a bad file fails only itself)
  -> preprocess                  straight into the backend's input buffer (host array, or the
                                 engine's device binding), one fused pass
  -> backend.execute             host outputs, float32
  -> postprocess                 softmax / sigmoid per the manifest, label
  -> Prediction

The bundle is verified (every file's hash, and the signature when a trusted
key is given) before anything is deserialised. Engines are read with
``read_verified``, so the bytes deserialised are the bytes hashed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import BackendUnavailable, BundleError, MedgeError
from ..image import Image
from ..preprocess import PreprocessSpec, preprocess
from ..tasks.base import DEFAULT_CHOICE_VERDICTS
from ..tasks.geometry import to_image_grid
from .backends.base import Backend

_LOG = logging.getLogger("medge.runtime")

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt", "tensorrt_rtx")
#: Graphs ONNX Runtime runs, best first, per precision asked for (the ORT-placed INT8 graph is the
#: fast one on CPU; the TensorRT-placed one runs at half FP32 speed there).
_ORT_DEFAULT_ORDER = ("int8-ort", "fp32", "fp16", "int8")
_TENSORRT_ORDER = ("int8", "fp16", "fp32")
#: Graphs OpenVINO runs when asked for by name, best first: it runs the TensorRT-placed INT8 graph with int8
#: kernels. ``auto`` gives it that graph alone: its FP32 / FP16 were no faster than ONNX Runtime's here, and
#: ONNX Runtime's INT8 graph is faster than either (tools/bench_cpu_inference.py).
_OPENVINO_ORDER = ("int8", "fp32", "fp16")
_OPENVINO_AUTO_ORDER = ("int8",)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image (one frame).

    Attributes:
        scores: per-class scores after the manifest's activation (softmax / sigmoid), float32.
        label: the class name with the highest score (None without class names).
        index: its index.
        sop_instance_uid: the image's SOP Instance UID when known (never a patient identifier).
        frame: frame number within a multi-frame image (0 otherwise).
        timings_ms: per stage: "read" (this image), and "preprocess", "infer", "postprocess"
            of the batch it ran in, with "batch_size".
        warnings: why this answer must be read with care (e.g. the input lies
            outside the validated envelope and the model was loaded with
            ``envelope="warn"``); empty when there is nothing to flag.
        heatmap: for bundles converted with ``--explain``, the class activation
            map explaining ``label``, float32 (rows, columns) on the original
            image grid (the inverse of the resampling and letterbox); else None.
    """

    scores: np.ndarray
    label: Optional[str]
    index: int
    sop_instance_uid: Optional[str] = None
    frame: int = 0
    timings_ms: dict = field(default_factory=dict)
    warnings: tuple = ()
    heatmap: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"sop_instance_uid": self.sop_instance_uid, "frame": self.frame, "label": self.label,
                "index": self.index, "scores": [float(s) for s in self.scores], "timings_ms": dict(self.timings_ms),
                "warnings": list(self.warnings)}


@dataclass(frozen=True)
class BackendChoice:
    """What ``medge.load`` chose and why (``model.backend``)."""

    name: str
    precision: str
    graph: str
    device: str
    reason: str
    description: str
    passed_over: tuple = ()  # "graph ...: why", for each precision not used

    def __str__(self) -> str:
        return f"{self.description} ({self.reason})"


class Model:
    """A loaded bundle ready to predict. Use ``medge.load``; close it (or use ``with``) when done.

    A Model is not safe to call from several threads at once: its backend's
    buffers are allocated once and reused by every call. Serve concurrent
    callers through one ``medge.Batcher``, which owns the Model's calls.
    """

    def __init__(self, bundle, backend: Backend, choice: BackendChoice, task, envelope_check) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = manifest
        self.backend_impl = backend
        self.backend = choice
        self.task = task
        self.envelope_check = envelope_check
        self.labels: tuple = tuple(getattr(task, "labels", ()))
        self.max_batch: int = backend.max_batch
        if task.kind == "segmentation":
            # A volume spec (manifest["preprocess"]["kind"] == "volume"): series in, (C, *window) per window.
            self.spec = _volume_spec(manifest, backend)
            channels = 2 * self.spec.neighbours + 1 if self.spec.neighbours else 1
            expected = (channels, *task.roi)
        else:
            spec = PreprocessSpec.from_dict(manifest["preprocess"])
            # The graph's input dtype decides what preprocessing writes (fp16 graphs take fp16).
            self.spec = spec.replace(dtype="float16" if backend.input.dtype == np.float16 else "float32")
            expected = self.spec.output_shape_per_image
        if tuple(backend.input.shape) != expected:
            backend.close()
            raise BundleError(f"the bundle's graph takes {backend.input.shape} per image but its preprocessing "
                              f"spec makes {expected}: the bundle is inconsistent")
        try:
            task.check_output_shape((backend.max_batch, *backend.outputs[0].shape), BundleError)
        except BundleError:
            backend.close()
            raise

    @property
    def envelope(self):
        """The validated input envelope (None: the bundle records none)."""
        return self.envelope_check.envelope

    # ------------------------------------------------------------------ prediction

    def predict(self, item: Any) -> Prediction:
        """Predict one image (one frame). Raises MedgeError for bad input."""
        predictions = self.predict_batch([item])
        if len(predictions) != 1:
            raise MedgeError(f"the input has {len(predictions)} frames; use predict_batch for multi-frame images")
        return predictions[0]

    def predict_batch(self, items: Sequence[Any], *, return_exceptions: bool = False) -> list:
        """Predict many images, batched up to ``max_batch``; one Prediction per frame, in order.

        With ``return_exceptions``, a failed item gives its MedgeError in its
        place (one entry). ``predict_each`` keeps the grouping per item.
        """
        flat: list = []
        for entry in self.predict_each(items, return_exceptions=return_exceptions):
            flat.extend(entry if isinstance(entry, list) else [entry])
        return flat

    def predict_each(self, items: Sequence[Any], *, return_exceptions: bool = True) -> list:
        """One entry per item: its Predictions (one per frame), or the MedgeError it failed with.

        Args:
            items: DICOM paths, bytes, pydicom Datasets, ``medge.Image``s, or
                numpy arrays of stored values.
            return_exceptions: give a failed item's MedgeError in its place
                instead of raising the first error.

        Returns:
            Per item, in input order: a list of Predictions, or a MedgeError.
        """
        if self.task.kind != "classification":
            raise MedgeError(f"this bundle's task is {self.task.kind}: it segments series; use "
                             "model.segment(series_folder_or_volume), or medge run BUNDLE SERIES_DIR")
        images: list = []
        read_ms: list[float] = []
        flags: list[tuple] = []
        for item in items:
            started = time.perf_counter()
            try:
                image = _as_image(item)
                flags.append(self.envelope_check(image))  # raises OutsideEnvelope when enforcing
                images.append(image)
            except MedgeError as exc:
                if not return_exceptions:
                    raise
                images.append(exc)
                flags.append(())
            read_ms.append((time.perf_counter() - started) * 1e3)

        # Frame-level work list: (item index, image, frame index).
        slots = [(i, image, f) for i, image in enumerate(images) if isinstance(image, Image)
                 for f in range(image.number_of_frames)]
        results: list = [image if not isinstance(image, Image) else [] for image in images]
        for start in range(0, len(slots), self.max_batch):
            chunk = slots[start : start + self.max_batch]
            for (i, _, _), outcome in zip(chunk, self._run_chunk(chunk, read_ms, flags, return_exceptions)):
                if isinstance(outcome, MedgeError):
                    results[i] = outcome  # a frame that failed fails its image
                elif isinstance(results[i], list):
                    results[i].append(outcome)
        return results

    def _run_chunk(self, chunk, read_ms, flags, return_exceptions) -> list:
        backend = self.backend_impl
        frames = [_single_frame(image, f) for _, image, f in chunk]
        started = time.perf_counter()
        failed: dict[int, MedgeError] = {}
        try:
            preprocess(frames, self.spec, device=backend.device, out=backend.input_buffer(len(frames)),
                       stream=backend.stream)
            ran = list(range(len(frames)))
        except MedgeError:
            # Find the culprit(s) without losing the others: each frame alone (into the buffer's first
            # slot, which every backend's input_buffer(1) is, host or device), then the good ones together.
            # Slicing the buffer would not do: a device binding is not a numpy array.
            for k, frame in enumerate(frames):
                try:
                    preprocess([frame], self.spec, device=backend.device, out=backend.input_buffer(1),
                               stream=backend.stream)
                except MedgeError as exc:
                    if not return_exceptions:
                        raise
                    failed[k] = exc
            ran = [k for k in range(len(frames)) if k not in failed]
            if ran:
                preprocess([frames[k] for k in ran], self.spec, device=backend.device,
                           out=backend.input_buffer(len(ran)), stream=backend.stream)
        prep_ms = (time.perf_counter() - started) * 1e3
        n = len(ran)
        outputs, maps, infer_ms = None, None, 0.0
        heatmap_output = getattr(self.task, "heatmap_output", None)
        if n:
            started = time.perf_counter()
            if heatmap_output:
                every = backend.execute_all(n)
                outputs = np.asarray(every[backend.outputs[0].name], dtype=np.float32)
                maps = every[heatmap_output]
            else:
                outputs = backend.execute(n)
            infer_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        interpreted = dict(zip(ran, self.task.interpret(outputs))) if n else {}
        results = []
        for k, (i, image, f) in enumerate(chunk):
            if k in failed:
                results.append(failed[k])
                continue
            scores, index, label = interpreted[k]
            heatmap = None
            if maps is not None:
                heatmap = to_image_grid(np.asarray(maps[ran.index(k), self.task.heatmap_channel(index)], np.float32),
                                        image.semantics.rows, image.semantics.columns, self.spec.fit)
            results.append(Prediction(
                scores=scores, label=label, index=index, sop_instance_uid=image.sop_instance_uid, frame=f,
                timings_ms={"read": read_ms[i], "preprocess": prep_ms, "infer": infer_ms, "batch_size": n},
                warnings=flags[i], heatmap=heatmap))
        post_ms = (time.perf_counter() - started) * 1e3
        for r in results:
            if isinstance(r, Prediction):
                r.timings_ms["postprocess"] = post_ms
        return results

    # ------------------------------------------------------------------ segmentation

    def segment(self, source: Any, *, probabilities: bool = False, threads: int = 0,
                batch_size: Optional[int] = None):
        """Segment one series (segmentation bundles).

        Args:
            source: a ``medge.Volume`` (from ``medge.read_series``), or what
                ``read_series`` takes: a folder of one series, files, bytes, Datasets.
            probabilities: also return the per-class probabilities on the series' grid (memory: classes x voxels
                float32).
            threads: CPU threads for the volume preprocessing (0: all cores).
            batch_size: windows per backend call (default: the bundle's sliding-window batch; at most max_batch).

        Returns:
            ``medge.Segmentation``: the uint8 label map on the series' own grid (slice order of the Volume),
            labels, volumes in mL, warnings, timings per stage, precision and backend.

        Raises:
            MedgeError: a classification bundle; SeriesError / DicomError: the series cannot be read (a gapped
                series is refused); OutsideEnvelope: outside the validated envelope (``envelope="enforce"``).
        """
        if self.task.kind != "segmentation":
            raise MedgeError(f"this bundle's task is {self.task.kind}: it scores images; use model.predict(...) "
                             "(segment needs a bundle converted with --task segmentation)")
        from .segment import segment

        return segment(self, source, probabilities=probabilities, threads=threads, batch_size=batch_size)

    def write_segmentation(self, volume: Any, segmentation: Any, out_dir: Any, **kwargs: Any):
        """Write ``segmentation`` of ``volume`` as a DICOM Segmentation into ``out_dir`` (highdicom), with this
        bundle's labels, name, version and manifest SHA-256; returns the dataset (its ``filename`` is the
        file). Keyword arguments go to :func:`medge.seg_out.write_segmentation`."""
        from ..seg_out import write_segmentation

        model = self.manifest.get("model") or {}
        return write_segmentation(volume, segmentation.label_map, labels=list(self.task.labels),
                                  bundle_name=str(model.get("name") or "medge-model"),
                                  bundle_version=str(model.get("version") or "1"),
                                  manifest_sha256=self.bundle.manifest_sha256, out_dir=out_dir, **kwargs)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.backend_impl.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self.manifest.get("model", {}).get("name", "?")
        return f"Model({name!r}, backend={self.backend})"


def _volume_spec(manifest: dict, backend: Backend):
    """The bundle's VolumeSpec (BundleError when it is not one)."""
    from ..errors import SpecError
    from ..volume import VolumeSpec

    entry = dict(manifest["preprocess"])
    if entry.pop("kind", None) != "volume":
        backend.close()
        raise BundleError("the bundle's task is segmentation but its preprocess section is not a volume spec "
                          "(kind 'volume'): the bundle is inconsistent")
    try:
        return VolumeSpec.from_dict(entry).replace(dtype="float32")
    except SpecError as exc:
        backend.close()
        raise BundleError(f"the bundle's volume spec is invalid: {exc}") from None


def _as_image(item: Any) -> Image:
    from ..dicom import read_dicom

    if isinstance(item, Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.from_array(item)
    return read_dicom(item)


def _single_frame(image: Image, frame: int) -> Image:
    if image.number_of_frames == 1:
        return image
    from ..image import PixelSemantics

    sem = image.semantics
    single = PixelSemantics(rows=sem.rows, columns=sem.columns, number_of_frames=1, bits_allocated=sem.bits_allocated,
                            bits_stored=sem.bits_stored, pixel_representation=sem.pixel_representation,
                            photometric_interpretation=sem.photometric_interpretation,
                            frames=(sem.frame_transform(frame),))
    return Image(image.pixels[frame : frame + 1], single, image.sop_instance_uid)


# ---------------------------------------------------------------------- loading


def load(bundle: Union[str, os.PathLike], backend: str = "auto", device: Union[int, str] = 0, *,
         trusted_key: Any = None, precision: Optional[str] = None, engine_cache: Any = None, threads: int = 0,
         use_cuda_graphs: bool = True, allow_failed_gates: bool = False, envelope: str = "enforce",
         self_test: bool = True) -> Model:
    """Load a bundle for prediction.

    The bundle is verified first (every file's SHA-256; with ``trusted_key``
    also its Ed25519 signature, which must then be present): nothing is
    deserialised from an unverified bundle.

    Backend choice for ``backend="auto"``:
    1. a bundled TensorRT / TensorRT-RTX engine made for this GPU and the
       installed TensorRT version;
    2. else an engine built here from the bundle's ONNX graph when TensorRT is
       installed, kept in the engine cache (keyed by flavour + version, GPU,
       compute capability, SM count, model hash, precision, profile);
    3. else, on an x86 CPU with openvino installed (``medge[openvino]``) and
       no CUDA provider for ONNX Runtime to use, OpenVINO on the
       TensorRT-placed INT8 graph (its int8 kernels: the fastest CPU path);
       ``backend="openvino"`` also runs its FP32 and FP16 graphs;
    4. else ONNX Runtime (CUDA provider when present, else CPU), on the INT8
       graph placed for ONNX Runtime when the bundle has one. It is also the
       fallback when OpenVINO is missing, crashes or fails its check vectors.

    Within each, precisions are tried fastest first, and a precision is used
    only when (a) its accuracy gates passed at conversion (a "failed" or "not
    measured" precision is passed over unless asked for by name with
    ``allow_failed_gates=True``) and (b) it reproduces the bundle's check
    vectors here (the self-test). ``model.backend`` says what was chosen, what
    was passed over and why; it is logged once.

    Args:
        bundle: path of a NAME.medge bundle.
        backend: "auto", "onnxruntime", "openvino", "tensorrt" or "tensorrt_rtx".
        device: CUDA device index (or "cuda", "cuda:N") for GPU backends, or "cpu" to stay on the CPU.
        trusted_key: Ed25519 public key (PEM path / bytes / key) the bundle must be signed with.
        precision: "fp32", "fp16" or "int8" (default: the fastest that passed its gates and self-test).
        engine_cache: folder of the engine cache (default: $MEDGE_ENGINE_CACHE or ~/.cache/medge/engines);
            OpenVINO remembers there (``openvino-compiled/``) which graphs compiled safely in a child process.
        threads: CPU threads for ONNX Runtime and OpenVINO (0: all cores).
        use_cuda_graphs: replay CUDA graphs per batch size on TensorRT (falls back when capture fails).
        allow_failed_gates: with ``precision``, run it even though it failed
            (or never ran) its accuracy gates at conversion; logs a warning.
        envelope: "enforce" (default) refuses items outside the validated
            input envelope, "warn" predicts them flagged (``Prediction.warnings``),
            "off" does not check.
        self_test: run the check vectors on the chosen backend and precision
            (default); False skips it (tests of the runtime itself).

    Raises:
        BundleError / SignatureError: the bundle does not verify.
        BackendUnavailable: the requested backend or precision cannot run here (with every reason).
    """
    from ..bundle import Bundle
    from ..tasks import task_from_manifest
    from .checks import CheckVectors
    from .envelope import ENVELOPE_MODES, Envelope, EnvelopeCheck

    if backend not in BACKENDS:
        raise MedgeError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise MedgeError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if envelope not in ENVELOPE_MODES:
        raise MedgeError(f"envelope must be one of {', '.join(ENVELOPE_MODES)}, got {envelope!r}")
    if allow_failed_gates and precision is None:
        raise MedgeError("allow_failed_gates needs an explicit precision: name the one you accept")
    device = parse_device(device)
    opened = Bundle.open(bundle)
    opened.verify(trusted_key=trusted_key, require_signature=trusted_key is not None)
    manifest = opened.manifest
    # Bundle.open checked the shape of every section present; these must be present to run at all.
    missing = [key for key in ("task", "graphs", "profile", "preprocess", "gates", "check_vectors")
               if not manifest.get(key)]
    if missing:
        raise BundleError(f"the bundle's manifest has no {', '.join(missing)}: it was written by an older medge "
                          "or damaged; convert the model again with this medge")
    task = task_from_manifest(manifest)
    checks = CheckVectors.from_bundle(opened) if self_test else None
    selection = _Selection(manifest, precision, allow_failed_gates, checks, task)
    envelope_check = EnvelopeCheck(Envelope.from_manifest(manifest.get("envelope")), envelope)
    max_batch = int(manifest["profile"]["max"])

    from .. import _C

    reasons = []
    if backend in ("auto", "tensorrt", "tensorrt_rtx") and device != "cpu":
        flavours = ("tensorrt", "tensorrt_rtx") if backend == "auto" else (backend,)
        if not _C.cuda_compiled() or _C.cuda_device_count() == 0:
            reasons.append(f"no CUDA device ({_C.cuda_status()})")
            flavours = ()
        for flavour in flavours:
            try:
                impl, choice = _load_tensorrt(opened, flavour, int(device), selection, max_batch, engine_cache,
                                              use_cuda_graphs)
            except BackendUnavailable as exc:
                reasons.append(f"{flavour}: {exc}")
                continue
            return _announce(Model(opened, impl, choice, task, envelope_check))
        if backend != "auto":
            raise BackendUnavailable("; ".join(reasons + selection.passed_over))
    if reasons:
        why = "TensorRT not usable here: " + "; ".join(reasons)
    elif backend in ("onnxruntime", "openvino"):
        why = f"{'ONNX Runtime' if backend == 'onnxruntime' else 'OpenVINO'} requested"
    else:
        why = "device='cpu' requested"
    openvino_order = _OPENVINO_ORDER if backend == "openvino" else _OPENVINO_AUTO_ORDER
    if backend == "openvino" or (backend == "auto" and _openvino_preferred(device)
                                 and any(g in selection.graphs for g in selection.precisions(openvino_order))):
        noted = len(selection.passed_over)
        try:
            impl, choice = _load_openvino(opened, selection, max_batch, threads, why, engine_cache, openvino_order)
            return _announce(Model(opened, impl, choice, task, envelope_check))
        except BackendUnavailable as exc:  # MissingDependency included
            if backend == "openvino":
                raise
            # ONNX Runtime is the fallback; the graphs OpenVINO passed over say why in the choice's note.
            why += "; OpenVINO not usable" + ("" if len(selection.passed_over) > noted else f": {exc}")
    impl, choice = _load_onnxruntime(opened, selection, max_batch, threads, device, why)
    return _announce(Model(opened, impl, choice, task, envelope_check))


def self_test(bundle: Union[str, os.PathLike], *, trusted_key: Any = None, device: Union[int, str] = 0,
              threads: int = 0) -> list[dict]:
    """Run the bundle's check vectors on every graph (ONNX Runtime) and, on a GPU, every engine precision.

    What ``medge inspect --verify --self-test`` prints: whether this machine's
    numerics reproduce the converting machine's FP32 outputs, per graph.

    Returns:
        One dict per run: {"backend", "graph", "verdict" (the conversion's), "passed", "failures"}.

    Raises:
        BundleError / SignatureError: the bundle does not verify.
        MissingDependency: ONNX Runtime is not installed.
    """
    from ..bundle import Bundle
    from ..tasks import task_from_manifest
    from .backends.onnxruntime import OnnxRuntimeBackend
    from .checks import CheckVectors

    opened = Bundle.open(bundle)
    opened.verify(trusted_key=trusted_key, require_signature=trusted_key is not None)
    manifest = opened.manifest
    task = task_from_manifest(manifest)
    checks = CheckVectors.from_bundle(opened)
    verdicts = (manifest.get("gates") or {}).get("verdicts") or {}
    results = []
    for graph, entry in (manifest.get("graphs") or {}).items():
        verdict = (verdicts.get(graph) or {}).get("verdict", "not measured")
        try:
            impl = OnnxRuntimeBackend(_graph_bytes(opened, graph), precision=entry.get("precision", graph),
                                      max_batch=int(manifest["profile"]["max"]), providers=["CPUExecutionProvider"],
                                      threads=threads, device_id=0)
        except MedgeError as exc:
            results.append({"backend": "onnxruntime cpu", "graph": graph, "verdict": verdict, "passed": False,
                            "failures": [f"cannot run here: {exc}"]})
            continue
        with impl:
            failures = checks.failures(impl, task, graph)
        results.append({"backend": "onnxruntime cpu", "graph": graph, "verdict": verdict, "passed": not failures,
                        "failures": failures})
    from .. import _C

    if device != "cpu" and _C.cuda_compiled() and _C.cuda_device_count() > 0:
        for flavour in ("tensorrt", "tensorrt_rtx"):
            for precision in _TENSORRT_ORDER:
                try:
                    with load(opened.path, backend=flavour, device=device, precision=precision,
                              trusted_key=trusted_key, allow_failed_gates=True) as model:
                        results.append({"backend": f"{flavour} {model.backend.device}", "graph": precision,
                                        "verdict": (verdicts.get(precision) or {}).get("verdict", "not measured"),
                                        "passed": True, "failures": []})
                except BackendUnavailable as exc:
                    results.append({"backend": flavour, "graph": precision, "verdict": "-", "passed": False,
                                    "failures": [str(exc)]})
    return results


def parse_device(device: Union[int, str]) -> Union[int, str]:
    """0, 1, "cuda", "cuda:1", "1" -> a CUDA device index; "cpu" stays "cpu".

    Raises:
        MedgeError: anything else.
    """
    if isinstance(device, bool):
        raise MedgeError(f"device must be a CUDA device index, 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if isinstance(device, int):
        index = device
    elif isinstance(device, str):
        text = device.strip().lower()
        if text == "cpu":
            return "cpu"
        if text == "cuda":
            return 0
        text = text[len("cuda:"):] if text.startswith("cuda:") else text
        if not text.isdigit():
            raise MedgeError(f"device must be a CUDA device index, 'cuda', 'cuda:N' or 'cpu', got {device!r}")
        index = int(text)
    else:
        raise MedgeError(f"device must be a CUDA device index, 'cuda', 'cuda:N' or 'cpu', got {device!r}")
    if index < 0:
        raise MedgeError(f"device index must be >= 0, got {index}")
    return index


class _Selection:
    """Which graphs a load may use, in what order, and the record of what it passed over and why."""

    def __init__(self, manifest: dict, precision: Optional[str], allow_failed_gates: bool, checks, task) -> None:
        self.graphs: dict = manifest["graphs"]
        self.verdicts: dict = manifest["gates"].get("verdicts") or {}
        self.precision = precision
        self.allow_failed_gates = allow_failed_gates
        self.checks = checks
        self.task = task
        self.passed_over: list[str] = []
        self._noted: set = set()

    def precisions(self, order: Sequence[str]) -> list[str]:
        """``order`` narrowed to the asked-for precision (its graphs all belong to it)."""
        if self.precision is None:
            return list(order)
        return [g for g in order if self.graphs.get(g, {}).get("precision", g) == self.precision]

    def allowed(self, graph: str, where: str) -> bool:
        """May ``graph`` run? Records why not (once per graph) and warns for explicitly allowed failures."""
        verdict = self.verdicts.get(graph, {"verdict": "not measured", "reasons": ["no verdict in the manifest"]})
        if verdict["verdict"] in DEFAULT_CHOICE_VERDICTS:
            return True
        why = f"{graph} {verdict['verdict']} its accuracy gates at conversion" if verdict["verdict"] == "failed" \
            else f"{graph} was not measured at conversion"
        details = "; ".join(verdict.get("reasons") or [])
        if self.allow_failed_gates:
            if graph not in self._noted:
                _LOG.warning("medge: running %s although it %s (%s): allow_failed_gates=True", graph,
                             why.split(" ", 1)[1], details)
                self._noted.add(graph)
            return True
        if graph not in self._noted:
            self.passed_over.append(f"{why} ({details})" if details else why)
            self._noted.add(graph)
        return False

    def self_test(self, backend, graph: str, where: str) -> bool:
        """Does ``backend`` reproduce the check vectors? Records why not."""
        if self.checks is None:
            return True
        failures = self.checks.failures(backend, self.task, graph)
        if failures:
            self.passed_over.append(f"{graph} on {where} failed the self-test: {'; '.join(failures)}")
            return False
        return True

    def note(self) -> str:
        return f"; passed over: {' | '.join(self.passed_over)}" if self.passed_over else ""

    def nothing_left(self, where: str) -> BackendUnavailable:
        if self.precision is not None and self.passed_over and not self.allow_failed_gates:
            hint = " (pass allow_failed_gates=True, or --allow-failed-gates, to run it anyway)"
        else:
            hint = ""
        return BackendUnavailable(f"no precision of the bundle is usable on {where}"
                                  + (f": {' | '.join(self.passed_over)}" if self.passed_over else "") + hint)


def _announce(model: Model) -> Model:
    _LOG.info("medge: %s", model.backend)
    return model


def _graph_bytes(bundle, graph: str) -> bytes:
    entry = bundle.manifest["graphs"][graph]
    return bundle.read_verified(entry["file"])


def _load_onnxruntime(bundle, selection: "_Selection", max_batch, threads, device, why):
    from .backends.onnxruntime import OnnxRuntimeBackend

    graphs = selection.graphs
    order = [g for g in selection.precisions(_ORT_DEFAULT_ORDER) if g in graphs]
    if not order:
        raise BackendUnavailable(f"the bundle has no graph for {selection.precision} (it has {', '.join(graphs)})")
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    for graph in order:
        if not selection.allowed(graph, "onnxruntime"):
            continue
        impl = OnnxRuntimeBackend(_graph_bytes(bundle, graph), precision=graphs[graph].get("precision", graph),
                                  max_batch=max_batch, providers=providers, threads=threads,
                                  device_id=0 if device == "cpu" else int(device))
        where = f"cuda:{device}" if "CUDAExecutionProvider" in impl.providers else "cpu"
        if not selection.self_test(impl, graph, f"onnxruntime {where}"):
            impl.close()
            continue
        return impl, BackendChoice("onnxruntime", impl.precision, graph, where, f"{why}; graph {graph}"
                                   + selection.note(), impl.describe(), tuple(selection.passed_over))
    raise selection.nothing_left("ONNX Runtime")


def _openvino_preferred(device) -> bool:
    """Does ``auto`` try OpenVINO before ONNX Runtime? On x86 CPUs with openvino installed, unless ONNX Runtime
    would run on a GPU (its CUDA provider, when a CUDA device was asked for)."""
    import platform

    from .backends import openvino

    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i386", "i686") or not openvino.available():
        return False
    if device != "cpu":
        from .backends.onnxruntime import OnnxRuntimeBackend

        return not OnnxRuntimeBackend.has_cuda()
    return True


def _load_openvino(bundle, selection: "_Selection", max_batch, threads, why, engine_cache, order=_OPENVINO_ORDER):
    from .backends.openvino import OpenVINOBackend
    from .engine_cache import EngineCache

    graphs = selection.graphs
    order = [g for g in selection.precisions(order) if g in graphs]
    if not order:
        raise BackendUnavailable(f"the bundle has no graph OpenVINO runs for {selection.precision or 'any precision'} "
                                 f"(it has {', '.join(graphs)})")
    # Graphs that compiled in an isolated child process are remembered beside the engine cache.
    verdicts = EngineCache(engine_cache).directory / "openvino-compiled"
    outputs = [o.get("name") for o in bundle.manifest.get("outputs") or [] if isinstance(o, dict)]
    for graph in order:
        if not selection.allowed(graph, "openvino"):
            continue
        try:
            impl = OpenVINOBackend(_graph_bytes(bundle, graph), precision=graphs[graph].get("precision", graph),
                                   max_batch=max_batch, threads=threads, output_names=outputs or None,
                                   verdict_dir=verdicts)
        except BackendUnavailable as exc:
            if isinstance(exc, ImportError):  # MissingDependency: no graph will do better
                raise
            selection.passed_over.append(f"{graph} on openvino: {exc}")
            continue
        if not selection.self_test(impl, graph, "openvino cpu"):
            impl.close()
            continue
        return impl, BackendChoice("openvino", impl.precision, graph, "cpu", f"{why}; graph {graph}" + selection.note(),
                                   impl.describe(), tuple(selection.passed_over))
    raise selection.nothing_left("OpenVINO")


def _load_tensorrt(bundle, flavour, device, selection: "_Selection", max_batch, engine_cache, use_cuda_graphs):
    """A TensorRT backend from a matching bundled engine, else from the engine cache (built on a miss).

    TensorRT-RTX on a GPU it does not target is refused before any engine is
    read or built. RTX engines get their runtime cache (JIT-compiled kernels)
    from the engine cache folder, bundled ones too.
    """
    try:
        from .backends.tensorrt import TensorRTBackend, gpu_identity, rtx_unsupported_reason
        from .engine_cache import EngineCache
        from .._tensorrt import import_flavour
        from ..convert.engine import engine_cache_key
    except ImportError as exc:
        raise BackendUnavailable(f"the TensorRT backend is not available: {exc}") from exc
    trt = import_flavour(flavour, "The TensorRT runtime backend")  # MissingDependency names the extra
    gpu = gpu_identity(device)
    if flavour == "tensorrt_rtx":
        refusal = rtx_unsupported_reason(trt, gpu)
        if refusal is not None:  # a BackendUnavailable: load(backend="auto") goes on to the next backend
            raise BackendUnavailable(refusal)
    version = str(trt.__version__)
    engines = bundle.manifest.get("engines") or []
    graphs = selection.graphs
    cache = EngineCache(engine_cache)
    profile = bundle.manifest.get("profile") or {"min": 1, "opt": 1, "max": 1}
    for p in selection.precisions(_TENSORRT_ORDER):
        if p not in graphs or not selection.allowed(p, flavour):
            continue
        entry = next((e for e in engines if e.get("flavour") == flavour and e.get("precision") == p
                      and str(e.get("flavour_version")) == version and _engine_fits(e, gpu)), None)
        if entry is not None:
            plan = bundle.read_verified(entry["file"])
            # Keyed like a cache entry on this GPU, with the bundled plan's hash in the model's place.
            key = engine_cache_key(flavour, version, gpu["name"], gpu["compute_capability"], gpu["sm_count"],
                                   bundle.files[entry["file"]].sha256, p, profile)
            impl = TensorRTBackend(plan, flavour=flavour, device=device, precision=p, max_batch=max_batch,
                                   use_cuda_graphs=use_cuda_graphs, flavour_version=str(entry.get("flavour_version")),
                                   runtime_cache=cache.runtime_cache(key, plan) if flavour == "tensorrt_rtx" else None)
            graph, reason = entry["file"], f"bundled engine built for {gpu['name']}"
        else:
            plan, key = _cached_engine(cache, bundle, p, flavour, version, gpu, device)
            impl = TensorRTBackend(plan, flavour=flavour, device=device, precision=p, max_batch=max_batch,
                                   use_cuda_graphs=use_cuda_graphs,
                                   runtime_cache=cache.runtime_cache(key, plan) if flavour == "tensorrt_rtx" else None)
            graph, reason = p, (f"no bundled engine for {gpu['name']} and {flavour} {version}: built from the "
                                f"{p} graph into the engine cache")
        if not selection.self_test(impl, p, f"{flavour} cuda:{device}"):
            impl.close()
            continue
        return impl, BackendChoice(flavour, p, graph, f"cuda:{device}", reason + selection.note(), impl.describe(),
                                   tuple(selection.passed_over))
    raise BackendUnavailable(f"the bundle has no engine or graph usable by {flavour}"
                             + (f" ({' | '.join(selection.passed_over)})" if selection.passed_over else ""))


def _cached_engine(cache, bundle, graph: str, flavour: str, version: str, gpu: dict, device: int) -> tuple:
    """(plan, key): the engine for ``graph`` on GPU ``device`` from the cache; built on a miss.

    The build reads the verified graph bytes and runs with ``device`` current
    (full TensorRT builds for the current GPU; the previous device is current
    again afterwards). TensorRT-RTX builds for this GPU's compute capability
    alone: its default targets may not include it (Turing 7.5 is opt-in).
    """
    import tempfile
    from pathlib import Path

    from ..convert.engine import build_engine, engine_cache_key
    from .cuda import _on_device

    entry = bundle.manifest["graphs"][graph]
    profile = bundle.manifest.get("profile") or {"min": 1, "opt": 1, "max": 1}
    model_sha256 = bundle.files[entry["file"]].sha256
    fields = {"flavour": flavour, "flavour_version": version, "gpu_name": gpu["name"],
              "compute_capability": gpu["compute_capability"], "sm_count": gpu["sm_count"],
              "model_sha256": model_sha256, "precision": graph, "profile": profile}
    key = engine_cache_key(flavour, version, gpu["name"], gpu["compute_capability"], gpu["sm_count"], model_sha256,
                           graph, profile)

    targets = {"compute_capabilities": [gpu["compute_capability"]]} if flavour == "tensorrt_rtx" else {}

    def build() -> bytes:
        with tempfile.TemporaryDirectory(prefix="medge-engine-") as tmp, _on_device(device):
            onnx_path = Path(tmp) / "model.onnx"
            onnx_path.write_bytes(bundle.read_verified(entry["file"]))
            info = build_engine(onnx_path, Path(tmp) / "model.engine", flavour=flavour, precision=entry.get(
                "precision", graph), batch=(profile["min"], profile["opt"], profile["max"]), **targets)
            return Path(info.file).read_bytes()

    return cache.get_or_build(key, build, fields), key


def _engine_fits(entry: dict, gpu: dict) -> bool:
    """A bundled engine runs on this GPU: built on it (full TensorRT) or targeting its compute capability (RTX)."""
    if entry.get("gpu"):
        built = entry["gpu"]
        return built.get("name") == gpu["name"] and str(built.get("compute_capability")) == gpu["compute_capability"]
    targets = entry.get("compute_capabilities") or []
    return gpu["compute_capability"] in [str(t) for t in targets]


__all__ = ["load", "Model", "Prediction", "BackendChoice", "BACKENDS"]
