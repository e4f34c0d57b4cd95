"""Inference backends behind one contract (base.Backend): ONNX Runtime and TensorRT / TensorRT-RTX."""
