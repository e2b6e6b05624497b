"""One folder per custom op: torch op + reference, ONNX schema and function, lowerings, kernels, TensorRT plugin."""
