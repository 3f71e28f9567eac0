"""`spacetime sample`: text (+ known frames) -> video or image, from a DiT checkpoint.

    sample("runs/a", "a red texture drifting right", width=256, height=144, frames=33, out_path="a.mp4")
    s = Sampler("runs/a"); video = s.generate(prompt, 256, 144, 33, conditions=image_to_video(img))

Any grid size: noise latents are made at the requested size (ceil(H/8) x ceil(W/8) x
1 + ceil((F-1)/4) latent frames for the VAE's compression), the DiT patches whatever grid it is
given, and the decoded video is cropped to H x W x F. frames == 1 is an image (written as PNG);
otherwise an H.264 mp4 (PyAV). Euler steps integrate the rectified flow from noise (t = 1) to data
(t = 0) on the time grid shifted for the token count, as in training (training.flow); classifier-
free guidance mixes the prompt's velocity with that of the empty caption (the loader's caption
dropout taught the model the latter), cfg_scale 1 being the plain conditional model.

ONE conditioning mechanism: known pixel frames at given output positions (`Condition`). They are
written into a video of the output's length (unknown frames filled with the nearest known frame),
encoded with the VAE, and every latent frame whose pixel frames are all known is held, at each
Euler step, to the known latent noised to the current time with the same noise (training.flow.
euler_sample), until its `release` time (0: held to the end, so it comes out exactly as the known
latent). Every mode is a choice of frames and positions:
    image_to_video      the image at frame 0
    extend_forward      the clip at the start, new frames after it
    extend_backward     the clip at the end, new frames before it
    loop                the same clip at the start and at the end: the video returns to its start
    interpolate         clip a at the start, clip b at the end, the gap generated
    video_to_video      SDEdit: every frame known with release = strength (noise level it restarts from)
Conditioning acts on whole latent frames (frame 0, then groups of 4 frames): known frames that only
partly cover a group leave it free (`loop` pads its end copy to whole groups). The causal VAE
encodes a prefix exactly; known frames after unknown ones are encoded with the nearest-known-frame
filling in their receptive field, so seams there are approximate.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from spacetime.errors import UserError
from spacetime.io import atomic_path
from training.checkpoint import load_model_weights, resolve_checkpoint
from training.dit import DiT, DiTConfig
from training.flow import FlowConfig, euler_sample, guided_velocity, sampling_times

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- conditions
@dataclass
class Condition:
    """Known frames: `frames` [3, K, H, W] in [-1, 1] (any size: resized to cover and centre-cropped)
    at output frame positions `index` (K of them, negative counts from the end), held until noise
    level `release` (0: to the end; in (0, 1): SDEdit strength)."""

    frames: torch.Tensor
    index: list[int]
    release: float = 0.0

    def __post_init__(self):
        if self.frames.dim() != 4 or self.frames.shape[0] != 3:
            raise ValueError(f"condition frames must be [3, K, H, W], got {list(self.frames.shape)}")
        if len(self.index) != self.frames.shape[1]:
            raise ValueError(f"{self.frames.shape[1]} condition frames but {len(self.index)} positions")
        if not 0.0 <= self.release <= 1.0:
            raise ValueError(f"release {self.release} outside [0, 1]")


def image_to_video(image: torch.Tensor) -> list[Condition]:
    """image [3, H, W] or [3, 1, H, W] -> first frame."""
    image = image[:, None] if image.dim() == 3 else image
    return [Condition(image[:, :1], [0])]


def extend_forward(video: torch.Tensor) -> list[Condition]:
    """video [3, K, H, W] -> the output's first K frames; the rest continues it."""
    return [Condition(video, list(range(video.shape[1])))]


def extend_backward(video: torch.Tensor, frames: int) -> list[Condition]:
    """video [3, K, H, W] -> the output's last K frames; what leads up to it is generated."""
    k = video.shape[1]
    return [Condition(video, list(range(frames - k, frames)))]


def loop(clip: torch.Tensor, frames: int, temporal: int = 4) -> list[Condition]:
    """clip [3, K, H, W] (K may be 1: an image) at the start AND at the end: the video comes back to
    where it began. Conditioning works on whole latent frames (`temporal` pixel frames each after the
    first), so the end copy is preceded by copies of the clip's first frame up to a multiple of
    `temporal` frames (with an image, the last `temporal` frames hold it)."""
    k = clip.shape[1]
    end = clip if k % temporal == 0 else torch.cat([clip[:, :1].expand(-1, temporal - k % temporal, -1, -1), clip], 1)
    if k + end.shape[1] > frames:
        raise ValueError(f"loop: a {k}-frame clip at both ends needs more than {frames} frames")
    return [Condition(clip, list(range(k))), Condition(end, list(range(frames - end.shape[1], frames)))]


def interpolate(a: torch.Tensor, b: torch.Tensor, frames: int) -> list[Condition]:
    """Clip a [3, Ka, H, W] at the start, clip b [3, Kb, H, W] at the end, the frames between generated."""
    if a.shape[1] + b.shape[1] > frames:
        raise ValueError(f"interpolate: {a.shape[1]} + {b.shape[1]} known frames exceed {frames}")
    return [Condition(a, list(range(a.shape[1]))), Condition(b, list(range(frames - b.shape[1], frames)))]


def video_to_video(video: torch.Tensor, strength: float) -> list[Condition]:
    """SDEdit: every frame of video [3, K, H, W] known, released at noise level `strength` (higher
    strength: more freedom from the input)."""
    return [Condition(video, list(range(video.shape[1])), release=strength)]


def fit(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, K, h, w] -> [3, K, height, width]: resize to cover, centre crop (the loader's rule)."""
    _, _, h, w = frames.shape
    if (h, w) == (height, width):
        return frames
    s = max(width / w, height / h)
    rh, rw = max(height, round(h * s)), max(width, round(w * s))
    out = F.interpolate(frames.transpose(0, 1).float(), size=(rh, rw), mode="bilinear", antialias=True,
                        align_corners=False)  # [K, 3, rh, rw]
    y0, x0 = (rh - height) // 2, (rw - width) // 2
    return out[:, :, y0:y0 + height, x0:x0 + width].transpose(0, 1).clamp(-1, 1)


def pixel_plan(conditions: list[Condition], frames: int, padded: int, height: int, width: int):
    """Known frames in a video of `padded` frames: (pixels [3, padded, H, W], release [padded], 1 = free)."""
    pixels = torch.zeros(3, padded, height, width)
    release = torch.ones(padded, dtype=torch.float64)
    for c in conditions:
        fitted = fit(c.frames, height, width)
        for k, i in enumerate(c.index):
            j = i + frames if i < 0 else i
            if not 0 <= j < frames:
                raise ValueError(f"condition frame position {i} outside the {frames} output frames")
            pixels[:, j] = fitted[:, k]
            release[j] = c.release
    release[frames:] = release[frames - 1]  # padding past the output (cropped): as known as its last frame
    known = torch.nonzero(release < 1).flatten()
    if len(known):  # unknown frames: copies of the nearest known frame (earlier one on ties)
        for j in torch.nonzero(release >= 1).flatten().tolist():
            pixels[:, j] = pixels[:, int(known[(known - j).abs().argmin()])]
    return pixels, release


def latent_release(release: torch.Tensor, temporal: int, latent_frames: int) -> torch.Tensor:
    """Per latent frame: the largest release of the pixel frames it covers (frame 0 -> latent 0,
    frames (j-1)*ct+1 .. j*ct -> latent j), so a latent is held only if all its frames are known."""
    out = torch.empty(latent_frames, dtype=torch.float64)
    out[0] = release[0]
    for j in range(1, latent_frames):
        out[j] = release[(j - 1) * temporal + 1: j * temporal + 1].max()
    return out


# ------------------------------------------------------------------------------------ sampler
class Sampler:
    """A DiT checkpoint (or run folder: its newest checkpoint) with its VAE and text encoder, loaded once."""

    def __init__(self, checkpoint: str | Path, use_ema: bool = True, device: str | torch.device | None = None):
        from spacetime.models import resolve
        from training.text_encoder import load_text_encoder

        self.path = resolve_checkpoint(checkpoint)
        meta = json.loads((self.path / "meta.json").read_text())
        if meta.get("kind") != "dit":
            raise ValueError(f"{self.path}: a {meta.get('kind')} checkpoint; sampling needs a DiT checkpoint")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        args = meta["model_args"]
        self.model = DiT(DiTConfig.model_validate(args["dit"]), args["in_channels"], args["text_dim"])
        load_model_weights(self.path, self.model, ema=use_ema)  # full or sharded (DCP) checkpoints
        self.model.to(self.device).eval().requires_grad_(False)
        self.vae = self._load_vae(meta["vae"]).to(self.device).eval().requires_grad_(False)
        te = meta["text_encoder"]
        self.max_length = te["max_length"]
        self.tokenizer, self.text_encoder = load_text_encoder(resolve(te["path"]), device=str(self.device))
        self.flow = FlowConfig.model_validate(meta["flow"])
        self.step = meta["step"]

    def _load_vae(self, ref: dict):
        from training.vae import load_diffusers_vae, load_vae

        if ref["source"] == "diffusers":
            return load_diffusers_vae(ref["path"])
        path = Path(ref["path"])
        if ref.get("run_relative"):  # the run folder may have moved
            local = self.path.parent.parent / ref["run_relative"]
            path = local if local.exists() else path
        if ref.get("untrained"):
            log.warning("this DiT was trained on an UNTRAINED random VAE (%s): samples are not meaningful video", path)
        return load_vae(path)

    def _text(self, prompts: list[str]):
        from training.text_encoder import encode_text

        emb, mask = encode_text(self.tokenizer, self.text_encoder, prompts, self.max_length)
        return emb.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompt: str, width: int, height: int, frames: int, steps: int = 30, cfg_scale: float = 5.0,
                 seed: int = 0, negative_prompt: str = "", conditions: list[Condition] | None = None,
                 return_latents: bool = False):
        """-> video [3, frames, height, width] in [-1, 1] (and the final latents [1, C, T', H', W'] and
        the per-latent-frame release when `return_latents`)."""
        if min(width, height, frames, steps) < 1:
            raise ValueError(f"width, height, frames and steps must be >= 1 (got {width}, {height}, {frames}, {steps})")
        ct, cs = self.vae.temporal_compression, self.vae.spatial_compression
        lt = 1 + math.ceil((frames - 1) / ct)
        shape = (1, self.vae.latent_channels, lt, math.ceil(height / cs), math.ceil(width / cs))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(shape, generator=generator, device=self.device)

        known = release = None
        if conditions:
            padded = 1 + (lt - 1) * ct
            pixels, pixel_release = pixel_plan(conditions, frames, padded, height, width)
            known = self.vae.encode(pixels[None].to(self.device)).float()  # [1, C, T', H', W']
            release = latent_release(pixel_release, ct, lt)
            if bool((release >= 1).all()):
                log.warning("no latent frame is fully covered by the known frames: nothing is conditioned "
                            "(a latent frame j >= 1 spans %d pixel frames)", ct)

        text, mask = self._text([prompt])
        null, null_mask = self._text([negative_prompt])
        velocity = guided_velocity(self.model, text, mask, null, null_mask, cfg_scale)
        tokens = math.prod(math.ceil(n / p) for n, p in zip(shape[2:], self.model.cfg.patch))
        times = sampling_times(steps, tokens, self.flow)
        latents = euler_sample(velocity, noise, times, known, release)
        video = self.vae.decode(latents.to(next(self.vae.parameters()).dtype)).float()[0]  # [3, F', H', W']
        video = video[:, :frames, :height, :width].clamp(-1, 1).cpu()
        return (video, latents, release) if return_latents else video


@dataclass
class SampleResult:
    video: torch.Tensor  # [3, F, H, W] in [-1, 1]
    path: Path | None
    prompt: str  # the prompt used (upsampled if asked)


def upsample_prompt(prompt: str, caption_config=None) -> str:
    """The prompt made dense by the captioner (captioner.upsample), in the training captions' style."""
    from captioner.upsample import upsample

    if caption_config is None:
        raise UserError("--upsample needs --caption-config FILE: the captioner config that writes dense "
                        "captions (e.g. configs/caption/default.yaml)")
    return upsample(prompt, caption_config)


def sample(checkpoint: str | Path, prompt: str, width: int, height: int, frames: int, out_path: str | Path | None,
           steps: int = 30, cfg_scale: float = 5.0, seed: int = 0, negative_prompt: str = "",
           conditions: list[Condition] | None = None, fps: float = 24.0, use_ema: bool = True,
           upsample: bool = False, caption_config=None, device: str | None = None,
           sampler: Sampler | None = None) -> SampleResult:
    """Generate one video (frames > 1, written as mp4) or image (frames == 1, PNG) from a DiT
    checkpoint or run folder; see the module docstring for `conditions`."""
    if upsample:
        prompt = upsample_prompt(prompt, caption_config)
        log.info("upsampled prompt: %s", prompt)
    sampler = sampler or Sampler(checkpoint, use_ema=use_ema, device=device)
    video = sampler.generate(prompt, width, height, frames, steps, cfg_scale, seed, negative_prompt, conditions)
    path = write_output(video, out_path, fps) if out_path is not None else None
    return SampleResult(video, path, prompt)


# -------------------------------------------------------------------------------------- media I/O
def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_output(video: torch.Tensor, out_path: str | Path, fps: float = 24.0) -> Path:
    """An image (1 frame: PNG, the suffix is forced to .png) or an H.264 mp4; written via a temp name."""
    import av
    from PIL import Image

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video)
    if frames.shape[0] == 1:
        out = out.with_suffix(".png")
        with atomic_path(out) as tmp:
            Image.fromarray(frames[0]).save(tmp, format="PNG")
        return out
    out = out if out.suffix else out.with_suffix(".mp4")
    h, w = frames.shape[1:3]
    with atomic_path(out) as tmp, av.open(str(tmp), "w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream("libx264", rate=rate, options={"crf": "16"})  # near-lossless for review
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"  # 4:2:0 needs even sizes
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out


def read_video(path: str | Path, max_frames: int | None = None) -> torch.Tensor:
    """A video (or image: 1 frame) file -> [3, T, H, W] in [-1, 1], upright."""
    import av

    from spacetime.frames import upright

    out = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        for frame in container.decode(video=0):
            out.append(upright(frame.to_ndarray(format="rgb24"), int(getattr(frame, "rotation", 0) or 0)))
            if max_frames and len(out) == max_frames:
                break
    if not out:
        raise ValueError(f"{path}: no frame decoded")
    return torch.from_numpy(np.stack(out)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def read_image(path: str | Path) -> torch.Tensor:
    """An image file -> [3, 1, H, W] in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)[:, None].float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ CLI
def conditions_from_args(args: argparse.Namespace, temporal: int = 4) -> list[Condition]:
    def need(name):
        value = getattr(args, name)
        if value is None:
            raise ValueError(f"--mode {args.mode} needs --{name}")
        return value

    frames = args.frames
    if args.mode == "text":
        return []
    if args.mode == "i2v":
        return image_to_video(_read_any(need("image"), 1))
    if args.mode == "extend-forward":
        return extend_forward(read_video(need("video"), frames - 1))
    if args.mode == "extend-backward":
        return extend_backward(read_video(need("video"), frames - 1), frames)
    if args.mode == "loop":
        clip = _read_any(args.image, 1) if args.image is not None else read_video(need("video"), frames // 3)
        return loop(clip, frames, temporal)
    if args.mode == "interpolate":
        a, b = read_video(need("video"), frames // 2), read_video(need("video2"), frames // 2)
        return interpolate(a, b, frames)
    return video_to_video(read_video(need("video"), frames), args.strength)


def _read_any(path: Path, max_frames: int) -> torch.Tensor:
    return read_image(path) if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp") else \
        read_video(path, max_frames)


def cmd_sample(args: argparse.Namespace) -> int:
    caption_cfg = None
    if args.upsample and args.caption_config is not None:
        from captioner.config import CaptionConfig
        from spacetime.config import load_config

        caption_cfg = load_config(CaptionConfig, args.caption_config)
    sampler = Sampler(args.checkpoint, use_ema=not args.no_ema, device=args.device)
    conditions = conditions_from_args(args, sampler.vae.temporal_compression)
    result = sample(args.checkpoint, args.prompt, args.width, args.height, args.frames, args.out, args.steps,
                    args.cfg_scale, args.seed, args.negative_prompt, conditions, args.fps, upsample=args.upsample,
                    caption_config=caption_cfg, sampler=sampler)
    print(f"{result.path} ({args.frames} frame{'s' if args.frames > 1 else ''}, {args.width}x{args.height})")
    return 0
