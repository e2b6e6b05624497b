"""User-facing errors shared by every stage (defined once, in exporter.errors)."""

from exporter.errors import LlmtrtUserError

__all__ = ["LlmtrtUserError"]
