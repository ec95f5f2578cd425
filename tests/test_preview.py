"""flux1.preview: the least-squares latent -> RGB map and the per-step denoised preview."""

import mlx.core as mx
import numpy as np

from flux1 import Config, Flux1, latents, preview


class LinearVAE:
    """A decoder that is exactly a 16x3 map + bias per latent pixel (each spread over 8x8 pixels), in
    the VAE's [-1, 1] range: the fit must recover it."""

    scaling_factor, shift_factor = 0.3611, 0.1159

    def __init__(self, weights, bias):
        self.weights, self.bias = weights, bias

    def decode(self, z):
        sampled = (z - self.shift_factor) * self.scaling_factor  # back to the sampling space
        rgb = (sampled @ mx.array(self.weights) + mx.array(self.bias)) * 2 - 1
        return mx.repeat(mx.repeat(rgb, 8, axis=1), 8, axis=2)


def test_fit_recovers_a_linear_decoder():
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(size=(16, 3)).astype(np.float32) * 0.1, np.array([0.5, 0.4, 0.6], np.float32)
    fitted = preview.fit(LinearVAE(weights, bias))
    np.testing.assert_allclose(fitted.weights, weights, atol=1e-4)
    np.testing.assert_allclose(fitted.bias, bias, atol=1e-4)
    assert fitted.error < 1e-4


def test_step_preview_is_the_map_of_the_denoised_latents(tiny_schnell):
    flux = Flux1.from_path(tiny_schnell)
    rgb = preview.fit(flux.load("vae"))
    assert 0 < rgb.error < 1  # better than the mean colour, on a random (far from linear) VAE
    steps = []
    config = Config(num_inference_steps=2, height=32, width=48)
    flux.generate_image(1, "a fox", config, progress=False, on_step=steps.append)
    first, last = steps
    # x0 = x - sigma * v: from the step's input and velocity, equal to the output minus sigma_next * v.
    x_in = latents.pack(latents.noise(1, 32, 48))
    np.testing.assert_allclose(
        np.array(preview.denoised(first.latents, first.velocity, first.sigma_next)),
        np.array(x_in - first.sigma * first.velocity),
        atol=1e-5,
    )
    picture = preview.preview(last, 32, 48, rgb)  # sigma_next = 0: the final latents themselves
    assert picture.shape == (4, 6, 3) and picture.dtype == np.uint8
    expected = rgb(np.array(latents.unpack(last.latents, 32, 48)[0]))
    assert np.array_equal(picture, expected)
