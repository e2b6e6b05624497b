"""``python -m llmtrt`` is the ``llmtrt`` command."""

from llmtrt.pipelines.cli import main

main()
