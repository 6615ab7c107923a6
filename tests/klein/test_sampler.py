"""Schedule, Euler step and position ids against the spec's tables and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from klein.sampler import (
    compute_empirical_mu,
    denoise,
    denoise_cfg,
    get_schedule,
    grid_ids,
    reference_ids,
    text_ids,
)

# BFL flux2 sampling.py (compute_empirical_mu, get_schedule): (width, height, steps) -> (tokens, mu, first sigmas)
SPEC_TABLE = [
    ((1024, 1024, 4), 4096, 2.29118, [1, 0.96738, 0.90814, 0.76720, 0]),
    ((1360, 768, 4), 4080, 2.28982, [1, 0.96734, 0.90803, 0.76696, 0]),
    ((512, 512, 4), 1024, 2.03069, [1, 0.95809, 0.88398, 0.71750, 0]),
    ((2048, 2048, 4), 16384, 3.22999, [1, 0.98699, 0.96195, 0.89392, 0]),
    ((1024, 1024, 50), 4096, 2.02335, [1, 0.99731, 0.99452, 0.99163]),
]


@pytest.mark.parametrize("size, tokens, mu, sigmas", SPEC_TABLE, ids=lambda v: str(v))
def test_schedule_matches_spec_table(size, tokens, mu, sigmas):
    w, h, steps = size
    assert (w // 16) * (h // 16) == tokens
    assert compute_empirical_mu(tokens, steps) == pytest.approx(mu, abs=1e-5)
    schedule = get_schedule(steps, tokens)
    assert len(schedule) == steps + 1 and schedule[-1] == 0.0
    assert schedule[: len(sigmas)] == pytest.approx(sigmas, abs=1e-5)
    assert all(a > b for a, b in zip(schedule, schedule[1:], strict=False))


def test_mu_discontinuity_past_4300_tokens():
    assert compute_empirical_mu(4300, 4) == pytest.approx(2.30, abs=0.02)
    assert compute_empirical_mu(4301, 4) == pytest.approx(0.00016927 * 4301 + 0.45666666)


@pytest.mark.parametrize("tokens, steps", [(16, 4), (64, 4), (1024, 4), (4096, 50), (9000, 28)])
def test_schedule_matches_diffusers_scheduler(tokens, steps):
    """Equal in float32, to the bit: a sigma an ulp away moves a bf16 step's rounding."""
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential"
    )
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    assert get_schedule(steps, tokens) == sched.sigmas.tolist()


class ConstantVelocity(torch.nn.Module):
    """A stand-in transformer whose velocity is a fixed tensor (or the text embedding's mean)."""

    def __init__(self, v):
        super().__init__()
        self.v = v
        self.calls = []

    def rope(self, ctx_ids, x_ids):
        return None

    def forward(self, img, t, ctx, pe, ref=None, lora=None):
        self.calls.append((img.shape, t.clone(), None if ref is None else ref.shape))
        return self.v(img, ctx) if callable(self.v) else self.v.expand(img.shape[0], -1, -1)


def test_euler_with_constant_velocity_reaches_x_minus_v():
    x0 = torch.randn(2, 6, 4)
    v = torch.randn(1, 6, 4)
    model = ConstantVelocity(v)
    sigmas = get_schedule(4, 6)
    out = list(
        denoise(model, x0, grid_ids(2, 3).expand(2, -1, -1), torch.zeros(2, 3, 8), text_ids(3)[None], sigmas)
    )
    assert len(out) == 4
    torch.testing.assert_close(out[-1], x0 - v, atol=1e-6, rtol=0)  # integral of v over t from 1 to 0
    torch.testing.assert_close(out[0], x0 + (sigmas[1] - 1) * v, atol=1e-6, rtol=0)
    assert [c[1][0].item() for c in model.calls] == pytest.approx(sigmas[:-1])


def test_references_are_passed_beside_the_image():
    x0, ref = torch.zeros(1, 6, 4), torch.ones(1, 5, 4)
    model = ConstantVelocity(lambda x, ctx: x * 0 + 1)
    ids = grid_ids(2, 3)[None]
    out = list(
        denoise(
            model,
            x0,
            ids,
            torch.zeros(1, 3, 8),
            text_ids(3)[None],
            [1.0, 0.0],
            ref,
            reference_ids([(1, 5)])[None],
        )
    )
    assert model.calls[0][0] == (1, 6, 4) and model.calls[0][2] == (1, 5, 4) and out[-1].shape == (1, 6, 4)


def test_cfg_blend():
    # velocity = mean of the text embedding: cond -> 1, uncond -> 0, so v = 0 + g (1 - 0) = g
    model = ConstantVelocity(lambda x, ctx: ctx.mean(dim=(1, 2), keepdim=True).expand_as(x))
    x0 = torch.zeros(2, 4, 3)
    ctx, neg = torch.ones(2, 3, 8), torch.zeros(2, 3, 8)
    g = torch.tensor([2.0, 5.0])
    out = list(
        denoise_cfg(
            model,
            x0,
            grid_ids(2, 2).expand(2, -1, -1),
            ctx,
            neg,
            text_ids(3).expand(2, -1, -1),
            [1.0, 0.0],
            g,
        )
    )
    torch.testing.assert_close(out[-1][:, 0, 0], -g)
    assert model.calls[0][0][0] == 4  # one batch of [uncond; cond]


def test_position_ids():
    ids = grid_ids(2, 3)
    assert ids.tolist() == [[0, r, c, 0] for r in range(2) for c in range(3)]
    assert text_ids(4)[:, 3].tolist() == [0, 1, 2, 3] and text_ids(4)[:, :3].abs().sum() == 0
    refs = reference_ids([(1, 2), (2, 1)])
    assert refs.tolist() == [[10, 0, 0, 0], [10, 0, 1, 0], [20, 0, 0, 0], [20, 1, 0, 0]]
    assert math.isclose(get_schedule(1, 16)[0], 1.0)
