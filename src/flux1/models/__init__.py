"""The MLX networks of FLUX.1."""
