"""Precision in the graph: fp16/bf16 conversion, int8/int4 quantization, calibration (``llmtrt quantize``)."""
