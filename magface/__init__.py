"""MagFace on Ray: quality-aware face embeddings (direction = identity, magnitude = quality).

Importing the package has no side effects (no Ray, no MLflow). Heavy submodules load lazily.
"""

__version__ = "0.1.0"

__all__ = ["Embedder", "PixelConvention", "__version__"]


def __getattr__(name):
    if name == "Embedder":
        from magface.embedder import Embedder

        return Embedder
    if name == "PixelConvention":
        from magface.preprocess import PixelConvention

        return PixelConvention
    raise AttributeError(f"module 'magface' has no attribute {name!r}")
