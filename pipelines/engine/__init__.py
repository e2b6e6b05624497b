"""Engines: TensorRT / TensorRT-RTX backends, lowering of custom ops, optimization profiles, ``llmtrt build``."""
