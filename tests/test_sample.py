"""training.sample on a checkpoint of a real (tiny) training run: every mode returns the requested
shapes, known frames come out as given, images are PNGs and videos mp4s of any grid size, and
--upsample calls captioner.upsample when it exists and says so when it does not."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from spacetime.cli import main
from spacetime.config import load_config
from spacetime.errors import UserError
from tests.helpers import CONFIGS
from tests.train_data import make_dataset
from training.sample import (
    Sampler,
    extend_backward,
    extend_forward,
    image_to_video,
    interpolate,
    loop,
    sample,
    video_to_video,
    write_output,
)
from training.train_config import TrainConfig


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    from training.train import run_train

    root = tmp_path_factory.mktemp("sample")
    data = make_dataset(root / "data")
    cfg = load_config(TrainConfig, CONFIGS / "train/tiny.yaml", ["log.progress=false"])
    mp = pytest.MonkeyPatch()
    mp.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train("dit", cfg, data, root / "run", max_steps=4)
        yield root / "run"
    finally:
        torch.set_num_threads(threads)
        mp.undo()


@pytest.fixture(scope="module")
def sampler(checkpoint, tiny_models):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    try:
        yield Sampler(checkpoint)
    finally:
        mp.undo()


def clip(frames: int, height: int = 24, width: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


MODES = {  # name: (frames, conditions, latent frames expected held (release 0))
    "text": (9, lambda s: [], []),
    "image_to_video": (13, lambda s: image_to_video(clip(1)[:, 0]), [0]),
    "extend_forward": (17, lambda s: extend_forward(clip(5)), [0, 1]),
    "extend_backward": (17, lambda s: extend_backward(clip(8), 17), [3, 4]),
    "loop_image": (13, lambda s: loop(clip(1), 13), [0, 3]),
    "interpolate": (21, lambda s: interpolate(clip(5), clip(5, seed=1), 21), [0, 1, 5]),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_returns_the_requested_shape_and_keeps_known_frames(sampler, mode):
    frames, make, held = MODES[mode]
    width, height = 40, 24  # not multiples of the 8x VAE: latents 5 x 3, cropped back
    conditions = make(sampler)
    video, latents, release = sampler.generate("a disc", width, height, frames, steps=4, cfg_scale=3.0,
                                               conditions=conditions, return_latents=True)
    assert video.shape == (3, frames, height, width) and video.abs().max() <= 1
    assert latents.shape == (1, 4, 1 + -(-(frames - 1) // 4), 3, 5)
    if not conditions:
        assert release is None
        return
    assert torch.nonzero(release == 0).flatten().tolist() == held
    from training.sample import pixel_plan

    padded = 1 + (latents.shape[2] - 1) * 4
    pixels, _ = pixel_plan(conditions, frames, padded, height, width)
    known = sampler.vae.encode(pixels[None])
    assert torch.equal(latents[:, :, held], known[:, :, held])  # held latent frames come out exactly known
    free = [j for j in range(latents.shape[2]) if j not in held]
    assert not torch.allclose(latents[:, :, free], known[:, :, free], atol=1e-3)


def test_image_to_video_first_frame_is_the_vae_reconstruction_of_the_image(sampler):
    """Causal decoder: output frame 0 depends on latent 0 only, which is held to the image's latent."""
    image = clip(1)
    video = sampler.generate("a disc", 40, 24, 13, steps=3, conditions=image_to_video(image[:, 0]))
    with torch.no_grad():
        alone = sampler.vae.decode(sampler.vae.encode(image[None]))[0, :, 0].clamp(-1, 1)
    assert torch.allclose(video[:, 0], alone, atol=1e-4)


def test_sdedit_stays_closer_to_its_input_the_lower_the_strength(sampler):
    source = sampler.generate("a disc", 40, 24, 9, steps=4, seed=5)
    far = sampler.generate("a disc", 40, 24, 9, steps=8, seed=6)
    d_low = (sampler.generate("a disc", 40, 24, 9, steps=8, seed=6, conditions=video_to_video(source, 0.2)) - source)
    d_high = (sampler.generate("a disc", 40, 24, 9, steps=8, seed=6, conditions=video_to_video(source, 0.9)) - source)
    assert d_low.abs().mean() < d_high.abs().mean() < (far - source).abs().mean() * 1.5


def test_image_is_png_and_video_is_mp4(checkpoint, sampler, tmp_path):
    image = sample(checkpoint, "a disc", 24, 16, 1, tmp_path / "still.mp4", steps=2, sampler=sampler)
    assert image.path.suffix == ".png" and image.video.shape == (3, 1, 16, 24)
    with Image.open(image.path) as im:
        assert im.size == (24, 16)
    result = sample(checkpoint, "a disc", 40, 24, 9, tmp_path / "clip.mp4", steps=2, fps=8, sampler=sampler)
    with av.open(str(result.path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (24, 40, 3)
    got, expected = np.stack(frames).astype(float), ((result.video.permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.8  # H.264 (lossy) of what was generated
    odd = write_output(torch.zeros(3, 2, 9, 11), tmp_path / "odd.mp4")  # odd sizes: 4:4:4
    with av.open(str(odd)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height) == (11, 9)


def test_upsample_runs_the_captioner(checkpoint, sampler, tiny_models):
    """--upsample: the real captioner (tiny VLM, transformers engine) rewrites the prompt."""
    from tests.caption_support import caption_config

    with pytest.raises(UserError, match="--caption-config"):
        sample(checkpoint, "a cat", 16, 16, 1, None, steps=1, upsample=True, sampler=sampler)
    cfg = caption_config(tiny_models["vlm"]["path"], engine="transformers")
    result = sample(checkpoint, "a cat", 16, 16, 1, None, steps=1, upsample=True, caption_config=cfg,
                    sampler=sampler)
    assert isinstance(result.prompt, str) and result.prompt.strip() and result.prompt != "a cat"


def test_cli_image_to_video(checkpoint, tiny_models, monkeypatch, tmp_path):
    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(tmp_path / "first.png")
    assert main(["sample", "--checkpoint", str(checkpoint), "--prompt", "a disc", "--width", "48", "--height", "32",
                        "--frames", "5", "--steps", "2", "--mode", "i2v", "--image", str(tmp_path / "first.png"),
                        "--out", str(tmp_path / "i2v.mp4")]) == 0
    with av.open(str(tmp_path / "i2v.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 5
