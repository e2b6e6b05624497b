"""Checks of artifacts against the fp32 PyTorch model: ``llmtrt validate`` and ``llmtrt compare``."""
