"""training.vae: causal compression shapes, causality, weights I/O, the guarded diffusers path, the
perceptual term, and `spacetime train vae` reducing reconstruction error on a few clips."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from spacetime.config import ConfigError, load_config
from spacetime.errors import UserError
from tests.helpers import CONFIGS
from tests.train_data import make_dataset
from training.train_config import TrainConfig
from training.vae import (PerceptualLoss, VAEArch, VideoVAE, average_down, block_fold, block_unfold, dct_basis, dct_down,
                          dct_up, duplicate_up, load_diffusers_vae, load_vae, patch_fold, patch_unfold, random_window,
                          save_vae)

TINY = VAEArch(latent_channels=4, channels=(8, 16, 16, 16), blocks_per_level=1)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_compression_shapes_images_and_any_size():
    torch.manual_seed(0)
    vae = VideoVAE(TINY)
    for frames, height, width in [(1, 16, 16), (16, 16, 16), (17, 24, 40), (33, 8, 8)]:
        z = vae.encode(torch.randn(1, 3, frames, height, width))
        latent_frames = 1 + (frames - 1) // 4
        assert z.shape == (1, 4, latent_frames, math.ceil(height / 8), math.ceil(width / 8))
        assert vae.decode(z).shape == (1, 3, 1 + (latent_frames - 1) * 4, 8 * z.shape[3], 8 * z.shape[4])
    assert VideoVAE(VAEArch(channels=(8, 8, 8, 8))).encode(torch.randn(1, 3, 9, 16, 16)).shape[1] == 16  # default C
    with pytest.raises(ValueError, match="channels"):
        VAEArch(spatial_compression=16, channels=(8, 8, 8, 8))


def test_encoder_and_decoder_are_causal_in_time():
    torch.manual_seed(0)
    vae = VideoVAE(TINY)
    video = torch.randn(1, 3, 17, 16, 16)
    changed = video.clone()
    changed[:, :, 9:] = 0.0  # frames 9.. belong to latent frames 3 and 4
    za, zb = vae.encode(video), vae.encode(changed)
    per_frame = (za - zb).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame[:3].max() == 0 and per_frame[3:].min() > 0
    da, db = vae.decode(za), vae.decode(zb)
    assert torch.equal(da[:, :, :9], db[:, :, :9])  # decoded frames 0..8 depend on latents 0..2 only
    image = vae.encode(video[:, :, :1])  # an image is a 1-frame video: its latent is latent frame 0
    assert torch.allclose(image[:, :, 0], za[:, :, 0], atol=1e-5)


def test_patch_fold_inverts_and_a_patched_vae_keeps_shapes_and_causality():
    """patch_size 2 (pixel unshuffle before the encoder, shuffle after the decoder): the fold is
    inverted exactly, sizes that are not multiples of the patch are replicated at the edge, and the
    VAE keeps the 4x8x8 shapes and its causality."""
    x = torch.randn(2, 3, 5, 14, 18)
    folded = patch_fold(x, 2)
    assert folded.shape == (2, 12, 5, 7, 9) and torch.equal(patch_unfold(folded, 2), x)
    assert folded[:, ::4].equal(x[..., ::2, ::2])  # channels c * 4 + 0: each patch's top-left pixel
    odd = patch_fold(x[..., :13, :17], 2)
    assert odd.shape == (2, 12, 5, 7, 9) and torch.equal(patch_unfold(odd, 2)[..., :13, :17], x[..., :13, :17])

    torch.manual_seed(0)
    arch = VAEArch(latent_channels=4, patch_size=2, channels=(16, 16, 16), blocks_per_level=1)
    vae = VideoVAE(arch)
    for frames, height, width in [(1, 16, 16), (17, 24, 40), (9, 20, 36)]:
        z = vae.encode(torch.randn(1, 3, frames, height, width))
        assert z.shape == (1, 4, 1 + (frames - 1) // 4, math.ceil(height / 8), math.ceil(width / 8))
        assert vae.decode(z).shape == (1, 3, 1 + (z.shape[2] - 1) * 4, 8 * z.shape[3], 8 * z.shape[4])
    video = torch.randn(1, 3, 17, 16, 16)
    changed = video.clone()
    changed[:, :, 9:] = 0.0
    per_frame = (vae.encode(video) - vae.encode(changed)).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame[:3].max() == 0 and per_frame[3:].min() > 0
    with pytest.raises(ValueError, match="channels"):
        VAEArch(patch_size=2, channels=(8, 8, 8, 8))  # 8 / 2 = 4x after the fold: 3 levels
    with pytest.raises(ValueError, match="patch_size 16 exceeds"):
        VAEArch(patch_size=16, channels=(8,))
    with pytest.raises(ValueError, match="temporal_compression may not exceed"):
        VAEArch(patch_size=4, channels=(8, 8))  # one downsampling left for two halvings of time


def test_shortcuts_fold_blocks_causally_and_make_an_untrained_vae_a_block_average_codec():
    """vae.arch.shortcuts (DC-AE's residual autoencoding): block_fold is inverted exactly, frame 0 is
    a block of its own; with its networks' outputs zeroed the VAE decodes exactly the block averages
    (duplicate_up(average_down(video))), so even untrained it reconstructs a smooth video better than
    the same VAE without shortcuts; it stays causal and keeps its shapes; it adds no weights."""
    x = torch.randn(2, 3, 9, 16, 24)
    folded = block_fold(x, 4, 8)
    assert folded.shape == (2, 3 * 4 * 64, 3, 2, 3) and torch.equal(block_unfold(folded, 4, 8), x)
    assert torch.equal(folded[:, 0, 0], x[:, 0, 0, ::8, ::8])  # block 0: frame 0 (replicated), top-left pixels
    assert torch.equal(folded[:, 3 * 64, 1], x[:, 0, 4, ::8, ::8])  # block 1 = frames 1..4: its last frame
    assert block_fold(x[..., :13, :21], 4, 8).shape == (2, 768, 3, 2, 3)  # edges replicated
    means = average_down(x, 4, 8, 16)
    assert means.shape == (2, 16, 3, 2, 3) and torch.allclose(means[:, 0], folded[:, :48].mean(1))
    # latent channel 0 = red, first frame of a block, rows 0..5: frame 1 (block 1) gets its copies there
    assert torch.equal(duplicate_up(means, 4, 8, 3)[:, 0, 1, :6, :8], means[:, 0, 1, :1, :1].expand(2, 6, 8))

    torch.manual_seed(0)
    arch = VAEArch(latent_channels=16, patch_size=2, channels=(16, 16, 16), blocks_per_level=1, shortcuts=True)
    vae, plain = VideoVAE(arch), VideoVAE(arch.model_copy(update={"shortcuts": False}))
    assert vae.state_dict().keys() == plain.state_dict().keys()  # no weights of its own
    t, y, xx = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 3, 32), torch.linspace(0, 3, 48), indexing="ij")
    smooth = torch.stack([torch.sin(y + xx + t), torch.cos(y - t), torch.sin(xx)])[None] * 0.8
    psnr = lambda a: (10 * torch.log10(4 / ((a - smooth) ** 2).mean())).item()  # noqa: E731
    with torch.no_grad():
        assert psnr(vae.decode(vae.encode(smooth))) > psnr(plain.decode(plain.encode(smooth))) + 2
        for net in (vae.encoder, vae.decoder):
            net.conv_out.conv.weight.zero_(), net.conv_out.conv.bias.zero_()
        blocks = duplicate_up(average_down(smooth, 4, 8, 16), 4, 8, 3)
        assert torch.allclose(vae.decode(vae.encode(smooth)), blocks, atol=1e-6) and psnr(blocks) > 20
    vae = VideoVAE(arch)
    video = torch.randn(1, 3, 17, 16, 16)
    changed = video.clone()
    changed[:, :, 9:] = 0.0
    za, zb = vae.encode(video), vae.encode(changed)
    assert za.shape == (1, 16, 5, 2, 2)
    per_frame = (za - zb).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame[:3].max() == 0 and per_frame[3:].min() > 0
    assert torch.equal(vae.decode(za)[:, :, :9], vae.decode(zb)[:, :, :9])
    with pytest.raises(ValueError, match="latent_channels 5 must divide"):
        VAEArch(latent_channels=5, channels=(8, 8, 8, 8), shortcuts=True)


def test_dct_shortcut_is_an_orthogonal_projection_and_beats_block_averages():
    """vae.arch.shortcut_basis "dct": the latent shortcut keeps the lowest frequencies of each block's 4-D
    DCT (orthonormal atoms, luma DC first); dct_up inverts dct_down on its span and dct_up(dct_down(.)) is
    a projection; with its networks' outputs zeroed the VAE decodes exactly that projection, which is
    closer to a smooth video than the block averages; it stays causal and adds no weights."""
    basis = dct_basis(3, 4, 8, 16)
    assert basis.shape == (16, 768) and torch.allclose(basis @ basis.T * 256, torch.eye(16), atol=1e-6)
    assert torch.allclose(basis[0], torch.full((768,), (768 * 256) ** -0.5))  # the DC: sqrt(3) x the block's mean
    x = torch.randn(2, 3, 9, 16, 24)
    z = dct_down(x, basis, 4, 8)
    assert z.shape == (2, 16, 3, 2, 3)
    assert torch.allclose(z[:, 0], block_fold(x, 4, 8).mean(1) * 3 ** 0.5, atol=1e-5)
    assert torch.allclose(dct_down(dct_up(z, basis, 4, 8), basis, 4, 8), z, atol=1e-5)  # inverse on the span
    p = dct_up(z, basis, 4, 8)
    assert torch.allclose(dct_up(dct_down(p, basis, 4, 8), basis, 4, 8), p, atol=1e-5)  # a projection
    assert p.shape == x.shape

    torch.manual_seed(0)
    arch = VAEArch(latent_channels=16, patch_size=2, channels=(16, 16, 16), blocks_per_level=1, shortcuts=True,
                   shortcut_basis="dct")
    vae, averages = VideoVAE(arch), VideoVAE(arch.model_copy(update={"shortcut_basis": "average"}))
    assert vae.state_dict().keys() == averages.state_dict().keys()  # the basis is not a weight
    t, y, xx = torch.meshgrid(torch.linspace(0, 1, 9), torch.linspace(0, 3, 32), torch.linspace(0, 3, 48), indexing="ij")
    smooth = torch.stack([torch.sin(y + xx + t), torch.cos(y - t), torch.sin(xx)])[None] * 0.8
    psnr = lambda a: (10 * torch.log10(4 / ((a - smooth) ** 2).mean())).item()  # noqa: E731
    with torch.no_grad():
        for net in (vae.encoder, vae.decoder, averages.encoder, averages.decoder):
            net.conv_out.conv.weight.zero_(), net.conv_out.conv.bias.zero_()
        projection = dct_up(dct_down(smooth, basis, 4, 8), basis, 4, 8)
        assert torch.allclose(vae.decode(vae.encode(smooth)), projection, atol=1e-5)
        assert psnr(projection) > psnr(averages.decode(averages.encode(smooth))) + 5
    vae = VideoVAE(arch)
    video = torch.randn(1, 3, 17, 16, 16)
    changed = video.clone()
    changed[:, :, 9:] = 0.0
    per_frame = (vae.encode(video) - vae.encode(changed)).abs().amax(dim=(0, 1, 3, 4))
    assert per_frame[:3].max() == 0 and per_frame[3:].min() > 0
    with pytest.raises(ValueError, match="latent_channels 800 exceeds"):
        VAEArch(latent_channels=800, channels=(8, 8, 8, 8), shortcuts=True, shortcut_basis="dct")


def test_random_window_is_a_slice_drawn_from_the_generator():
    video = torch.arange(2 * 3 * 16 * 24 * 40, dtype=torch.float32).reshape(2, 3, 16, 24, 40)
    draw = lambda seed: random_window(video, 5, (8, 16), torch.Generator().manual_seed(seed))  # noqa: E731
    a = draw(0)
    assert a.shape == (2, 3, 5, 8, 16) and torch.equal(a, draw(0))  # a resumed generator draws the same
    t, y, x = (int(a[0, 0, 0, 0, 0]) // s % n for s, n in ((24 * 40, 16), (40, 24), (1, 40)))
    assert torch.equal(a, video[:, :, t:t + 5, y:y + 8, x:x + 16])
    corners = {tuple(draw(seed)[0, 0, 0, 0, :1].tolist()) for seed in range(8)}
    assert len(corners) > 1  # windows vary
    assert random_window(video, None, None, torch.Generator()).equal(video)
    assert random_window(video, 32, (8, 64), torch.Generator()).shape == (2, 3, 16, 8, 40)  # too small: whole
    with pytest.raises(ConfigError, match="crop_size"):
        load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", ["vae_loss.crop_size=[0,8]"])


def test_weights_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    vae = VideoVAE(TINY.model_copy(update={"scaling_factor": 0.5, "shift_factor": 0.1}))
    folder = save_vae(vae, tmp_path / "vae")
    loaded = load_vae(folder)
    x = torch.randn(1, 3, 5, 16, 16)
    assert loaded.arch == vae.arch and torch.equal(loaded.encode(x), vae.encode(x))
    assert torch.equal(load_vae(folder / "model.safetensors", vae.arch).encode(x), vae.encode(x))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_vae(tmp_path / "missing.safetensors", TINY)
    with pytest.raises(ValueError, match="architecture"):
        load_vae(folder / "model.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        load_vae(folder / "model.safetensors", TINY.model_copy(update={"latent_channels": 8}))
    # per-channel normalisation (as `spacetime train vae` writes it) round-trips and applies per channel
    per_channel = VideoVAE(TINY.model_copy(update={"scaling_factor": [1.0, 2.0, 0.5, 4.0], "shift_factor": [0.0, 0.1, -0.2, 0.3]}))
    per_channel.load_state_dict(vae.state_dict())
    again = load_vae(save_vae(per_channel, tmp_path / "per_channel"))
    assert again.arch == per_channel.arch
    z = torch.randn(1, 4, 2, 2, 2)
    expected = (z - torch.tensor([0.0, 0.1, -0.2, 0.3]).view(4, 1, 1, 1)) * torch.tensor([1.0, 2.0, 0.5, 4.0]).view(4, 1, 1, 1)
    assert torch.allclose(again.normalize(z), expected) and torch.allclose(again.denormalize(expected), z, atol=1e-6)
    with pytest.raises(ValueError, match="3 values for 4 latent channels"):
        VAEArch(**TINY.model_dump() | {"scaling_factor": [1.0, 1.0, 1.0]})


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed")
def test_diffusers_vae_path_is_guarded():
    with pytest.raises(UserError, match="pip install diffusers"):
        load_diffusers_vae("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    with pytest.raises(ConfigError, match="vae.path"):
        load_config(TrainConfig, None, ["vae.source=diffusers"])


def test_perceptual_term_needs_and_uses_local_vgg_weights(tmp_path):
    with pytest.raises(ConfigError, match="perceptual_weights"):
        load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", ["vae_loss.perceptual_weight=0.1"])
    from torchvision.models import vgg16

    torch.manual_seed(0)
    weights = tmp_path / "vgg16_features.pth"
    torch.save(vgg16().features[:23].state_dict(), weights)  # random stand-in for real VGG16 weights
    loss = PerceptualLoss(weights)
    a = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert float(loss(a, a)) == 0.0 and float(loss(a, a.flip(-1))) > 0.0


def test_train_vae_reduces_reconstruction_error(tmp_path, tiny_models, monkeypatch):
    """`spacetime train vae` (configs/train/vae_tiny.yaml: the 4 clips in every step) for 120 steps
    on clips of a moving disc: reconstruction MSE of the exported RUN/vae on the training clips falls
    by >= 5x from the untrained VAE's (measured 0.21 -> 0.013, 16.7x) and below half the clips'
    variance (the error of predicting their mean; a plateau the first ~60 steps sit on)."""
    from training.data.loader import BucketLoader
    from training.train import run_train

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    data = make_dataset(tmp_path / "data")
    cfg = load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", ["log.progress=false", "vae_loss.latent_norm=channel"])
    loader = BucketLoader(cfg.loader.model_copy(update={"data": [str(data)]}))
    videos = next(b["video"] for b in loader if b["video"].shape[2] > 1)  # the 4 clips [4, 3, 16, 16, 16]
    assert videos.shape[0] == 4

    torch.manual_seed(cfg.vae.init_seed)
    untrained = VideoVAE(cfg.vae.arch)  # what run_train starts from (same seed)

    @torch.no_grad()
    def mse(vae):
        return float((vae.decode(vae.encode(videos)) - vae.trim(videos)).square().mean())

    run = tmp_path / "run"
    summary = run_train("vae", cfg, data, run, max_steps=120)
    trained = load_vae(run / "vae")
    before, after = mse(untrained), mse(trained)
    assert summary["step"] == 120 and before / after >= 5.0, (before, after)
    assert after < videos.var() / 2
    arch = json.loads((run / "vae" / "config.json").read_text())["arch"]
    # latent normalisation measured during training, per channel: the training clips' latents come out
    # about centred with unit spread in every channel
    scale, shift = arch["scaling_factor"], arch["shift_factor"]
    assert len(scale) == len(shift) == cfg.vae.arch.latent_channels and len(set(scale)) == len(scale)
    with torch.no_grad():
        z = trained.normalize(trained.posterior(videos)[0])
    std, centre = z.std(dim=(0, 2, 3, 4)), z.mean(dim=(0, 2, 3, 4))
    assert ((std > 0.5) & (std < 2)).all() and (centre.abs() < 0.5).all(), (std, centre)
    assert torch.allclose(trained.denormalize(z), trained.posterior(videos)[0], atol=1e-4)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"recon", "kl", "mse", "loss/1x1_0p_16f", "lr", "grad_norm", "tokens_per_s"} <= set(records[-1])


def test_exported_latent_normalisation_is_global_or_per_channel(tmp_path):
    """RUN/vae's scaling_factor / shift_factor: 1 / std and mean of the posterior means the last steps
    saw, over all channels (vae_loss.latent_norm: global, the default) or per channel."""
    import contextlib

    from training.parallel import Dist
    from training.tasks import build_task

    video = torch.rand(2, 3, 9, 16, 32) * 2 - 1
    exported = {}
    for norm in ("global", "channel"):
        cfg = load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", [f"vae_loss.latent_norm={norm}"])
        torch.manual_seed(0)
        task = build_task("vae", cfg, tmp_path / norm, Dist(0, 1, 0, torch.device("cpu"), False))
        task.loss(task.model, {"video": video}, torch.Generator().manual_seed(0), contextlib.nullcontext())
        task.export(tmp_path / norm, task.model.state_dict())
        exported[norm] = json.loads((tmp_path / norm / "vae" / "config.json").read_text())["arch"]
        with torch.no_grad():
            mean = task.model.posterior(video)[0].double()
    per_channel = mean.transpose(0, 1).reshape(mean.shape[1], -1)
    g, c = exported["global"], exported["channel"]
    assert g["shift_factor"] == pytest.approx(float(mean.mean()), rel=1e-4)
    assert g["scaling_factor"] == pytest.approx(1 / float(mean.std(unbiased=False)), rel=1e-4)
    assert c["shift_factor"] == pytest.approx(per_channel.mean(1).tolist(), rel=1e-4, abs=1e-6)
    assert c["scaling_factor"] == pytest.approx((1 / per_channel.std(1, unbiased=False)).tolist(), rel=1e-4)


def test_vae_step_learns_from_the_configured_window(tmp_path):
    """vae_loss.crop_frames / crop_size: a `train vae` step encodes a random window of the batch (its
    latent tokens are the window's), the same one again from a generator in the same state."""
    import contextlib

    from training.parallel import Dist
    from training.tasks import build_task

    cfg = load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", ["vae_loss.crop_frames=5", "vae_loss.crop_size=[8,16]"])
    task = build_task("vae", cfg, tmp_path, Dist(0, 1, 0, torch.device("cpu"), False))
    video = torch.rand(2, 3, 16, 32, 48) * 2 - 1

    def step(seed):
        loss, parts, tokens = task.loss(task.model, {"video": video}, torch.Generator().manual_seed(seed),
                                        contextlib.nullcontext())
        return float(loss.detach()), tokens

    (loss, tokens), (again, _) = step(0), step(0)
    # window 5 x 8 x 16 -> latent 2 x 1 x 2 -> 2 x 1 x 1 patches of loader.patch [1, 2, 2], for 2 clips
    assert tokens == 2 * 2 and loss == again
    cfg_whole = load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml")
    full = build_task("vae", cfg_whole, tmp_path / "whole", Dist(0, 1, 0, torch.device("cpu"), False))
    assert full.loss(full.model, {"video": video}, torch.Generator().manual_seed(0), contextlib.nullcontext())[2] == 2 * 4 * 2 * 3
