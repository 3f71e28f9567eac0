"""training.dit: shapes on any grid, rotary positions, text masking, the FLOP counter, DiT-XL size,
and a tiny DiT that overfits a handful of latent clips under the rectified-flow objective."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spacetime.config import load_config
from tests.helpers import CONFIGS
from training.dit import DiT, DiTConfig, apply_rope, flops_per_token, forward_flops, num_params, rope_3d
from training.flow import FlowConfig, euler_sample, flow_loss, interpolate, sampling_times
from training.train_config import TrainConfig

TINY = DiTConfig(hidden=64, depth=2, heads=4, patch=(1, 2, 2))


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _perturbed(model: DiT) -> DiT:
    """adaLN-Zero starts as the identity with a zero output: give the zero-initialised layers weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or name.startswith("final.linear"):
                p.normal_(0, 0.05)
    return model


def test_any_grid_size_gives_the_input_shape():
    torch.manual_seed(0)
    model = DiT(TINY, in_channels=4, text_dim=16)
    text, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    assert model(torch.randn(2, 4, 3, 6, 10), torch.rand(2), text, mask).abs().max() == 0  # zero-init output
    _perturbed(model)
    for size in [(1, 2, 2), (1, 5, 7), (3, 6, 10), (5, 3, 9)]:  # images, odd sizes (padded patches), videos
        x = torch.randn(2, 4, *size)
        out = model(x, torch.rand(2), text, mask)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0


def test_rotary_positions_are_relative_in_all_three_axes():
    grid, dims = (4, 5, 6), (8, 4, 4)
    cos, sin = rope_3d(grid, dims, 10000.0, torch.device("cpu"))
    assert cos.shape == (4 * 5 * 6, 8)
    q, k = torch.randn(16), torch.randn(16)

    def rotated(v, t, h, w):
        full = apply_rope(v.view(1, 1, 1, 16).expand(1, 1, 120, 16), cos, sin)
        return full[0, 0, (t * 5 + h) * 6 + w]

    a = rotated(q, 1, 2, 3) @ rotated(k, 0, 1, 1)
    b = rotated(q, 3, 4, 5) @ rotated(k, 2, 3, 3)  # same offset (1, 1, 2)
    c = rotated(q, 3, 4, 5) @ rotated(k, 2, 3, 4)  # another offset
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-3)
    assert DiTConfig().axis_dims() == (24, 24, 24)  # DiT-XL head dim 72


def test_text_mask_hides_padding():
    torch.manual_seed(0)
    model = _perturbed(DiT(TINY, in_channels=4, text_dim=16))
    x, t = torch.randn(1, 4, 2, 4, 4), torch.rand(1)
    text, mask = torch.randn(1, 6, 16), torch.tensor([[True, True, True, False, False, False]])
    base = model(x, t, text, mask)
    other_padding = text.clone()
    other_padding[:, 3:] = torch.randn(1, 3, 16)
    assert torch.allclose(model(x, t, other_padding, mask), base, atol=1e-6)
    other_words = text.clone()
    other_words[:, 0] = torch.randn(16)
    assert not torch.allclose(model(x, t, other_words, mask), base, atol=1e-4)
    assert torch.isfinite(model(x, t, text, torch.zeros_like(mask))).all()  # no valid token: no NaN


def test_flop_counter_matches_torch_flop_counter():
    """Forward matmul FLOPs equal torch's FlopCounterMode exactly (SDPA on its math path so that
    the attention matmuls are counted); forward + backward is within 2% of the documented 3x."""
    torch.manual_seed(0)
    model = DiT(TINY, in_channels=4, text_dim=32)
    x, t, text, mask = torch.randn(2, 4, 3, 6, 10), torch.rand(2), torch.randn(2, 7, 32), torch.ones(2, 7, dtype=torch.bool)
    tokens = 3 * 3 * 5
    expected = 2 * sum(forward_flops(TINY, 4, 32, tokens, 7).values())  # two samples
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, t, text, mask)
    assert counter.get_total_flops() == expected
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, text, mask).square().mean().backward()
    train = flops_per_token(TINY, 4, 32, tokens, 7) * tokens * 2
    assert abs(counter.get_total_flops() / train - 1) < 0.02
    assert out.shape == x.shape


def test_dit_xl_config_sizes_and_flops():
    cfg = load_config(TrainConfig, CONFIGS / "train/dit_xl.yaml")
    assert (cfg.dit.depth, cfg.dit.hidden, cfg.dit.heads, cfg.parallel.mode) == (28, 1152, 16, "fsdp")
    with torch.device("meta"):
        model = DiT(cfg.dit, in_channels=16, text_dim=4096)
    n = num_params(model)
    d = 1152
    block = 3 * d * d + d * d + d * d + 2 * d * d + d * d + 8 * d * d + 6 * d * d  # qkv, out, q, kv, out, mlp, adaLN
    assert 28 * block < n < 28 * block * 1.05 and 8.2e8 < n < 8.4e8  # 829M (class-conditional DiT-XL: 675M)
    # per token: 6 x the per-token matmul parameters (14 D^2 a block: adaLN and text k/v are per
    # sample), plus attention, 12 N D a block, that grows with the sequence
    short, long = (flops_per_token(cfg.dit, 16, 4096, n_tok, 120) for n_tok in (1024, 32768))
    assert 6 * 28 * 14 * d * d < short < long and long - short > 12 * 28 * d * (32768 - 1024) * 0.99


def test_tiny_dit_overfits_a_handful_of_latent_clips():
    """4 smooth latent clips [4, 3, 4, 4] (low-frequency, like real VAE latents), each with its own
    text embedding. 300 AdamW steps: the rectified-flow loss on a fixed set of (noise, t) draws falls
    by >= 4x (measured 8.4x), and Euler samples from new noise land nearer their own clip than any
    other and much nearer to it than to the noise they started from (distance ratio < 0.6; measured 0.33)."""
    torch.manual_seed(0)
    n, c, shape = 4, 4, (3, 4, 4)
    clips = torch.nn.functional.interpolate(torch.randn(n, c, 3, 2, 2), size=shape, mode="trilinear") * 2
    text, mask = torch.randn(n, 8, 16), torch.ones(n, 8, dtype=torch.bool)
    model = DiT(DiTConfig(hidden=64, depth=2, heads=4, patch=(1, 1, 1)), in_channels=c, text_dim=16)
    flow, tokens = FlowConfig(shift_base_tokens=48), 48
    gen = torch.Generator().manual_seed(1)
    eval_noise, eval_t = torch.randn(8, n, c, *shape, generator=gen), torch.rand(8, n, generator=gen)

    @torch.no_grad()
    def eval_loss() -> float:
        return sum(float((model(interpolate(clips, eval_noise[k], eval_t[k]), eval_t[k], text, mask)
                          - (eval_noise[k] - clips)).square().mean()) for k in range(8)) / 8

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    for _ in range(300):
        flow_loss(model, clips, text, mask, tokens, flow, gen).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    after = eval_loss()
    assert before / after >= 4.0, (before, after)

    noise = torch.randn(n, c, *shape, generator=torch.Generator().manual_seed(7))
    samples = euler_sample(lambda x, t: model(x, t, text, mask), noise, sampling_times(20, tokens, flow))
    to_clips = torch.cdist(samples.flatten(1), clips.flatten(1))  # [4 samples, 4 clips]
    assert to_clips.argmin(dim=1).tolist() == [0, 1, 2, 3]
    ratio = to_clips.diagonal() / (samples - noise).flatten(1).norm(dim=1)
    assert ratio.max() < 0.6, ratio


# ------------------------------------------------------------------------------ packed sequences
# Samples of the shapes a native-resolution batch holds: vertical, square, 4:3, 16:9, an image, and
# one whose latent sides are not a multiple of the patch (its last patches are padded, as unpacked).
PACKED_SHAPES = [(3, 8, 4), (2, 6, 6), (3, 6, 8), (2, 4, 8), (1, 6, 4), (2, 5, 7)]


def _packed_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(4, *shape, generator=g) for shape in PACKED_SHAPES]
    text = torch.randn(len(x0), 5, 16, generator=g)
    mask = torch.ones(len(x0), 5, dtype=torch.bool)
    for i in range(len(x0)):
        mask[i, 1 + i % 4:] = False  # every caption its own length
    return x0, text, mask


def test_a_packed_batch_is_the_same_samples_one_by_one():
    """Loss and every parameter's gradient of one packed sequence equal those of its samples run one
    at a time (a batch of 1 each), with the same noise and timesteps: positions, modulation, text and
    attention all stay within each sample."""
    from training.flow import flow_loss_packed

    torch.manual_seed(0)
    model = _perturbed(DiT(TINY, in_channels=4, text_dim=16))
    x0, text, mask = _packed_inputs()
    tokens = [s[0] * -(-s[1] // 2) * -(-s[2] // 2) for s in PACKED_SHAPES]
    cfg = FlowConfig(shift_base=2.0, shift_base_tokens=16)  # a shift that differs by sample size

    losses = flow_loss_packed(model, x0, text, mask, tokens, cfg, torch.Generator().manual_seed(7))
    losses.mean().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    g, one_by_one = torch.Generator().manual_seed(7), []
    for i, x in enumerate(x0):
        one_by_one.append(flow_loss(model, x[None], text[i:i + 1], mask[i:i + 1], tokens[i], cfg, g)[0])
    torch.stack(one_by_one).mean().backward()
    torch.testing.assert_close(losses, torch.stack(one_by_one), rtol=1e-5, atol=1e-6)
    assert len(set(round(float(v), 4) for v in losses.detach())) == len(x0)  # not one value repeated
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert p.grad.abs().sum() > 0, name

    # and no token attends across samples: changing one sample changes no other sample's output
    with torch.no_grad():
        t = torch.rand(len(x0), generator=torch.Generator().manual_seed(3))
        before = model(x0, t, text, mask)
        x0[2] = x0[2] + 1.0
        after = model(x0, t, text, mask)
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.shape == x0[i].shape
        assert torch.equal(a, b) != (i == 2), i


def test_flex_attention_masks_give_the_per_sample_attention():
    """The GPU path (flex_attention with block masks: self-attention block-diagonal, cross-attention to
    the sample's own valid text) computes what the per-sample path does. Forward only: flex_attention
    has no CPU backward; a GPU session runs the compiled one (benchmarks/gpu_session.sh)."""
    import warnings

    torch.manual_seed(0)
    model = _perturbed(DiT(TINY, in_channels=4, text_dim=16))
    x0, text, mask = _packed_inputs()
    t = torch.rand(len(x0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile": eager, slow, exact
        loop = model(x0, t, text, mask, attention="loop")
        flex = model(x0, t, text, mask, attention="flex")
    for a, b in zip(loop, flex):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
