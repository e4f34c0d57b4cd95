"""Build side: model import, precision graphs, validation, engines (medge-convert).

``medge.convert.convert(model, output, spec=..., ...)`` is the Python entry
point (:func:`medge.convert.pipeline.convert`); it is resolved on first use so
``import medge`` stays light.
"""

__all__ = ["convert"]


def __getattr__(name: str):
    if name == "convert":
        from .pipeline import convert

        return convert
    raise AttributeError(f"module 'medge.convert' has no attribute {name!r}")
