"""medge's run side: GPU memory and streams (``medge.runtime.cuda``); backends and the pipeline follow.

Nothing here imports cuda-python, TensorRT or ONNX Runtime at import time.
"""
