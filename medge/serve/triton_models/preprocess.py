"""medge preprocessing as a Triton python-backend model (written by ``medge export-triton``).

DICOM bytes in (TYPE_STRING, one object per batch row), the network's input
out: medge.read_dicom, the bundle's validated input envelope (enforced), and
medge.preprocess with the bundle's PreprocessSpec, exactly as medge.load does.
Everything model-specific comes from config.pbtxt ``parameters``:

- ``medge_preprocess_spec``: the PreprocessSpec (JSON), dtype already the graph's input dtype;
- ``medge_envelope``: the manifest's envelope (JSON, ``null`` when none);
- ``medge_envelope_mode``: "enforce" (default), "warn" or "off";
- ``medge_threads``: CPU preprocessing threads (0: all cores).

A request whose DICOM cannot be read, lies outside the envelope, or cannot be
preprocessed fails alone, with medge's message (which never holds a patient
value); the other requests batched with it are answered normally. On a
KIND_GPU instance the batch is preprocessed by medge's CUDA kernel and handed
to the next model as DLPack, without a copy to the host.
"""

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameters(config):
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        import medge
        from medge.preprocess import PreprocessSpec
        from medge.runtime.envelope import Envelope, EnvelopeCheck

        config = json.loads(args["model_config"])
        params = _parameters(config)
        self.spec = PreprocessSpec.from_json(params["medge_preprocess_spec"])
        self.check = EnvelopeCheck(Envelope.from_manifest(json.loads(params.get("medge_envelope") or "null")),
                                   params.get("medge_envelope_mode") or "enforce")
        self.threads = int(params.get("medge_threads") or 0)
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = f"cuda:{int(args.get('model_instance_device_id') or 0)}" if gpu else "cpu"
        self.medge = medge
        exported = params.get("medge_version")
        if exported and exported != medge.__version__:
            pb_utils.Logger.log_warn(f"medge {medge.__version__} runs a repository exported by medge {exported}")

    def _read(self, request):
        """The request's images (one per batch row), or the MedgeError it fails with."""
        from medge.errors import MedgeError

        blobs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
        images = []
        for blob in blobs:
            image = self.medge.read_dicom(bytes(blob))
            if image.number_of_frames != 1:
                raise MedgeError(f"the DICOM object has {image.number_of_frames} frames; Triton answers one row "
                                 "per input, so send one single-frame object per row")
            self.check(image)  # raises OutsideEnvelope when enforcing
            images.append(image)
        return images

    def _preprocess(self, images):
        if self.device == "cpu":
            return self.medge.preprocess(images, self.spec, device="cpu", num_threads=self.threads)
        return self.medge.preprocess(images, self.spec, device=self.device)

    def _tensor(self, result):
        if isinstance(result, np.ndarray):
            return pb_utils.Tensor(self.output_name, result)
        return pb_utils.Tensor.from_dlpack(self.output_name, result)  # a medge DeviceArray on the GPU

    def execute(self, requests):
        from medge.errors import MedgeError

        responses = [None] * len(requests)
        readable = []  # (request index, images)
        for index, request in enumerate(requests):
            try:
                readable.append((index, self._read(request)))
            except MedgeError as exc:
                responses[index] = _error(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must fail its request, not the server
                responses[index] = _bug(exc)
        if readable and self.device == "cpu":
            # One fused pass over every image of every request in this batch.
            try:
                batch = self._preprocess([image for _, images in readable for image in images])
            except MedgeError:
                batch = None  # find the culprit below, one request at a time
            if batch is not None:
                start = 0
                for index, images in readable:
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[self._tensor(batch[start : start + len(images)])])
                    start += len(images)
                readable = []
        for index, images in readable:  # GPU (one DeviceArray per request), or a failed fused pass
            try:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[self._tensor(self._preprocess(images))])
            except MedgeError as exc:
                responses[index] = _error(str(exc))
            except Exception as exc:  # noqa: BLE001
                responses[index] = _bug(exc)
        return responses

    def finalize(self):
        pass


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))


def _bug(exc):
    pb_utils.Logger.log_error("medge preprocessing failed unexpectedly:\n" + traceback.format_exc())
    return _error(f"medge preprocessing failed unexpectedly ({type(exc).__name__}); see the server log")
