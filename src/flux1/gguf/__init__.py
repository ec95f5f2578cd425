"""GGUF transformer files (city96 / stable-diffusion.cpp style) as MLX layers holding the same values."""
