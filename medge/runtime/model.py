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

from ..errors import BackendUnavailable, MedgeError
from ..image import Image
from ..postprocess import ACTIVATIONS, activate
from ..preprocess import PreprocessSpec, preprocess
from .backends.base import Backend

_LOG = logging.getLogger("medge.runtime")

BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt_rtx")
#: Graphs ONNX Runtime runs, best first, per precision asked for (the ORT-placed INT8 graph is the
#: fast one on CPU; the TensorRT-placed one runs at half FP32 speed there).
_ORT_GRAPHS = {"int8": ("int8-ort", "int8"), "fp16": ("fp16",), "fp32": ("fp32",)}
_ORT_DEFAULT_ORDER = ("int8-ort", "fp32", "fp16", "int8")


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
    """

    scores: np.ndarray
    label: Optional[str]
    index: int
    sop_instance_uid: Optional[str] = None
    frame: int = 0
    timings_ms: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sop_instance_uid": self.sop_instance_uid, "frame": self.frame, "label": self.label,
                "index": self.index, "scores": [float(s) for s in self.scores], "timings_ms": dict(self.timings_ms)}


@dataclass(frozen=True)
class BackendChoice:
    """What ``medge.load`` chose and why (``model.backend``)."""

    name: str
    precision: str
    graph: str
    device: str
    reason: str
    description: str

    def __str__(self) -> str:
        return f"{self.description} ({self.reason})"


class Model:
    """A loaded bundle ready to predict. Use ``medge.load``; close it (or use ``with``) when done.

    A Model is not safe to call from several threads at once: its backend's
    buffers are allocated once and reused by every call. Serve concurrent
    callers through one ``medge.Batcher``, which owns the Model's calls.
    """

    def __init__(self, bundle, backend: Backend, choice: BackendChoice) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = manifest
        self.backend_impl = backend
        self.backend = choice
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        # The graph's input dtype decides what preprocessing writes (fp16 graphs take fp16).
        self.spec = spec.replace(dtype="float16" if backend.input.dtype == np.float16 else "float32")
        self.labels: tuple = tuple(manifest.get("labels") or ())
        self.activation: str = (manifest.get("postprocess") or {}).get("activation", "softmax")
        if self.activation not in ACTIVATIONS:
            raise MedgeError(f"the bundle's postprocess activation {self.activation!r} is not one of "
                             f"{', '.join(ACTIVATIONS)}")
        self.max_batch: int = backend.max_batch
        expected = self.spec.output_shape_per_image
        if tuple(backend.input.shape) != expected:
            raise MedgeError(f"the bundle's graph takes {backend.input.shape} per image but its preprocessing spec "
                             f"makes {expected}: the bundle is inconsistent")

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
        images: list = []
        read_ms: list[float] = []
        for item in items:
            started = time.perf_counter()
            try:
                images.append(_as_image(item))
            except MedgeError as exc:
                if not return_exceptions:
                    raise
                images.append(exc)
            read_ms.append((time.perf_counter() - started) * 1e3)

        # Frame-level work list: (item index, image, frame index).
        slots = [(i, image, f) for i, image in enumerate(images) if isinstance(image, Image)
                 for f in range(image.number_of_frames)]
        results: list = [image if not isinstance(image, Image) else [] for image in images]
        for start in range(0, len(slots), self.max_batch):
            chunk = slots[start : start + self.max_batch]
            for (i, _, _), outcome in zip(chunk, self._run_chunk(chunk, read_ms, return_exceptions)):
                if isinstance(outcome, MedgeError):
                    results[i] = outcome  # a frame that failed fails its image
                elif isinstance(results[i], list):
                    results[i].append(outcome)
        return results

    def _run_chunk(self, chunk, read_ms, return_exceptions) -> list:
        backend = self.backend_impl
        n = len(chunk)
        buffer = backend.input_buffer(n)
        frames = [_single_frame(image, f) for _, image, f in chunk]
        started = time.perf_counter()
        failed: dict[int, MedgeError] = {}
        try:
            preprocess(frames, self.spec, device=backend.device, out=buffer, stream=backend.stream)
        except MedgeError:
            # Find the culprit(s) without losing the others: preprocess frame by frame into its slot.
            for k, frame in enumerate(frames):
                try:
                    preprocess([frame], self.spec, device=backend.device, out=buffer[k : k + 1], stream=backend.stream)
                except MedgeError as exc:
                    if not return_exceptions:
                        raise
                    failed[k] = exc
        prep_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        outputs = backend.execute(n)
        infer_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        scores = activate(outputs.reshape(n, -1), self.activation)
        results = []
        for k, (i, image, f) in enumerate(chunk):
            if k in failed:
                results.append(failed[k])
                continue
            index = int(np.argmax(scores[k])) if scores.shape[1] > 1 else int(scores[k, 0] >= 0.5)
            results.append(Prediction(
                scores=scores[k].astype(np.float32), label=self.labels[index] if index < len(self.labels) else None,
                index=index, sop_instance_uid=image.sop_instance_uid, frame=f,
                timings_ms={"read": read_ms[i], "preprocess": prep_ms, "infer": infer_ms, "batch_size": n}))
        post_ms = (time.perf_counter() - started) * 1e3
        for r in results:
            if isinstance(r, Prediction):
                r.timings_ms["postprocess"] = post_ms
        return results

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
         use_cuda_graphs: bool = True) -> Model:
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
    3. else ONNX Runtime (CUDA provider when present, else CPU), on the INT8
       graph placed for ONNX Runtime when the bundle has one.
    ``model.backend`` says what was chosen and why; it is logged once.

    Args:
        bundle: path of a NAME.medge bundle.
        backend: "auto", "onnxruntime", "tensorrt" or "tensorrt_rtx".
        device: CUDA device index for GPU backends, or "cpu" to stay on the CPU.
        trusted_key: Ed25519 public key (PEM path / bytes / key) the bundle must be signed with.
        precision: "fp32", "fp16" or "int8" (default: the fastest the backend has).
        engine_cache: folder of the engine cache (default: $MEDGE_ENGINE_CACHE or ~/.cache/medge/engines).
        threads: CPU threads for ONNX Runtime (0: all cores).
        use_cuda_graphs: replay CUDA graphs per batch size on TensorRT (falls back when capture fails).

    Raises:
        BundleError / SignatureError: the bundle does not verify.
        BackendUnavailable: the requested backend cannot run here.
    """
    from ..bundle import Bundle

    if backend not in BACKENDS:
        raise MedgeError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise MedgeError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    opened = Bundle.open(bundle)
    opened.verify(trusted_key=trusted_key, require_signature=trusted_key is not None)
    manifest = opened.manifest
    max_batch = int((manifest.get("profile") or {}).get("max", 8))

    from .. import _C

    reasons = []
    if backend in ("auto", "tensorrt", "tensorrt_rtx") and device != "cpu":
        flavours = ("tensorrt", "tensorrt_rtx") if backend == "auto" else (backend,)
        if not _C.cuda_compiled() or _C.cuda_device_count() == 0:
            reasons.append(f"no CUDA device ({_C.cuda_status()})")
            flavours = ()
        for flavour in flavours:
            try:
                impl, choice = _load_tensorrt(opened, flavour, int(device), precision, max_batch, engine_cache,
                                              use_cuda_graphs)
            except BackendUnavailable as exc:
                reasons.append(f"{flavour}: {exc}")
                continue
            return _announce(Model(opened, impl, choice))
        if backend != "auto":
            raise BackendUnavailable("; ".join(reasons))
    if reasons:
        why = "TensorRT not usable here: " + "; ".join(reasons)
    elif backend == "onnxruntime":
        why = "ONNX Runtime requested"
    else:
        why = "device='cpu' requested"
    impl, choice = _load_onnxruntime(opened, precision, max_batch, threads, device, why)
    return _announce(Model(opened, impl, choice))


def _announce(model: Model) -> Model:
    _LOG.info("medge: %s", model.backend)
    return model


def _graph_bytes(bundle, graph: str) -> bytes:
    entry = bundle.manifest["graphs"][graph]
    return bundle.read_verified(entry["file"])


def _load_onnxruntime(bundle, precision, max_batch, threads, device, why):
    from .backends.onnxruntime import OnnxRuntimeBackend

    graphs = bundle.manifest.get("graphs") or {}
    order = _ORT_GRAPHS[precision] if precision else _ORT_DEFAULT_ORDER
    graph = next((g for g in order if g in graphs), None)
    if graph is None:
        raise BackendUnavailable(f"the bundle has no graph for {precision} (it has {', '.join(graphs)})")
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    impl = OnnxRuntimeBackend(_graph_bytes(bundle, graph), precision=graphs[graph].get("precision", graph),
                              max_batch=max_batch, providers=providers, threads=threads,
                              device_id=0 if device == "cpu" else int(device))
    where = f"cuda:{device}" if "CUDAExecutionProvider" in impl.providers else "cpu"
    return impl, BackendChoice("onnxruntime", impl.precision, graph, where, f"{why}; graph {graph}", impl.describe())


def _load_tensorrt(bundle, flavour, device, precision, max_batch, engine_cache, use_cuda_graphs):
    """A TensorRT backend from a matching bundled engine, else from the engine cache (built on a miss)."""
    try:
        from .backends.tensorrt import TensorRTBackend, gpu_identity
        from .engine_cache import EngineCache
        from .._tensorrt import import_flavour
    except ImportError as exc:
        raise BackendUnavailable(f"the TensorRT backend is not available: {exc}") from exc
    trt = import_flavour(flavour, "The TensorRT runtime backend")  # MissingDependency names the extra
    gpu = gpu_identity(device)
    version = str(trt.__version__)
    wanted = [precision] if precision else ["int8", "fp16", "fp32"]
    engines = bundle.manifest.get("engines") or []
    for p in wanted:
        for entry in engines:
            if (entry.get("flavour") == flavour and entry.get("precision") == p
                    and str(entry.get("flavour_version")) == version and _engine_fits(entry, gpu)):
                impl = TensorRTBackend(bundle.read_verified(entry["file"]), flavour=flavour, device=device,
                                       precision=p, max_batch=max_batch, use_cuda_graphs=use_cuda_graphs,
                                       flavour_version=str(entry.get("flavour_version")))
                return impl, BackendChoice(flavour, p, entry["file"], f"cuda:{device}",
                                           f"bundled engine built for {gpu['name']}", impl.describe())
    graphs = bundle.manifest.get("graphs") or {}
    for p in wanted:
        if p not in graphs:
            continue
        plan = _cached_engine(EngineCache(engine_cache), bundle, p, flavour, version, gpu)
        impl = TensorRTBackend(plan, flavour=flavour, device=device, precision=p, max_batch=max_batch,
                               use_cuda_graphs=use_cuda_graphs)
        return impl, BackendChoice(flavour, p, p, f"cuda:{device}",
                                   f"no bundled engine for {gpu['name']} and {flavour} {version}: built from the "
                                   f"{p} graph into the engine cache", impl.describe())
    raise BackendUnavailable(f"the bundle has no engine or graph usable by {flavour}")


def _cached_engine(cache, bundle, graph: str, flavour: str, version: str, gpu: dict) -> bytes:
    """The engine for ``graph`` on this GPU from the cache; built from the verified graph bytes on a miss."""
    import tempfile
    from pathlib import Path

    from ..convert.engine import build_engine, engine_cache_key

    entry = bundle.manifest["graphs"][graph]
    profile = bundle.manifest.get("profile") or {"min": 1, "opt": 1, "max": 1}
    model_sha256 = bundle.files[entry["file"]].sha256
    fields = {"flavour": flavour, "flavour_version": version, "gpu_name": gpu["name"],
              "compute_capability": gpu["compute_capability"], "sm_count": gpu["sm_count"],
              "model_sha256": model_sha256, "precision": graph, "profile": profile}
    key = engine_cache_key(flavour, version, gpu["name"], gpu["compute_capability"], gpu["sm_count"], model_sha256,
                           graph, profile)

    def build() -> bytes:
        with tempfile.TemporaryDirectory(prefix="medge-engine-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            onnx_path.write_bytes(bundle.read_verified(entry["file"]))
            info = build_engine(onnx_path, Path(tmp) / "model.engine", flavour=flavour, precision=entry.get(
                "precision", graph), batch=(profile["min"], profile["opt"], profile["max"]))
            return Path(info.file).read_bytes()

    return cache.get_or_build(key, build, fields)


def _engine_fits(entry: dict, gpu: dict) -> bool:
    """A bundled engine runs on this GPU: built on it (full TensorRT) or targeting its compute capability (RTX)."""
    if entry.get("gpu"):
        built = entry["gpu"]
        return built.get("name") == gpu["name"] and str(built.get("compute_capability")) == gpu["compute_capability"]
    targets = entry.get("compute_capabilities") or []
    return gpu["compute_capability"] in [str(t) for t in targets]


__all__ = ["load", "Model", "Prediction", "BackendChoice", "BACKENDS"]
