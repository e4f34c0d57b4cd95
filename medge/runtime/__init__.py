"""medge's run side: ``load`` -> ``Model`` (backends, pipeline), ``Batcher``, and CUDA memory and streams.

Nothing here imports cuda-python, TensorRT or ONNX Runtime at import time.
"""

from .batcher import Batcher, BatcherClosed, BatcherError, BatcherStats, QueueFull
from .model import BackendChoice, Model, Prediction, load

__all__ = ["load", "Model", "Prediction", "BackendChoice", "Batcher", "BatcherStats", "BatcherError", "QueueFull",
           "BatcherClosed"]
