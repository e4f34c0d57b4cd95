"""A bundle graph run by medge's own runtime, as a Triton python-backend model (``medge export-triton``).

For servers that have only the python backend (pytriton's tritonserver, a
CPU-only build): the graph in this version folder (``model.onnx``) is run by
medge's ONNX Runtime backend, with the same buffers, threads and self-test as
``medge.load``. Its inputs and outputs are those of the onnxruntime model of
the same precision, plus SCORES and LABEL (the task's activation and top-1
class, as ``medge.Prediction``), so an ensemble needs no postprocessing step.

At load, before serving anything, it checks the graph's SHA-256 against the
export (Triton verifies nothing about model files) and runs the bundle's
check vectors (``checks_inputs.npy`` / ``checks_outputs.npy``) on this
machine: a graph that does not reproduce them fails to load, with the reason.

Parameters (config.pbtxt): ``medge_graph`` (graph name), ``medge_graph_sha256``,
``medge_task`` (the manifest's task, JSON), ``medge_check_tolerance``,
``medge_threads`` (ONNX Runtime intra-op threads, 0: all cores).
"""

import hashlib
import json
import os
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils


def _parameters(config):
    return {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        from medge.errors import BundleError
        from medge.runtime.backends.onnxruntime import OnnxRuntimeBackend
        from medge.runtime.checks import CheckVectors
        from medge.tasks import task_from_manifest

        config = json.loads(args["model_config"])
        params = _parameters(config)
        folder = os.path.join(args["model_repository"], str(args["model_version"]))
        with open(os.path.join(folder, "model.onnx"), "rb") as f:
            graph_bytes = f.read()
        graph = params["medge_graph"]
        if hashlib.sha256(graph_bytes).hexdigest() != params["medge_graph_sha256"]:
            raise BundleError(f"{config['name']}/{args['model_version']}/model.onnx is not the {graph} graph that "
                              "medge exported (SHA-256 differs): export the repository again")
        self.task = task_from_manifest({"task": json.loads(params["medge_task"])})
        providers = ["CPUExecutionProvider"]
        device_id = 0
        if args.get("model_instance_kind") == "GPU":
            providers = None  # CUDA when this onnxruntime has it, else CPU
            device_id = int(args.get("model_instance_device_id") or 0)
        self.backend = OnnxRuntimeBackend(graph_bytes, precision=graph, max_batch=int(config["max_batch_size"]),
                                          providers=providers, threads=int(params.get("medge_threads") or 0),
                                          device_id=device_id)
        checks = CheckVectors(np.load(os.path.join(folder, "checks_inputs.npy"), allow_pickle=False),
                              np.load(os.path.join(folder, "checks_outputs.npy"), allow_pickle=False),
                              {graph: float(params["medge_check_tolerance"])}, "bundle")
        failures = checks.failures(self.backend, self.task, graph)
        if failures:
            self.backend.close()
            raise BundleError(f"the {graph} graph does not reproduce the bundle's check vectors here: "
                              + "; ".join(failures))
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"] if o["name"] not in ("SCORES", "LABEL")]
        self.labels = self.task.labels
        pb_utils.Logger.log_info(f"medge: {config['name']}: {self.backend.describe()}; check vectors reproduced")

    def _outputs(self, n):
        """Every output of the graph for the first n rows of the input buffer, float32 on the host."""
        first = self.backend.execute(n)
        if len(self.output_names) == 1:
            return [first]
        # medge's backends return the first output; ONNX Runtime's binding holds the others.
        return [np.asarray(o, dtype=np.float32) for o in self.backend._binding.copy_outputs_to_cpu()]

    def execute(self, requests):
        from medge.errors import MedgeError

        arrays, responses = [], [None] * len(requests)
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            arrays.append(tensor.as_numpy())
        try:
            batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            results = [[] for _ in self.output_names]
            for start in range(0, len(batch), self.backend.max_batch):
                chunk = batch[start : start + self.backend.max_batch]
                self.backend.input_buffer(len(chunk))[...] = chunk
                for k, output in enumerate(self._outputs(len(chunk))):
                    results[k].append(np.array(output, dtype=np.float32, copy=True))
            outputs = [np.concatenate(r) for r in results]
            scores = self.task.scores(outputs[0]).astype(np.float32)
            indices = self.task.predicted_indices(outputs[0])
            labels = np.array([[(self.labels[i] if i < len(self.labels) else str(i)).encode()] for i in indices],
                              dtype=object)
        except MedgeError as exc:
            return [_error(str(exc)) for _ in requests]
        except Exception as exc:  # noqa: BLE001 - a bug must fail its requests, not the server
            pb_utils.Logger.log_error("medge network failed unexpectedly:\n" + traceback.format_exc())
            return [_error(f"medge network failed unexpectedly ({type(exc).__name__}); see the server log")
                    for _ in requests]
        start = 0
        for index, array in enumerate(arrays):
            rows = slice(start, start + len(array))
            tensors = [pb_utils.Tensor(name, output[rows]) for name, output in zip(self.output_names, outputs)]
            tensors += [pb_utils.Tensor("SCORES", scores[rows]), pb_utils.Tensor("LABEL", labels[rows])]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += len(array)
        return responses

    def finalize(self):
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()


def _error(message):
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
