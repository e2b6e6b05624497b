"""The jobs after export, grouped by job: precision, engine, checks, runtime, pipeline and the Click CLI."""
