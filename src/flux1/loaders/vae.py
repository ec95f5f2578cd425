"""Load the VAE from a diffusers `vae/` folder, a BFL `ae.safetensors`, or a flux1 save."""

from pathlib import Path

from flux1.configs import check_config
from flux1.convert.vae import from_bfl, infer_config, to_mlx_layout
from flux1.models.vae import VAE
from flux1.weights import saved
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import read_config, read_file, read_folder


def load_vae(source: Path, config: dict | None = None) -> VAE:
    """source: a `vae/` folder (diffusers or flux1 save) or a BFL `ae.safetensors` (whose config is
    the real FLUX VAE's, widths read off the file, unless `config` is given)."""
    source = Path(source)
    component = f"VAE ({source})"
    if source.is_dir():
        model = VAE(config or check_config("vae", read_config(source), source / "config.json"))
        if saved.is_saved(source):
            saved.load_saved_component(model, source, component)
            return model
        tensors = read_folder(source, "diffusion_pytorch_model")
    else:
        tensors = read_file(source)
        model = VAE(config or check_config("vae", infer_config(tensors, source), source))
        tensors = from_bfl(tensors, model)
    assign_weights(model, to_mlx_layout(tensors), component)
    return model
