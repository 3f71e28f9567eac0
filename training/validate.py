"""Validation on held-out data: the numbers that show whether a model is getting better.

    valset = ValSet(cfg, d)                            # the held-out clips (the same for every rank and run)
    record = validate(task, model, valset, cfg, d)     # {"val_loss": ..., "val_loss/q0.06": ..., ...}
    spacetime eval --checkpoint RUN --data OUT         # the same record for any checkpoint, as JSON

Held-out data. `eval.fraction` of loader.data's SOURCES (training.data.index.held_out: a hash of the
source's content digest, so all clips of one video fall on one side), plus every clip of `eval.data`.
The trainer's loader never reads them (BucketLoader(holdout=eval.fraction)). Of those clips, a fixed
subset is evaluated: ordered by a hash of their clip id (which mixes the buckets), taken while their
latent tokens stay within `eval.tokens` (at least one). RUN/heldout.json names them.

DiT. A rectified-flow loss whose noise does not move it (SD3, section 5.3.3): every held-out clip is
evaluated at `eval.timesteps` fixed timesteps, the evenly spaced quantiles (k + 0.5) / K of the
training distribution (logit-normal, then shifted for the clip's token count, training.flow), with
noise and posterior draws from a generator seeded by (eval.seed, clip id). The clip's caption is its
dense one. Two evaluations of the same weights give the same numbers bit for bit, however many
ranks or workers share the work: one clip per forward (its K timesteps as the batch), and the sums
are reduced once. Reported: `val_loss` (the mean over timesteps of the mean over clips),
`val_loss/qNN` per timestep quantile, `val_loss/bucket/<bucket>` per bucket; with `eval.raw` the same
for the raw weights under `val_raw_loss...`.

VAE. Reconstruction of each held-out clip from its posterior mean: `val_l1` (on [-1, 1] pixels),
`val_psnr` (dB, pixels in [0, 1], mean over clips of the clip's PSNR) and `val_ssim` (8x8 windows,
mean over frames and clips), per bucket too.

Ranks. Clip j goes to data-parallel rank j mod dp_size (context-parallel ranks of one group share
their clips, as in training); every rank runs the same number of forwards (a rank short of clips
repeats its first with weight 0), since FSDP2 and context parallelism communicate inside the forward.
Training state is untouched: the EMA weights are swapped into the model and back, no RNG but the
validation's own is drawn, and the model returns to train mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from training.data.index import bucket_specs, latent_tokens, read_index
from training.parallel import Dist
from training.train_config import TrainConfig

log = logging.getLogger(__name__)
HELDOUT_FILE = "heldout.json"


def _order(clip_id: str) -> str:
    return hashlib.sha256(f"spacetime-val:{clip_id}".encode()).hexdigest()


def clip_seed(seed: int, clip_id: str) -> int:
    """The seed of a held-out clip's noise: a function of (eval.seed, clip id) only."""
    return (seed * 1_000_003 + int(_order(clip_id)[:12], 16)) % 2**63


class ValSet:
    """The held-out clips a run evaluates (module docstring), and their loading: one clip a batch."""

    def __init__(self, cfg: TrainConfig):
        """`cfg`: the run's config, its loader synced with the models (training.tasks.sync_loader)."""
        from training.data.dataset import BucketDataset
        from training.data.plan import LoaderState

        from spacetime.contract import ShardReader

        e, loader = cfg.eval, cfg.loader
        if not (e.fraction or e.data):
            raise ValueError("no held-out data: set eval.fraction or eval.data")
        self.samples = read_index(loader.data if e.fraction else [], loader.s3, e.fraction, "val", whole=e.data)
        # dense captions only: the loader's caption draw is for training
        self.loader_cfg = loader.model_copy(update={"caption_dropout": 0.0, "short_caption_prob": 0.0})
        specs = bucket_specs(self.samples, self.loader_cfg)
        self.spec_of = {s.name: s for s in specs}
        candidates = sorted(range(len(self.samples)), key=lambda i: _order(self.samples.clip_id[i]))
        self.items, tokens = [], 0
        for i in candidates:
            spec = self.spec_of[self.samples.bucket[i]]
            cost = latent_tokens(spec.frames, *spec.size, self.loader_cfg)
            if self.items and tokens + cost > e.tokens:
                continue
            self.items.append(i)
            tokens += cost
        if not self.items:
            raise ValueError(f"no held-out clip: eval.fraction {e.fraction} of {loader.data} holds out no source "
                             "and eval.data is empty; raise eval.fraction or give eval.data")
        self.buckets = sorted({self.samples.bucket[i] for i in self.items})
        self.tokens = tokens
        self.dataset = BucketDataset(self.samples, specs, self.loader_cfg, LoaderState(seed=0), 0, 1)
        self.reader = ShardReader(self.loader_cfg.s3)  # kept: each shard's headers are scanned once per run

    def describe(self) -> dict:
        """What RUN/heldout.json records: every held-out clip (all sources held out) and the evaluated ones."""
        s = self.samples
        return {"held_out_clips": sorted(s.clip_id), "held_out_sources": sorted(set(s.source)),
                "evaluated": [{"clip_id": s.clip_id[i], "bucket": s.bucket[i], "shard": s.shard[i]}
                              for i in self.items], "tokens": self.tokens}

    def batch(self, i: int) -> dict:
        """Held-out clip i as a batch of one (the loader's format: training.data.loader)."""
        import numpy as np

        from training.data.dataset import to_unit_range

        spec = self.spec_of[self.samples.bucket[i]]
        if self.samples.cached:
            x = self.dataset.load_cached(i, spec, 0, self.reader)
            tensors = {k: torch.from_numpy(np.stack([x.pop(k)])) for k in ("latent", "text", "text_mask")}
        else:
            w, h = spec.size
            frames = np.empty((1, 3, spec.frames, h, w), np.uint8)
            x = self.dataset.load(i, spec, 0, self.reader, frames[0])
            tensors = {"video": to_unit_range(torch.from_numpy(frames))}  # float32 in [-1, 1]
        return {**tensors, "caption": [x["caption"]], "clip_id": [x["clip_id"]], "bucket": spec.name, "fps": [x["fps"]]}


def write_heldout(run_dir: Path, valset: ValSet, d: Dist) -> None:
    if d.is_main:
        (run_dir / HELDOUT_FILE).write_text(json.dumps(valset.describe(), indent=1))


def quantile_levels(k: int) -> torch.Tensor:
    """The K evenly spaced quantile levels (j + 0.5) / K."""
    return (torch.arange(k, dtype=torch.float64) + 0.5) / k


def fixed_timesteps(k: int, tokens: int, flow) -> torch.Tensor:
    """[K] float32: the levels' quantiles of the training timestep distribution for `tokens` patches."""
    from training.flow import shift_for_tokens, time_shift

    u = torch.sigmoid(flow.logit_mean + flow.logit_std * torch.special.ndtri(quantile_levels(k)))
    return time_shift(u, shift_for_tokens(tokens, flow)).float()


@contextlib.contextmanager
def rng_untouched():
    """Python's, numpy's and torch's (CPU and CUDA) global RNG states restored after the block: what
    validation and sampling draw (a library's own use included) never reaches the training stream."""
    import random

    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema):
    """The EMA's weights in `model` for the block, the model's own restored after (sharded alike)."""
    params = ema.params
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, ema.shadow):
            p.copy_(s)
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _batches(valset: ValSet, d: Dist):
    """(clip index, weight, batch) of this rank's clips. A clip that cannot be read (a corrupt sample)
    is logged and replaced at weight 0 by a readable one, so the ranks still run the same number of
    forwards; only when no held-out clip reads at all does validation fail."""
    from spacetime.errors import describe

    fallback = None
    for i, weight in _slices(valset, d):
        try:
            batch = valset.batch(i)
        except Exception as err:
            log.error("held-out clip %s (%s) not evaluated: %s", valset.samples.clip_id[i], valset.samples.shard[i],
                      describe(err))
            fallback = fallback or _first_readable(valset)
            i, weight, batch = fallback[0], 0.0, fallback[1]
        fallback = fallback or (i, batch)
        yield i, weight, batch


def _first_readable(valset: ValSet) -> tuple[int, dict]:
    for j in valset.items:
        try:
            return j, valset.batch(j)
        except Exception:
            continue
    raise RuntimeError(f"no held-out clip of {len(valset.items)} could be read (see the errors above)")


def _slices(valset: ValSet, d: Dist) -> list[tuple[int, float]]:
    """This rank's (clip, weight) list: clip j to data-parallel rank j mod dp_size; padded with its
    first clip at weight 0 so that every rank runs the same number of forwards."""
    items = valset.items
    per_rank = math.ceil(len(items) / d.dp_size)
    mine = [(items[j], 1.0) for j in range(d.dp_rank, len(items), d.dp_size)]
    pad = mine[0][0] if mine else items[0]
    return mine + [(pad, 0.0)] * (per_rank - len(mine))


@torch.no_grad()
def validate(task, model: torch.nn.Module, valset: ValSet, cfg: TrainConfig, d: Dist, amp=None,
             prefix: str = "val") -> dict:
    """The validation record of `model` as it is (module docstring); a collective under torchrun."""
    was_training = model.training
    model.eval()
    try:
        with rng_untouched():
            sums_of = _dit_sums if task.kind == "dit" else _vae_sums
            sums, counts, names = sums_of(task, model, valset, cfg, d, amp or contextlib.nullcontext())
    finally:
        model.train(was_training)
    if d.enabled:
        packed = torch.cat([sums.flatten(), counts])
        dist.all_reduce(packed)
        sums, counts = packed[:sums.numel()].view_as(sums), packed[sums.numel():]
    total = counts.sum()
    record = {}
    if task.kind == "dit":
        per_t = sums.sum(0) / total  # [K]
        record[f"{prefix}_loss"] = float(per_t.mean())
        for level, value in zip(quantile_levels(cfg.eval.timesteps).tolist(), per_t.tolist()):
            record[f"{prefix}_loss/q{level:.3f}"] = value
        for b, name in enumerate(valset.buckets):
            if counts[b] > 0:
                record[f"{prefix}_loss/bucket/{name}"] = float(sums[b].mean() / counts[b])
    else:
        for m, metric in enumerate(names):
            record[f"{prefix}_{metric}"] = float(sums[:, m].sum() / total)
            for b, name in enumerate(valset.buckets):
                if counts[b] > 0:
                    record[f"{prefix}_{metric}/bucket/{name}"] = float(sums[b, m] / counts[b])
    record[f"{prefix}_clips"] = round(float(total) / d.context)  # a context-parallel group counts its clips once each
    return record


def _dit_sums(task, model, valset: ValSet, cfg: TrainConfig, d: Dist, amp):
    """([buckets, K] weighted loss sums, [buckets] weights, names) of this rank's clips."""
    from training.flow import interpolate
    from training.tasks import _patch_tokens

    k = cfg.eval.timesteps
    sums = torch.zeros(len(valset.buckets), k, dtype=torch.float64, device=d.device)
    counts = torch.zeros(len(valset.buckets), dtype=torch.float64, device=d.device)
    for i, weight, batch in _batches(valset, d):
        generator = torch.Generator(device=d.device).manual_seed(clip_seed(cfg.eval.seed, valset.samples.clip_id[i]))
        x0, text, mask = task.inputs(batch, generator)
        t = fixed_timesteps(k, _patch_tokens(x0.shape, task.patch), cfg.flow).to(d.device)
        x0, text, mask = x0.expand(k, *x0.shape[1:]), text.expand(k, *text.shape[1:]), mask.expand(k, *mask.shape[1:])
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        with amp:
            pred = model(interpolate(x0, noise, t), t, text, mask)
        loss = (pred.float() - (noise - x0).float()).square().flatten(1).mean(1)
        b = valset.buckets.index(batch["bucket"])
        sums[b] += weight * loss.double()
        counts[b] += weight
    return sums, counts, None


VAE_METRICS = ("l1", "psnr", "ssim")


def _vae_sums(task, model, valset: ValSet, cfg: TrainConfig, d: Dist, amp):
    """([buckets, metrics] weighted sums, [buckets] weights, metric names) of this rank's clips."""
    sums = torch.zeros(len(valset.buckets), len(VAE_METRICS), dtype=torch.float64, device=d.device)
    counts = torch.zeros(len(valset.buckets), dtype=torch.float64, device=d.device)
    vae = getattr(model, "module", model)
    for _, weight, batch in _batches(valset, d):
        video = batch["video"].to(d.device).float()
        with amp:
            target, recon = vae.reconstruct(video)
        values = reconstruction_metrics(recon.float().clamp(-1, 1), target)
        b = valset.buckets.index(batch["bucket"])
        sums[b] += weight * torch.tensor([values[m] for m in VAE_METRICS], dtype=torch.float64, device=d.device)
        counts[b] += weight
    return sums, counts, VAE_METRICS


def reconstruction_metrics(recon: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """L1 on [-1, 1] pixels, PSNR (dB, [0, 1] pixels) and SSIM (8x8 mean windows, per frame, averaged)
    of one clip [1, 3, T, H, W]."""
    import torch.nn.functional as F

    l1 = float((recon - target).abs().mean())
    x, y = (recon.double() + 1) / 2, (target.double() + 1) / 2
    mse = float((x - y).square().mean())
    psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
    frames = lambda v: v[0].permute(1, 0, 2, 3)  # noqa: E731  [T, 3, H, W]
    x, y = frames(x), frames(y)
    win = max(1, min(8, x.shape[-1], x.shape[-2]))
    mu_x, mu_y = F.avg_pool2d(x, win, 1), F.avg_pool2d(y, win, 1)
    var_x = F.avg_pool2d(x * x, win, 1) - mu_x ** 2
    var_y = F.avg_pool2d(y * y, win, 1) - mu_y ** 2
    cov = F.avg_pool2d(x * y, win, 1) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return {"l1": l1, "psnr": psnr, "ssim": float(ssim.mean())}


# ------------------------------------------------------------------------------------------ CLI
def evaluate_checkpoint(checkpoint: str | Path, data: list[str] | None = None, val_data: list[str] | None = None,
                        raw: bool = False) -> dict:
    """The validation record of a checkpoint (or a run folder's newest), as training logged it: the
    run's config, held-out choice and weights (EMA, or the raw ones with `raw`). `data` replaces
    loader.data (its held-out sources are evaluated), `val_data` eval.data."""
    from training.checkpoint import load_model_weights, resolve_checkpoint
    from training.parallel import autocast_dtype, init_distributed
    from training.tasks import build_task, sync_loader

    path = resolve_checkpoint(checkpoint)
    meta = json.loads((path / "meta.json").read_text())
    cfg = TrainConfig.model_validate(meta["config"])
    if data:
        cfg.loader.data = [str(x) for x in data]
    if val_data:
        cfg.eval.data = [str(x) for x in val_data]
    if not (cfg.eval.fraction or cfg.eval.data):
        raise ValueError(f"{path}: the run held nothing out (eval.fraction 0, no eval.data); give --val-data OUT")
    d = init_distributed(cfg.parallel.model_copy(update={"mode": "none", "context": 1}))
    torch.manual_seed(cfg.seed)
    task = build_task(meta["kind"], cfg, path.parent.parent, d)
    cfg = sync_loader(cfg, *task.compression, task.patch)
    load_model_weights(path, task.model, ema=not raw)
    model = task.model.to(d.device)
    amp_dtype = autocast_dtype(cfg.parallel, d.device)
    amp = torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else None
    record = validate(task, model, ValSet(cfg), cfg, d, amp, prefix="val_raw" if raw else "val")
    return {"checkpoint": str(path), "kind": meta["kind"], "step": meta["step"], "weights": "raw" if raw else "ema",
            **record}


def cmd_eval(args) -> int:
    result = evaluate_checkpoint(args.checkpoint, args.data, args.val_data, args.raw)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
