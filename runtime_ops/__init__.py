"""Custom runtime operators (ONNX functions plus optional kernels)."""
