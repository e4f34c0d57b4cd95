"""The task's activation after an onnxruntime / tensorrt_plan network (written by ``medge export-triton``).

The network's first output in, SCORES (softmax or sigmoid, float32, as
``medge.Prediction.scores``) and LABEL (the top-1 class name) out. Parameter
``medge_task``: the manifest's task (JSON).
"""

import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from medge.tasks import task_from_manifest

        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in (config.get("parameters") or {}).items()}
        self.task = task_from_manifest({"task": json.loads(params["medge_task"])})
        self.input_name = config["input"][0]["name"]
        self.labels = self.task.labels

    def execute(self, requests):
        from medge.errors import MedgeError

        responses = []
        for request in requests:
            try:
                outputs = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
                scores = self.task.scores(outputs).astype(np.float32)
                labels = np.array([[(self.labels[i] if i < len(self.labels) else str(i)).encode()]
                                   for i in self.task.predicted_indices(outputs)], dtype=object)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("SCORES", scores), pb_utils.Tensor("LABEL", labels)]))
            except MedgeError as exc:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
            except Exception as exc:  # noqa: BLE001 - a bug must fail its request, not the server
                pb_utils.Logger.log_error("medge postprocessing failed unexpectedly:\n" + traceback.format_exc())
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"medge postprocessing failed unexpectedly ({type(exc).__name__}); see the server log")))
        return responses
