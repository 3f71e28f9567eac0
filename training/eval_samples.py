"""Sample videos during training: what the model makes of fixed prompts (a DiT) or of held-out clips (a
VAE), step after step.

Every `eval.sample_every` steps (a multiple of checkpoint.every: samples are drawn from the
checkpoint just written, with its EMA weights, through the same Sampler `spacetime sample` uses),
rank 0 writes

    RUN/samples/step-NNNNNNN/NN.mp4            the sample of prompt NN (NN.png for 1-frame sizes)
    RUN/samples/step-NNNNNNN/NN.reference.mp4  the held-out clip the prompt captions, through the run's VAE (.png)
    RUN/samples/step-NNNNNNN/prompts.json      prompts, sizes, seeds, steps, guidance

The prompts are `eval.prompts` (at `eval.sample_size`, default the first evaluated held-out clip's
bucket), or else the dense captions of the first `eval.sample_count` evaluated held-out clips, each
at its clip's bucket size, next to that clip's reconstruction. Seeds are fixed (eval.seed + NN), so
two steps' samples differ only by the weights. Drawing them does not touch the training: the global
RNGs are restored afterwards and the model trained is not used (a run with samples is bitwise one
without: tests/test_validate.py).

A VAE run (`write_reconstructions`) writes, from the same checkpoint's EMA weights, the first
`eval.sample_count` evaluated held-out clips each beside its reconstruction (posterior mean, decoded):

    RUN/samples/step-NNNNNNN/NN.mp4               held-out clip | reconstruction (NN.png for images)
    RUN/samples/step-NNNNNNN/reconstructions.json clip ids, files and each clip's L1, PSNR and SSIM
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from training.train_config import TrainConfig

log = logging.getLogger(__name__)
SAMPLES_DIR = "samples"


def sample_dir(run_dir: Path, step: int) -> Path:
    return run_dir / SAMPLES_DIR / f"step-{step:07d}"


def plan_prompts(cfg: TrainConfig, valset) -> list[dict]:
    """[{prompt, width, height, frames, seed, clip_index or None}] of the samples a run draws."""
    e = cfg.eval
    if e.prompts:
        if e.sample_size:
            width, height, frames = e.sample_size
        else:
            spec = valset.spec_of[valset.samples.bucket[valset.items[0]]]
            (width, height), frames = spec.size, spec.frames
        return [{"prompt": p, "width": width, "height": height, "frames": frames, "seed": e.seed + k, "clip": None}
                for k, p in enumerate(e.prompts)]
    plans = []
    for k, i in enumerate(valset.items[: e.sample_count]):
        spec = valset.spec_of[valset.samples.bucket[i]]
        plans.append({"prompt": None, "width": spec.size[0], "height": spec.size[1], "frames": spec.frames,
                      "seed": e.seed + k, "clip": i})
    return plans


@torch.no_grad()
def write_samples(checkpoint: Path, run_dir: Path, step: int, cfg: TrainConfig, valset, show=None) -> Path:
    """Draw the run's samples from `checkpoint` into RUN/samples/step-N (rank 0 only; module docstring).
    `show(tag, video, fps)`, if given, gets each sample ([3, F, H, W] in [-1, 1]) with its reference to
    its right, for TensorBoard."""
    from training.sample import Sampler, write_output
    from training.validate import rng_untouched

    out = sample_dir(run_dir, step)
    e = cfg.eval
    with rng_untouched():
        sampler = Sampler(checkpoint, use_ema=True)
        written = []
        for k, plan in enumerate(plan_prompts(cfg, valset)):
            fps, reference = e.sample_fps, None
            if plan["clip"] is not None:
                batch = valset.batch(plan["clip"])
                plan["prompt"], plan["clip_id"], fps = batch["caption"][0], batch["clip_id"][0], batch["fps"][0]
                reference = _reference(sampler, batch)
                plan["reference"] = write_output(reference, out / f"{k:02d}.reference.mp4", fps).name
            video = sampler.generate(plan["prompt"], plan["width"], plan["height"], plan["frames"], e.sample_steps,
                                     e.sample_cfg, plan["seed"])
            path = write_output(video, out / f"{k:02d}.mp4", fps)
            if show is not None:
                show(f"samples/{k:02d}", _beside(video, reference), fps)
            written.append({**{k2: v for k2, v in plan.items() if k2 != "clip"}, "file": path.name})
    (out / "prompts.json").write_text(json.dumps({"step": step, "steps": e.sample_steps, "cfg_scale": e.sample_cfg,
                                                  "checkpoint": str(checkpoint), "samples": written}, indent=1))
    log.info("step %d: %d samples -> %s", step, len(written), out)
    return out


@torch.no_grad()
def write_reconstructions(checkpoint: Path, run_dir: Path, step: int, cfg: TrainConfig, valset,
                          device: torch.device | None = None, show=None) -> Path:
    """A VAE run's samples from `checkpoint` into RUN/samples/step-N (rank 0 only; module docstring).
    `show(tag, video, fps)`, if given, gets each clip beside its reconstruction, for TensorBoard."""
    from training.checkpoint import load_model_weights
    from training.sample import write_output
    from training.vae import VideoVAE
    from training.validate import reconstruction_metrics, rng_untouched

    out = sample_dir(run_dir, step)
    with rng_untouched():
        vae = VideoVAE(cfg.vae.arch)
        load_model_weights(checkpoint, vae, ema=True)
        device = device or torch.device("cpu")
        vae.to(device).eval()
        written = []
        for k, i in enumerate(valset.items[: cfg.eval.sample_count]):
            batch = valset.batch(i)
            target, recon = vae.reconstruct(batch["video"].to(device).float())
            recon = recon.float().clamp(-1, 1)
            pair = torch.cat([target[0], recon[0]], dim=-1).cpu()  # [3, T, H, 2W]
            fps = batch["fps"][0]
            path = write_output(pair, out / f"{k:02d}.mp4", fps)
            if show is not None:
                show(f"samples/{k:02d}", pair, fps)
            written.append({"clip_id": batch["clip_id"][0], "file": path.name, "fps": fps,
                            **reconstruction_metrics(recon, target)})
    (out / "reconstructions.json").write_text(json.dumps({"step": step, "checkpoint": str(checkpoint),
                                                          "weights": "ema", "samples": written}, indent=1))
    log.info("step %d: %d held-out clips beside their reconstructions -> %s", step, len(written), out)
    return out


def _beside(video: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """The sample with its reference to its right, over the frames both have (a causal VAE's decode
    can be a few frames shorter than the bucket); the sample alone without a same-height reference."""
    if reference is None or reference.shape[-2] != video.shape[-2]:
        return video
    frames = min(video.shape[1], reference.shape[1])
    return torch.cat([video[:, :frames], reference[:, :frames]], dim=-1)


def _reference(sampler, batch: dict) -> torch.Tensor:
    """The held-out clip through the run's VAE: [3, F, H, W] in [-1, 1]."""
    vae = sampler.vae
    dtype = next(vae.parameters()).dtype
    if "latent" in batch:  # a latent cache holds the posterior
        posterior = batch["latent"].to(sampler.device)
        z = vae.latent(posterior[:, 0].to(dtype), posterior[:, 1].to(dtype))
    else:
        z = vae.encode(batch["video"].to(sampler.device, dtype))
    return vae.decode(z).float()[0].clamp(-1, 1).cpu()
