"""Developer tools that are not part of the installed library (e.g. training the built-in fixture model)."""
