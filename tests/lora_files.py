"""Synthetic LoRA files of each dialect for the tiny fixture, with the change each makes to the
diffusers weights computed independently (by the documented layouts, not by flux1's converters)."""

from pathlib import Path

import mlx.core as mx
import numpy as np

D, M = 64, 256  # tiny transformer: inner width, MLP width
RANK, ALPHA = 4, 2.0

# diffusers layer -> (BFL layer, first row of the part in the fused BFL weight, rows of the part,
# rows of the BFL weight, input width)
LAYOUT = {
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", D, D, 3 * D, D),
    "transformer_blocks.1.attn.add_v_proj": ("double_blocks.1.txt_attn.qkv", 2 * D, D, 3 * D, D),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", 0, D, 3 * D + M, D),
    "single_transformer_blocks.1.proj_mlp": ("single_blocks.1.linear1", 3 * D, M, 3 * D + M, D),
    "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2", 0, D, D, D + M),
    "transformer_blocks.1.ff_context.net.2": ("double_blocks.1.txt_mlp.2", 0, D, D, M),
    "x_embedder": ("img_in", 0, D, D, 64),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0, D, D, 256),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", 0, 2 * D, 2 * D, D),
}


def random_factors(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """diffusers layer -> (down [r, in], up [rows, r])."""
    rng = np.random.default_rng(seed)
    return {
        layer: (
            rng.standard_normal((RANK, LAYOUT[layer][4]), dtype=np.float32) * 0.3,
            rng.standard_normal((LAYOUT[layer][2], RANK), dtype=np.float32) * 0.3,
        )
        for layer in LAYOUT
    }


def _swap(x: np.ndarray) -> np.ndarray:
    half = x.shape[0] // 2
    return np.concatenate([x[half:], x[:half]])


def _fused_up(layer: str, up: np.ndarray) -> np.ndarray:
    """The up matrix of the whole BFL layer: the part's rows in place, zeros elsewhere."""
    _, start, _, total, _ = LAYOUT[layer]
    full = np.zeros((total, up.shape[1]), np.float32)
    full[start : start + up.shape[0]] = _swap(up) if layer == "norm_out.linear" else up
    return full


def write(path: Path, dialect: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a file of `dialect`; returns the expected change of each diffusers weight (before strength)."""
    factors = random_factors(seed)
    tensors, metadata, expected = {}, {}, {}
    alpha = np.array(ALPHA, np.float32)
    for layer, (down, up) in factors.items():
        bfl = LAYOUT[layer][0]
        scale = ALPHA / RANK
        if dialect == "peft":  # alpha in the PEFT metadata
            tensors[f"transformer.{layer}.lora_A.weight"], tensors[f"transformer.{layer}.lora_B.weight"] = (
                down,
                up,
            )
            metadata["lora_adapter_metadata"] = f'{{"r": {RANK}, "lora_alpha": {ALPHA}}}'
        elif dialect == "peft-alpha-tensors":  # no prefix, per-module alpha tensors
            tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"] = down, up
            tensors[f"{layer}.alpha"] = alpha
        elif dialect == "kohya":
            key = "lora_unet_" + bfl.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, _fused_up(layer, up)
            tensors[f"{key}.alpha"] = alpha
        elif dialect == "comfyui":
            key = "diffusion_model." + bfl
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, _fused_up(layer, up)
            tensors[f"{key}.alpha"] = alpha
        elif dialect == "bfl-peft":  # no alpha: scale 1
            key = "base_model.model.diffusion_model." + bfl
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, _fused_up(layer, up)
            scale = 1.0
        elif dialect == "onetrainer":
            key = "lora_transformer_" + layer.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            tensors[f"{key}.alpha"] = alpha
        elif dialect == "loha":
            key = "lycoris_" + layer.replace(".", "_")
            rng = np.random.default_rng(seed + 7)
            w2a = rng.standard_normal(up.shape, dtype=np.float32) * 0.3
            w2b = rng.standard_normal(down.shape, dtype=np.float32) * 0.3
            tensors.update(
                {
                    f"{key}.hada_w1_a": up,
                    f"{key}.hada_w1_b": down,
                    f"{key}.hada_w2_a": w2a,
                    f"{key}.hada_w2_b": w2b,
                    f"{key}.alpha": alpha,
                }
            )
            expected[layer] = scale * (up @ down) * (w2a @ w2b)
            continue
        elif dialect == "comfyui-diff":
            key = "diffusion_model." + bfl
            full = _fused_up(layer, up) @ down
            tensors[f"{key}.diff"] = full
            expected[layer] = up @ down
            continue
        else:
            raise ValueError(dialect)
        expected[layer] = scale * (up @ down)
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in tensors.items()}, metadata=metadata)
    return expected
