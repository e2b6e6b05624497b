"""Running artifacts: one runner per backend, the prefill + decode loop, tokenizers, ``llmtrt generate``."""
