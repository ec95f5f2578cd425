"""Facts of the real FLUX.1 models: their hub repos, the config.json contents their repos hold, and the
pipeline defaults (steps, sequence lengths, guidance) of the reference pipelines. Everything else derives
from here: the loaders, the pipeline, and the fixture presets (`fixtures/presets.py`)."""

REPOS = {
    "schnell": "black-forest-labs/FLUX.1-schnell",
    "dev": "black-forest-labs/FLUX.1-dev",
    "fill": "black-forest-labs/FLUX.1-Fill-dev",
    "kontext": "black-forest-labs/FLUX.1-Kontext-dev",
    "canny": "black-forest-labs/FLUX.1-Canny-dev",
    "depth": "black-forest-labs/FLUX.1-Depth-dev",
}
BASE_MODELS = tuple(REPOS)
# Steps and guidance: diffusers' FluxPipeline (schnell, dev), FluxFillPipeline and FluxKontextPipeline;
# Canny and Depth as their model cards (BFL's cli_control: guidance 30 for Canny, 10 for Depth).
DEFAULT_STEPS = {"schnell": 4, "dev": 25, "fill": 50, "kontext": 28, "canny": 50, "depth": 30}
DEFAULT_GUIDANCE = 3.5
GUIDANCE = {
    "schnell": None,
    "dev": DEFAULT_GUIDANCE,
    "fill": 30.0,
    "kontext": 2.5,
    "canny": 30.0,
    "depth": 10.0,
}
# T5 prompt length of the real pipelines; CLIP's window.
MAX_SEQUENCE_LENGTH = {"schnell": 256, "dev": 512, "fill": 512, "kontext": 512, "canny": 512, "depth": 512}
# model_index.json `_class_name` of each kind's hub repo.
PIPELINE_CLASSES = {
    "schnell": "FluxPipeline",
    "dev": "FluxPipeline",
    "fill": "FluxFillPipeline",
    "kontext": "FluxKontextPipeline",
    "canny": "FluxControlPipeline",
    "depth": "FluxControlPipeline",
}
# What each kind's transformer/config.json changes from TRANSFORMER (the schnell config). Kontext is
# the dev architecture; Fill's transformer reads 64 latent + 64 masked-image latent + 256 mask values per 2x2 patch;
# Canny's and Depth's (the same shapes: only their training differs) 64 latent + 64 control-image latent.
FILL_IN_CHANNELS = 384
CONTROL_IN_CHANNELS = 128
CONTROL_KINDS = ("canny", "depth")
TRANSFORMER_CHANGES = {
    "schnell": {},
    "dev": {"guidance_embeds": True},
    "fill": {"guidance_embeds": True, "in_channels": FILL_IN_CHANNELS, "out_channels": 64},
    "kontext": {"guidance_embeds": True},
    **{
        kind: {"guidance_embeds": True, "in_channels": CONTROL_IN_CHANNELS, "out_channels": 64}
        for kind in CONTROL_KINDS
    },
}
# Kontext's training resolutions (width, height), as diffusers' PREFERRED_KONTEXT_RESOLUTIONS.
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]
CLIP_LENGTH = 77
# RoPE axes of the real model (the real config may omit them), theta and the MLP ratio.
AXES_DIMS_ROPE = (16, 56, 56)
ROPE_THETA = 10000.0
MLP_RATIO = 4.0

TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.30.0.dev0",
    "attention_head_dim": 128,
    "guidance_embeds": False,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

CLIP = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "vocab_size": 49408,
}

T5 = {
    "_name_or_path": "google/t5-v1_1-xxl",
    "architectures": ["T5EncoderModel"],
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "output_past": True,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.3",
    "use_cache": True,
    "vocab_size": 32128,
}

VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}

SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.30.0.dev0",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


# Bounds of every config value flux1 builds modules from: the real FLUX.1 family's sizes at most
# (a config beyond them is no FLUX.1 model, and would allocate without limit before failing).
_BOUNDS = {
    "transformer": {
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "in_channels": 384,  # FLUX.1 Fill: 64 latent + 64 masked-image + 256 mask values
        "out_channels": 64,
    },
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
    },
    "text_encoder_2": {
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "vocab_size": 32128,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
    },
    "vae": {
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "in_channels": 3,
        "out_channels": 3,
    },
}
_OPTIONAL = {"out_channels"}  # diffusers writes null: the same as in_channels


class ConfigError(ValueError):
    """A config.json that describes no FLUX.1 component; names the file and the value."""


def check_config(component: str, config: dict, source) -> dict:
    """Types, ranges and consistency of a component's config, checked before any module is built."""

    def fail(message: str):
        raise ConfigError(f"{source}: {message}")

    for key, high in _BOUNDS[component].items():
        value = config.get(key)
        if value is None and key in _OPTIONAL:
            continue
        if type(value) is not int or not 1 <= value <= high:
            fail(f"'{key}' is {str(value)[:40]}, expected a whole number from 1 to {high}")
    if component == "transformer":
        head_dim = config["attention_head_dim"]
        axes = config.get("axes_dims_rope") or AXES_DIMS_ROPE
        if not (
            isinstance(axes, list | tuple)
            and len(axes) == 3
            and all(type(a) is int and a > 0 and a % 2 == 0 for a in axes)
        ):
            fail(f"'axes_dims_rope' is {str(axes)[:40]}, expected three positive even numbers")
        if sum(axes) != head_dim:
            fail(f"'axes_dims_rope' {list(axes)} must sum to attention_head_dim {head_dim}")
        if config["in_channels"] % 4:
            fail(f"'in_channels' {config['in_channels']} must be a multiple of 4 (2x2 patches)")
    elif component == "text_encoder":
        if config["hidden_size"] % config["num_attention_heads"]:
            fail("'hidden_size' must be a multiple of 'num_attention_heads'")
        if not _finite(config.get("layer_norm_eps")):
            fail(f"'layer_norm_eps' is {str(config.get('layer_norm_eps'))[:40]}, expected a finite number")
    elif component == "text_encoder_2":
        if not _finite(config.get("layer_norm_epsilon")):
            fail(
                f"'layer_norm_epsilon' is {str(config.get('layer_norm_epsilon'))[:40]}, expected a finite number"
            )
    elif component == "vae":
        channels = config.get("block_out_channels")
        if not (
            isinstance(channels, list)
            and 1 <= len(channels) <= 4
            and all(type(c) is int and 1 <= c <= 512 for c in channels)
        ):
            fail(f"'block_out_channels' is {str(channels)[:60]}, expected 1 to 4 whole numbers up to 512")
        if any(c % config["norm_num_groups"] for c in channels):
            fail("every 'block_out_channels' value must be a multiple of 'norm_num_groups'")
        for key in ("scaling_factor", "shift_factor"):
            if not _finite(config.get(key)):
                fail(f"'{key}' is {str(config.get(key))[:40]}, expected a finite number")
    return config


def check_scheduler_config(config: dict, source) -> dict:
    for key in ("shift", "base_shift", "max_shift"):
        value = config.get(key, 1.0)
        if not _finite(value) or (key == "shift" and value <= 0):
            raise ConfigError(f"{source}: '{key}' is {str(value)[:40]}, expected a finite number")
    for key in ("base_image_seq_len", "max_image_seq_len"):
        value = config.get(key, 1)
        if type(value) is not int or value < 1:
            raise ConfigError(f"{source}: '{key}' is {str(value)[:40]}, expected a positive whole number")
    if config.get("max_image_seq_len", 2) == config.get("base_image_seq_len", 1):
        raise ConfigError(f"{source}: 'max_image_seq_len' must differ from 'base_image_seq_len'")
    if not isinstance(config.get("use_dynamic_shifting", False), bool):
        raise ConfigError(f"{source}: 'use_dynamic_shifting' must be true or false")
    return config


def _finite(value) -> bool:
    import math

    return type(value) in (int, float) and math.isfinite(value)
