"""Latent previews: the map fitted to a VAE predicts its decode, laid out on the image's grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from klein import ModelSource
from klein.preview import LatentPreview, _smooth_images, predicted_x0


class LinearVAE:
    """A stand-in whose decode is exactly affine per token: token -> four 8x8 blocks of colour."""

    device = torch.device("cpu")

    def __init__(self, channels: int = 128, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3 * 16 * 16, channels, generator=g) / 16  # any encoder will do
        self.colour = torch.randn(channels + 1, 12, generator=g) / 8  # the decode the fit must find

    def encode(self, x):
        patches = rearrange(x, "B c (h p) (w q) -> B h w (c p q)", p=16, q=16)
        return rearrange(patches @ self.proj, "B h w C -> B C h w")

    def decode(self, z):
        h, w = z.shape[-2:]
        tokens = torch.cat((rearrange(z, "B C h w -> B (h w) C"), torch.ones(z.shape[0], h * w, 1)), -1)
        blocks = rearrange(tokens @ self.colour, "B (h w) (p q c) -> B c (h p) (w q)", h=h, p=2, q=2)
        return F.interpolate(blocks, scale_factor=8, mode="nearest")


def test_the_fit_recovers_an_affine_decoder_and_renders_on_the_grid():
    vae = LinearVAE()
    preview = LatentPreview.fit_to(vae, images=8, size=128)
    assert preview.fit.r2 > 0.99, preview.fit
    image = _smooth_images(1, 128, torch.Generator().manual_seed(9))[:, :, :48, :80]
    z = vae.encode(image)  # (1, C, 3, 5): a non-square grid, rows and columns must not be swapped
    expected = ((vae.decode(z)[0] / 2 + 0.5).clamp(0, 1) * 255).round()[:, ::8, ::8]  # (3, 6, 10)
    got = preview.render(rearrange(z[0], "C h w -> (h w) C"), 3, 5)
    assert got.shape == (6, 10, 3) and got.dtype == torch.uint8
    assert (got.permute(2, 0, 1).float() - expected).abs().max() <= 2


def test_a_fit_to_the_tiny_random_vae_beats_its_mean():
    """Any weights: on held-out images the map explains part of the decode's block colours."""
    vae = ModelSource.preset("tiny").load_vae("cpu", torch.float32)
    preview = LatentPreview.fit_to(vae)  # the default fit: 12 of 16 images 256 x 256
    assert preview.fit.r2 > 0.05 and preview.fit.tokens == 12 * 256, preview.fit


def test_predicted_x0_is_the_flow_matching_estimate():
    x_t, v = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    noise_free = predicted_x0(x_t, v, 0.0)
    assert torch.equal(noise_free, x_t) and torch.allclose(predicted_x0(x_t, v, 0.25), x_t - 0.25 * v)
