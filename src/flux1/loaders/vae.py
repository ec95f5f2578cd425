"""Load the VAE from a diffusers `vae/` folder, a BFL `ae.safetensors`, or a flux1 save."""

import copy
import re
from pathlib import Path

from mlx.utils import tree_flatten

from flux1.convert.vae_bfl import ATTENTION_PROJECTIONS, bfl_name
from flux1.fixtures.presets import VAE as REAL_VAE_CONFIG
from flux1.models.vae import VAE
from flux1.weights import saved
from flux1.weights.assign import assign_weights
from flux1.weights.safetensors_io import Tensors, WeightFileError, read_config, read_file, read_folder


def load_vae(source: Path, config: dict | None = None) -> VAE:
    """source: a `vae/` folder (diffusers or flux1 save) or a BFL `ae.safetensors` (whose config is
    the real FLUX VAE's, widths read off the file, unless `config` is given)."""
    source = Path(source)
    component = f"VAE ({source})"
    if source.is_dir():
        model = VAE(config or read_config(source))
        if saved.is_saved(source):
            saved.load_saved_component(model, source, component)
            return model
        tensors = read_folder(source, "diffusion_pytorch_model")
    else:
        tensors = read_file(source)
        model = VAE(config or infer_config(tensors, source))
        tensors = from_bfl(tensors, model)
    assign_weights(model, to_mlx_layout(tensors), component)
    return model


def from_bfl(tensors: Tensors, model: VAE) -> Tensors:
    """Rename BFL tensors to the model's names; names that match nothing pass through (and are reported)."""
    levels = len(model.config["block_out_channels"])
    out = Tensors(metadata=tensors.metadata)
    for name, _ in tree_flatten(model.parameters()):
        source = bfl_name(name, levels)
        if source in tensors:
            array, origin = tensors.pop(source)
            if ATTENTION_PROJECTIONS.search(source):
                array = array.reshape(array.shape[:2])
            out.add(name, array, origin)
    for name in tensors.names():
        out.add(name, *tensors.pop(name))
    return out


def to_mlx_layout(tensors: Tensors) -> Tensors:
    """PyTorch conv kernels [out, in, kh, kw] -> MLX [out, kh, kw, in] (lazily)."""
    for name, array in tensors.arrays.items():
        if array.ndim == 4:
            tensors.arrays[name] = array.transpose(0, 2, 3, 1)
    return tensors


def infer_config(tensors: Tensors, source: Path) -> dict:
    names = tensors.names()
    try:
        levels = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.(\d+)\.", n)))
        channels = [tensors.arrays[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        latent_channels = tensors.arrays["decoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError):
        raise WeightFileError(f"{source}: not a FLUX autoencoder (ae.safetensors) checkpoint") from None
    layers = 1 + max(
        int(m.group(1)) for n in names if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", n))
    )
    config = copy.deepcopy(REAL_VAE_CONFIG)
    config.update(block_out_channels=channels, latent_channels=latent_channels, layers_per_block=layers)
    return config
