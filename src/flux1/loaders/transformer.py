"""Load the FLUX transformer from a diffusers folder, a BFL (or ComfyUI) single file, or a flux1 save."""

from pathlib import Path

from flux1.configs import check_config
from flux1.convert.transformer_bfl import from_single_file, infer_config
from flux1.convert.transformer_diffusers import from_diffusers, is_diffusers
from flux1.models.transformer import FluxTransformer
from flux1.weights import saved
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import read_config, read_file, read_folder


def load_transformer(source: Path, config: dict | None = None) -> FluxTransformer:
    """source: a diffusers `transformer/` folder, a flux1 saved `transformer/` folder, or a single
    .safetensors file with BFL (or diffusers) names. Weights stay lazy, in their stored dtype."""
    source = Path(source)
    if source.is_dir():
        config = config or check_config("transformer", read_config(source), source / "config.json")
        model = FluxTransformer(config)
        if saved.is_saved(source):
            saved.load_saved_component(model, source, f"transformer ({source})")
            return model
        tensors = from_diffusers(read_folder(source, "diffusion_pytorch_model"))
    else:
        tensors = from_single_file(read_file(source))
        if is_diffusers(tensors.names()):
            tensors = from_diffusers(tensors)
        shapes = {n: a.shape for n, a in tensors.arrays.items()}
        model = FluxTransformer(config or check_config("transformer", infer_config(shapes, source), source))
    assign_weights(model, tensors, f"transformer ({source})")
    return model
