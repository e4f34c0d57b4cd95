"""Build side: model import, precision graphs, validation, engines (medge-convert)."""
