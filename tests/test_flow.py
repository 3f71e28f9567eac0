"""training.flow: timestep shift by token count, logit-normal draws, the Euler sampler and its one
conditioning mechanism (known latent frames with a release time), CFG mixing, EMA."""

from __future__ import annotations

import torch

from training.flow import (
    EMA,
    FlowConfig,
    clean_name,
    euler_sample,
    guided_velocity,
    sample_timesteps,
    sampling_times,
    shift_for_tokens,
    time_shift,
)


def test_shift_grows_with_tokens_and_moves_time_towards_noise():
    cfg = FlowConfig(shift_base=1.0, shift_base_tokens=1024, shift_min=1.0, shift_max=8.0)
    assert shift_for_tokens(1024, cfg) == 1.0 and shift_for_tokens(4096, cfg) == 2.0  # sqrt(4096 / 1024)
    assert shift_for_tokens(16, cfg) == 1.0 and shift_for_tokens(10**7, cfg) == 8.0  # clamped
    t = torch.linspace(0, 1, 11)
    shifted = time_shift(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert (shifted[1:] > shifted[:-1]).all()

    gen = torch.Generator().manual_seed(0)
    small = sample_timesteps(20000, 1024, cfg, gen)
    large = sample_timesteps(20000, 1024 * 64, cfg, gen)
    assert abs(small.median() - 0.5) < 0.02  # logit-normal(0, 1), unshifted
    assert large.median() > 0.85 and 0 < small.min() and small.max() < 1  # shift 8: mostly noisy
    times = sampling_times(10, 1024 * 64, cfg)
    assert times[0] == 1 and times[-1] == 0 and (times[1:] < times[:-1]).all()


def test_euler_sampler_follows_a_straight_flow_exactly():
    """With the exact velocity of a straight path to x0, Euler lands on x0 from any noise."""
    x0 = torch.randn(1, 2, 3, 2, 2)
    velocity = lambda x, t: (x - x0) / t.view(-1, 1, 1, 1, 1)
    noise = torch.randn_like(x0)
    out = euler_sample(velocity, noise, sampling_times(7, 64, FlowConfig()))
    assert torch.allclose(out, x0, atol=1e-5)


def test_known_frames_are_held_and_released():
    """One mechanism: release 0 -> frame ends exactly known; 1 -> free; 0.5 -> SDEdit (no model call
    while every frame is held)."""
    known = torch.randn(1, 2, 3, 2, 2)
    calls = []

    def velocity(x, t):
        calls.append(float(t[0]))
        return torch.ones_like(x)  # pushes every free frame away from the data

    noise = torch.randn_like(known)
    times = sampling_times(10, 64, FlowConfig())
    out = euler_sample(velocity, noise, times, known, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(out[:, :, 0], known[:, :, 0]) and torch.equal(out[:, :, 2], known[:, :, 2])
    assert not torch.allclose(out[:, :, 1], known[:, :, 1]) and len(calls) == 10

    calls.clear()
    out = euler_sample(velocity, noise, times, known, torch.full((3,), 0.5))
    # SDEdit: the steps from 1.0 to 0.6 are skipped; the trajectory starts at the last grid time above
    # the release, from the known latents noised to it, 0.4 known + 0.6 noise, then 6 free Euler steps
    assert calls == [t for t in calls if t <= 0.6 + 1e-6] and len(calls) == 6
    assert torch.allclose(out, 0.4 * known + 0.6 * noise - 0.6, atol=1e-5)


def test_classifier_free_guidance_mixes_velocities():
    def model(x, t, text, mask):  # velocity = the first text feature, per sample
        return text[:, :1, :1, None, None].expand_as(x).clone()

    x = torch.zeros(2, 1, 1, 1, 1)
    text, mask = torch.full((2, 3, 4), 2.0), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.full((1, 3, 4), 0.5), torch.ones(1, 3, dtype=torch.bool)
    t = torch.ones(2)
    assert torch.allclose(guided_velocity(model, text, mask, null, null_mask, 1.0)(x, t), torch.full_like(x, 2.0))
    assert torch.allclose(guided_velocity(model, text, mask, null, null_mask, 3.0)(x, t),
                          torch.full_like(x, 0.5 + 3.0 * (2.0 - 0.5)))


def test_ema_follows_parameters_and_round_trips():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    state = ema.state_dict()
    assert set(state) == {"weight", "bias"} and torch.allclose(state["weight"], start + 0.1)
    other = EMA(model, decay=0.9)
    other.load_state_dict(state)
    assert torch.equal(other.state_dict()["weight"], state["weight"])
    assert clean_name("module.blocks.0._checkpoint_wrapped_module.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert clean_name("_orig_mod.final.linear.bias") == "final.linear.bias"
