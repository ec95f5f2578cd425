"""LoRA files of every common FLUX.1 dialect, converted to canonical targets and applied to `Linear`s."""

from flux1.lora.apply import LoraReport, apply_file, file_digest

__all__ = ["LoraReport", "apply_file", "file_digest"]
