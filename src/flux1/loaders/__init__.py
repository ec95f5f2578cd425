"""Loaders: files on disk (each outside format) -> MLX modules with canonical weight names."""
