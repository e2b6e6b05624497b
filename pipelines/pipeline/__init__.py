"""``llmtrt pipeline``: one YAML runs every stage, cached by content."""
