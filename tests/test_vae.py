"""The MLX VAE decodes and encodes as diffusers' AutoencoderKL does, on the same files."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from tests.conftest import relative_error

from flux1.fixtures import vae as vae_fixture
from flux1.fixtures.presets import configs
from flux1.loaders.vae import load_vae
from flux1.weights.safetensors_io import WeightFileError

# fp32 on both sides; convolutions sum in another order (measured about 2e-6).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae_fixture.write(folder, configs("tiny", "schnell")["vae"], "float32", seed=2)
    vae_fixture.write_bfl(folder, folder.parent / "ae.safetensors")
    return folder


@pytest.fixture(scope="module")
def reference(vae_folder):
    model, info = AutoencoderKL.from_pretrained(vae_folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model


def _nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


def _nchw(x: mx.array) -> np.ndarray:
    return np.array(x).transpose(0, 3, 1, 2)


def test_decode_equals_diffusers(vae_folder, reference, compute_path):
    z = np.random.default_rng(0).standard_normal((1, 16, 6, 10), dtype=np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(z)).sample.numpy()
    assert relative_error(_nchw(load_vae(vae_folder).decode(_nhwc(z))), expected) < TOLERANCE


@pytest.mark.parametrize("latent_size", [(20, 13), (8, 17), (30, 30)])
def test_tiled_decode_equals_diffusers_tiled_decode(vae_folder, compute_path, latent_size):
    """`--vae-tiling` as diffusers' `enable_tiling()`: the tiny VAE's 64-pixel sample size makes 8-latent
    tiles; (8, 17) is one tile high, (30, 30) four tiles a side with a narrow last one. The whole decode
    differs (each tile's group norms see that tile only): ignoring the tiles would fail."""
    from flux1 import vae_tiles

    tiled = AutoencoderKL.from_pretrained(vae_folder)
    tiled.enable_tiling()
    z = np.random.default_rng(3).standard_normal((1, 16, *latent_size), dtype=np.float32)
    with torch.no_grad():
        expected = tiled.decode(torch.from_numpy(z)).sample.numpy()
    vae = load_vae(vae_folder)
    mine = vae_tiles.decode(vae, _nhwc(z)).transpose(0, 3, 1, 2)
    assert mine.shape == expected.shape == (1, 3, 8 * latent_size[0], 8 * latent_size[1])
    assert relative_error(mine, expected) < TOLERANCE
    assert relative_error(_nchw(vae.decode(_nhwc(z))), expected) > 100 * TOLERANCE


@pytest.mark.parametrize("pixels", [(160, 104), (64, 136), (240, 240), (64, 64)])
def test_tiled_encode_equals_diffusers_tiled_encode(vae_folder, compute_path, pixels):
    """The posterior's mean in 64-pixel tiles, as diffusers' enable_tiling() encodes; 64 x 64 is one
    tile, encoded whole by both (the one case where the whole encode must agree too)."""
    from flux1 import vae_tiles

    tiled = AutoencoderKL.from_pretrained(vae_folder)
    tiled.enable_tiling()
    x = np.random.default_rng(4).uniform(-1, 1, (1, 3, *pixels)).astype(np.float32)
    with torch.no_grad():
        expected = tiled.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    vae = load_vae(vae_folder)
    mine = vae_tiles.encode(vae, _nhwc(x)).transpose(0, 3, 1, 2)
    assert mine.shape == expected.shape == (1, 16, pixels[0] // 8, pixels[1] // 8)
    assert relative_error(mine, expected) < TOLERANCE
    whole = relative_error(_nchw(vae.encode(_nhwc(x))), expected)
    assert whole < TOLERANCE if pixels == (64, 64) else whole > 100 * TOLERANCE


def test_encode_equals_diffusers(vae_folder, reference, compute_path):
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 48, 80)).astype(np.float32)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    assert relative_error(_nchw(load_vae(vae_folder).encode(_nhwc(x))), expected) < TOLERANCE


def test_bfl_ae_file_is_bit_identical(vae_folder):
    z = _nhwc(np.random.default_rng(2).standard_normal((1, 16, 4, 6), dtype=np.float32))
    folder_vae = load_vae(vae_folder)
    file_vae = load_vae(vae_folder.parent / "ae.safetensors", folder_vae.config)
    assert np.array_equal(np.array(file_vae.decode(z)), np.array(folder_vae.decode(z)))


def test_bfl_file_config_comes_from_its_shapes(vae_folder, tmp_path):
    """Without a config, a BFL file gets the real FLUX VAE config with widths read off the tensors;
    the tiny preset's 8 norm groups cannot be read off, so the wide real layout is used here."""
    wide = configs("wide", "schnell")["vae"]
    wide.update(block_out_channels=[32, 32, 64, 64])
    vae_fixture.write(tmp_path / "vae", wide, "float32", seed=0)
    vae_fixture.write_bfl(tmp_path / "vae", tmp_path / "ae.safetensors")
    vae = load_vae(tmp_path / "ae.safetensors")
    assert vae.config["block_out_channels"] == [32, 32, 64, 64] and vae.config["norm_num_groups"] == 32


def test_file_that_is_no_autoencoder_is_refused(tmp_path):
    mx.save_safetensors(str(tmp_path / "ae.safetensors"), {"img_in.weight": mx.zeros((2, 2))})
    with pytest.raises(WeightFileError, match="ae.safetensors: not a FLUX autoencoder"):
        load_vae(tmp_path / "ae.safetensors")
