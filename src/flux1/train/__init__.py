"""LoRA training of the FLUX.1 transformer in MLX: the objective of diffusers' DreamBooth LoRA script,
adapters trained in fp32 beside a dense, quantized or GGUF base, files every LoRA loader reads."""
