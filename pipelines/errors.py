"""User-facing errors shared by every stage (defined once, in llmtrt.exporter.errors)."""

from llmtrt.exporter.errors import LlmtrtUserError

__all__ = ["LlmtrtUserError"]
