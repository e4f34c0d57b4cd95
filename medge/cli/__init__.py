"""Command-line tools: ``medge`` (demo, preprocess) and, later, ``medge-convert``."""
