"""FLUX.1 text-to-image models in MLX."""

from flux1._blas import load_blas

load_blas()  # must run before the first `import mlx.core`

__version__ = "0.1.0"

from flux1.pipeline import Config, Flux1, GeneratedImage  # noqa: E402

__all__ = ["Config", "Flux1", "GeneratedImage"]
