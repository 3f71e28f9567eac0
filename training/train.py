"""`spacetime train dit|vae`: the training loop (one process, or every rank under torchrun).

    run_train("dit", load_config(TrainConfig, "configs/train/tiny.yaml"), data_dir="out", run_dir="runs/a")
    torchrun --nproc-per-node 8 -m spacetime train dit --config configs/train/dit_xl.yaml --data OUT --output RUN

One step (kind dit): a bucket-homogeneous batch from the loader -> latents from the frozen VAE
(computed on the fly) and text embeddings from the frozen text encoder -> rectified-flow loss of the
DiT (training.flow) -> AdamW step with warm-up and gradient clipping -> EMA update. Kind vae: the
VideoVAE itself learns reconstruction + KL (+ perceptual when its weights are configured) and is
exported to RUN/vae (config.json + model.safetensors) at every checkpoint, ready for `vae.path`.

Rerunning the same command on an existing RUN resumes from its newest checkpoint (model, EMA,
optimizer, scheduler, loader position and RNG): on the same world size on CPU the result is
bitwise the one of an uninterrupted run (tests/test_train.py kills a run with SIGKILL to check).

RUN/ holds config.yaml (resolved config), checkpoints/ (training.checkpoint), metrics.jsonl (one
JSON record per log step: loss overall and per bucket, lr, grad norm, tokens/s, TFLOP/s, MFU,
loader wait), tensorboard/ (the same scalars, when the tensorboard package is installed; it is
not in this project's environment) and vae/ (the VAE the run trained or, for a DiT run on an
UNTRAINED VAE, that VAE, so samples decode with the same weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict, deque
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from spacetime.config import ConfigError, dump_config, load_config
from training.checkpoint import latest_checkpoint, load_checkpoint, remove_stale, save_checkpoint
from training.dit import DiT, flops_per_token, num_params
from training.flow import EMA, flow_loss
from training.parallel import Dist, autocast_dtype, init_distributed, parallelize
from training.train_config import TrainConfig
from training.vae import PerceptualLoss, VideoVAE, kl_loss, load_diffusers_vae, load_vae, save_vae

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s of one device (no sparsity), matched against torch.cuda.get_device_name.
PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VAE_DIR = "vae"
UNTRAINED_NOTE = "UNTRAINED random VAE (vae.untrained: true): its latents are meaningless; smoke runs and tests only"


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """Peak bf16 TFLOP/s of one device for MFU: the configured figure, else by GPU name; None on CPU."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------- metrics
class Metrics:
    """RUN/metrics.jsonl always; RUN/tensorboard too when the tensorboard package is installed."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool):
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.jsonl", None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written by a run killed after its last checkpoint)."""
        if self.enabled and self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
            self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# -------------------------------------------------------------------------------------- models
def load_text_encoder_from(cfg: TrainConfig, device: torch.device):
    """(tokenizer, frozen encoder, embedding dim) from text_encoder.path (tiny: references resolved)."""
    from spacetime.models import resolve
    from training.text_encoder import load_text_encoder

    dtype = cfg.text_encoder.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer, model = load_text_encoder(resolve(cfg.text_encoder.path), dtype=dtype, device=str(device))
    dim = getattr(model.config, "d_model", None) or model.config.hidden_size
    return tokenizer, model, int(dim)


def build_vae(cfg: TrainConfig, run_dir: Path, d: Dist, trainable: bool) -> tuple[torch.nn.Module, dict]:
    """The VAE of a run and its reference for meta.json. Frozen (DiT runs) or trainable (VAE runs:
    vae.path, if given, holds the initial weights)."""
    v = cfg.vae
    if v.source == "diffusers":
        if trainable:
            raise ConfigError("vae.source diffusers: training a diffusers VAE is not supported")
        return load_diffusers_vae(v.path), {"source": "diffusers", "path": v.path}
    if v.path:
        from spacetime.models import resolve

        path = str(Path(resolve(v.path)).expanduser().resolve())
        vae = load_vae(path, v.arch)
        return vae, {"source": "spacetime", "path": path}
    if not (v.untrained or trainable):
        raise ConfigError("vae.path is not set: give the folder a `spacetime train vae` run wrote (RUN/vae), "
                          "or set vae.untrained: true for an UNTRAINED random VAE (smoke runs and tests only)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(v.init_seed)
        vae = VideoVAE(v.arch)
    if not trainable:
        log.warning("DiT training on an %s", UNTRAINED_NOTE)
        if d.is_main and not (run_dir / VAE_DIR / "model.safetensors").exists():
            save_vae(vae, run_dir / VAE_DIR, note=UNTRAINED_NOTE)
    return vae, {"source": "spacetime", "path": str((run_dir / VAE_DIR).resolve()), "run_relative": VAE_DIR,
                 "untrained": not trainable}


def sync_loader(cfg: TrainConfig, temporal: int, spatial: int, patch: tuple[int, int, int]) -> TrainConfig:
    """The loader's token math must use the models' compression and patch: copy them in, or refuse a
    config that set them to other values."""
    loader = cfg.loader
    want = {"vae_temporal": temporal, "vae_spatial": spatial, "patch": tuple(patch)}
    for key, value in want.items():
        got = getattr(loader, key)
        got = tuple(got) if isinstance(got, (list, tuple)) else got
        if key in loader.model_fields_set and got != value:
            raise ConfigError(f"loader.{key} = {got} but the models use {value}: remove loader.{key} "
                              "(it follows the VAE / DiT) or make them agree")
    return cfg.model_copy(update={"loader": loader.model_copy(update=want)})


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW (weight decay on matrices only) and a LambdaLR: linear warm-up, then constant or cosine.
    The schedule depends on `steps` (not --max-steps), so stopping and resuming does not change it."""
    o = cfg.optim
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    fused = o.fused if o.fused is not None else device.type == "cuda"
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=o.lr, betas=o.betas, eps=o.eps, fused=fused)
    total = o.decay_steps or max(1, cfg.steps - o.warmup_steps)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / total)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------- tasks
class DiTTask:
    """Loss of a DiT step: frozen VAE latents + frozen text embeddings -> rectified flow."""

    kind = "dit"

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist):
        self.cfg, self.d = cfg, d
        self.tokenizer, self.text_encoder, text_dim = load_text_encoder_from(cfg, d.device)
        self.vae, self.vae_ref = build_vae(cfg, run_dir, d, trainable=False)
        vae_dtype = cfg.vae.dtype if cfg.vae.dtype != "auto" else (
            "bfloat16" if d.device.type == "cuda" else "float32")
        self.vae_dtype = _DTYPES[vae_dtype]
        self.vae = self.vae.to(d.device, self.vae_dtype).eval().requires_grad_(False)
        if cfg.loader.caption_dropout == 0:
            log.warning("loader.caption_dropout is 0: the model never sees the empty caption, so classifier-"
                        "free guidance at sampling has no unconditional model to push away from")
        self.model = DiT(cfg.dit, in_channels=self.vae.latent_channels, text_dim=text_dim)
        self.model_args = {"dit": cfg.dit.model_dump(mode="json"), "in_channels": self.vae.latent_channels,
                           "text_dim": text_dim}
        self.compression = (self.vae.temporal_compression, self.vae.spatial_compression)
        self.patch = tuple(cfg.dit.patch)

    def meta(self) -> dict:
        return {"kind": self.kind, "model_args": self.model_args, "vae": self.vae_ref,
                "text_encoder": self.cfg.text_encoder.model_dump(mode="json"),
                "flow": self.cfg.flow.model_dump(mode="json")}

    def tokens(self, latent_shape) -> int:
        return math.prod(math.ceil(n / p) for n, p in zip(latent_shape[2:], self.patch))

    def flops(self, tokens: int) -> float:
        a = self.model_args
        return flops_per_token(self.cfg.dit, a["in_channels"], a["text_dim"], tokens, self.cfg.text_encoder.max_length)

    def loss(self, forward_model, batch: dict, generator: torch.Generator, amp) -> tuple[torch.Tensor, dict, int]:
        from training.text_encoder import encode_text

        video = batch["video"].to(self.d.device, self.vae_dtype, non_blocking=True)  # [B, 3, T, H, W]
        with torch.no_grad():
            x0 = self.vae.encode(video, sample=self.cfg.vae.sample_posterior, generator=generator).float()
        text, mask = encode_text(self.tokenizer, self.text_encoder, batch["caption"], self.cfg.text_encoder.max_length)
        text, mask = text.to(self.d.device).clone(), mask.to(self.d.device).clone()  # out of inference mode
        tokens = self.tokens(x0.shape)  # latent patches per sample
        with amp:
            per_sample = flow_loss(forward_model, x0, text, mask, tokens, self.cfg.flow, generator)
        loss = per_sample.mean()
        return loss, {}, tokens * x0.shape[0]


class VAETask:
    """Loss of a VAE step: reconstruction + KL (+ perceptual), and latent statistics for export."""

    kind = "vae"

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist):
        self.cfg, self.d = cfg, d
        self.model, ref = build_vae(cfg, run_dir, d, trainable=True)
        self.init_ref = ref if cfg.vae.path else None
        self.perceptual = None
        if cfg.vae_loss.perceptual_weight > 0:
            from spacetime.models import resolve

            self.perceptual = PerceptualLoss(resolve(cfg.vae_loss.perceptual_weights)).to(d.device)
            log.info("perceptual term on (weight %s, VGG16 weights %s)", cfg.vae_loss.perceptual_weight,
                     cfg.vae_loss.perceptual_weights)
        self.compression = (self.model.temporal_compression, self.model.spatial_compression)
        self.patch = tuple(cfg.loader.patch)
        self.model_args = {"arch": self.model.arch.model_dump(mode="json")}
        self.latent_stats: deque = deque(maxlen=cfg.vae_loss.stats_steps)  # (mean, mean of squares) per step

    def meta(self) -> dict:
        return {"kind": self.kind, "model_args": self.model_args, "vae_init": self.init_ref}

    def flops(self, tokens: int) -> float | None:
        return None  # no FLOP counter for the VAE: MFU is reported for the DiT only

    def loss(self, forward_model, batch: dict, generator: torch.Generator, amp) -> tuple[torch.Tensor, dict, int]:
        lc = self.cfg.vae_loss
        video = batch["video"].to(self.d.device, non_blocking=True)
        target = self.model.trim(video)  # the frames the encoder uses
        with amp:
            recon, mean, logvar = forward_model(video, generator=generator)
        diff = recon.float() - target.float()
        rec = diff.abs().mean() if lc.recon == "l1" else diff.square().mean()
        kl = kl_loss(mean, logvar)
        parts = {"recon": rec.detach(), "kl": kl.detach(), "mse": diff.detach().square().mean()}
        loss = rec + lc.kl_weight * kl
        if self.perceptual is not None:
            with amp:
                perc = self.perceptual(recon.float(), target.float()).float()
            loss = loss + lc.perceptual_weight * perc
            parts["perceptual"] = perc.detach()
        m = mean.detach().float()
        self.latent_stats.append(torch.stack([m.mean(), m.square().mean()]))
        tokens = math.prod(math.ceil(n / p) for n, p in zip(mean.shape[2:], self.patch))
        return loss, parts, tokens * mean.shape[0]

    def export(self, run_dir: Path, model_state: dict | None) -> None:
        """Write RUN/vae with the current weights and latent normalisation (rank 0 passes the state)."""
        stats = torch.stack(list(self.latent_stats)).mean(0)
        if self.d.enabled:
            dist.all_reduce(stats)
            stats /= self.d.world_size
        if model_state is None:
            return
        mean, sq = float(stats[0]), float(stats[1])
        std = math.sqrt(max(sq - mean * mean, 1e-12))
        arch = self.model.arch.model_copy(update={"scaling_factor": 1.0 / std, "shift_factor": mean})
        vae = VideoVAE(arch)
        vae.load_state_dict(model_state)
        save_vae(vae, run_dir / VAE_DIR, note=f"trained by spacetime train vae ({run_dir})")

    def state(self) -> dict:
        return {"latent_stats": [t.cpu() for t in self.latent_stats]}

    def load_state(self, state: dict) -> None:
        self.latent_stats.clear()
        self.latent_stats.extend(t.to(self.d.device) for t in state.get("latent_stats", []))


# ------------------------------------------------------------------------------------------ run
def _reduce(values: dict[str, torch.Tensor], d: Dist) -> dict[str, float]:
    """Mean over ranks of scalar tensors with the same keys on every rank (one all-reduce)."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].float() for k in keys])
    if d.enabled:
        dist.all_reduce(stacked)
        stacked /= d.world_size
    return dict(zip(keys, stacked.tolist()))


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path, d: Dist) -> None:
    if not d.is_main:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(run_dir)
    text = dump_config(cfg)
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != text:
        log.warning("%s differs from this run's config; the checkpoint's state wins, the new config is "
                    "used from here (see %s.previous)", path, path.name)
        path.replace(run_dir / "config.yaml.previous")
    path.write_text(text)


def run_train(kind: Literal["dit", "vae"], cfg: TrainConfig, data_dir: str | Path | list | None = None,
              run_dir: str | Path = "run", max_steps: int | None = None) -> dict:
    """Train a DiT or a VAE to step `max_steps` (default cfg.steps), resuming from RUN's newest
    checkpoint if there is one. Under torchrun (WORLD_SIZE > 1) joins the process group itself.
    Returns {"step", "resumed_from", "checkpoint", "metrics" (the last record), "run_dir"}."""
    if kind not in ("dit", "vae"):
        raise ValueError(f"kind {kind!r}: expected 'dit' or 'vae'")
    if data_dir is not None:
        data = [str(x) for x in data_dir] if isinstance(data_dir, (list, tuple)) else [str(data_dir)]
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"data": data})})
    run_dir = Path(run_dir).expanduser()
    max_steps = max_steps or cfg.steps
    d = init_distributed(cfg.parallel)
    if not d.is_main:
        logging.getLogger("training").setLevel(logging.WARNING)
    try:
        return _train(kind, cfg, run_dir, max_steps, d)
    finally:
        if d.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(kind: str, cfg: TrainConfig, run_dir: Path, max_steps: int, d: Dist) -> dict:
    from tqdm import tqdm

    from training.loader import BucketLoader

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    task = DiTTask(cfg, run_dir, d) if kind == "dit" else VAETask(cfg, run_dir, d)
    cfg = sync_loader(cfg, *task.compression, task.patch)
    _prepare_run_dir(cfg, run_dir, d)
    model = task.model.to(d.device)
    log.info("%s: %.2fM trainable parameters, %d process(es), parallel %s, device %s", kind,
             num_params(model) / 1e6, d.world_size, cfg.parallel.mode, d.device)
    forward_model = parallelize(model, cfg.parallel, d)
    optimizer, scheduler = build_optimizer(model, cfg, d.device)
    ema = EMA(model, cfg.ema.decay)
    generator = torch.Generator(device=d.device)
    generator.manual_seed(cfg.seed * 1_000_003 + d.rank)
    amp_dtype = autocast_dtype(cfg.parallel, d.device)
    amp = torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    loader = BucketLoader(cfg.loader, d.rank, d.world_size)
    metrics = Metrics(run_dir, cfg.log.tensorboard, d.is_main)
    step, resumed_from = 0, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        trainer = load_checkpoint(ckpt, model, optimizer, scheduler, ema, generator, d)
        step = resumed_from = trainer["step"]
        loader.load_state_dict(trainer["loader"])
        if isinstance(task, VAETask):
            task.load_state(trainer["extra"])
        metrics.truncate_after(step)
        log.info("resumed from %s (step %d)", ckpt, step)

    peak = peak_tflops(cfg.log.peak_tflops, d.device)
    meta = {**task.meta(), "config": cfg.model_dump(mode="json")}
    window: dict = defaultdict(float)
    sums: dict[str, torch.Tensor] = {}
    last, last_ckpt = {}, ckpt
    bar = tqdm(total=max_steps, initial=step, desc=f"train {kind}", unit="step", dynamic_ncols=True,
               disable=True if not (d.is_main and cfg.log.progress) else None)
    batches = iter(loader)
    t_window = time.perf_counter()
    try:
        while step < max_steps:
            batch = next(batches)
            loss, parts, tokens = task.loss(forward_model, batch, generator, amp)
            loss.backward()
            grad_norm = _clip(model, cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()
            step += 1
            bar.update(1)

            # accumulate on device (no sync) until the next log step
            bucket = batch["bucket"]
            for key, value in {"loss": loss.detach(), "grad_norm": grad_norm, **parts,
                               f"loss/{bucket}": loss.detach(), f"steps/{bucket}": torch.ones((), device=d.device)
                               }.items():
                sums[key] = sums.get(key, 0) + value.float()
            window["steps"] += 1
            window["tokens"] += tokens * d.world_size
            window["wait_s"] += batch["stats"]["wait_s"]
            flops = task.flops(tokens // len(batch["caption"]))
            window["flops"] += (flops or 0.0) * tokens

            if step % cfg.log.every == 0 or step == max_steps:
                last = _log_record(sums, window, time.perf_counter() - t_window, scheduler, loader, peak, d,
                                   has_flops=flops is not None)
                metrics.write(step, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
                if d.is_main:
                    log.info("step %d/%d %s", step, max_steps, " ".join(
                        f"{k} {v:.4g}" for k, v in last.items() if "/" not in k and isinstance(v, float)))
                sums, window, t_window = {}, defaultdict(float), time.perf_counter()
            if step % cfg.checkpoint.every == 0 or step == max_steps:
                extra = task.state() if isinstance(task, VAETask) else None
                last_ckpt = save_checkpoint(run_dir, step, model, optimizer, scheduler, ema, loader.state_dict(),
                                            generator, meta, d, keep=cfg.checkpoint.keep, extra=extra)
                if isinstance(task, VAETask):
                    _export_vae(task, model, run_dir, d)
    finally:
        batches.close()  # stops the loader's workers
        bar.close()
        metrics.close()
    return {"step": step, "resumed_from": resumed_from, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "metrics": last, "run_dir": str(run_dir)}


def _clip(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"), foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _log_record(sums: dict, window: dict, seconds: float, scheduler, loader, peak: float | None, d: Dist,
                has_flops: bool) -> dict:
    steps = window["steps"]
    reduced = _reduce(sums, d)
    record: dict = {}
    for key, value in reduced.items():
        if key.startswith("steps/"):
            continue
        if key.startswith("loss/"):  # per-bucket mean over the steps of that bucket
            record[key] = value / reduced["steps/" + key[len("loss/"):]]
        else:
            record[key] = value / steps
    tflops = window["flops"] / seconds / 1e12  # per device (every rank did the same work)
    record.update({
        "lr": scheduler.get_last_lr()[0],
        "tokens_per_s": window["tokens"] / seconds,
        "step_s": seconds / steps,
        "loader_wait_s": window["wait_s"] / steps,
        "loader_wait_fraction": window["wait_s"] / seconds,
        "epoch": loader.state.epoch,
    })
    if has_flops:
        record["tflops_per_device"] = tflops
        record["mfu"] = tflops / peak if peak else None
    if torch.cuda.is_available():
        record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


def _export_vae(task: VAETask, model: torch.nn.Module, run_dir: Path, d: Dist) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    task.export(run_dir, state if d.is_main else None)


# ------------------------------------------------------------------------------------------ CLI
from training.cli_args import add_train_args  # noqa: E402,F401 (torch-free, for the CLI)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.output is None:
        raise ConfigError("spacetime train: give --output RUN")
    summary = run_train(args.kind, cfg, args.data, args.output, args.max_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        m = summary["metrics"]
        loss = f", loss {m['loss']:.4f}" if "loss" in m else ""
        print(f"trained {args.kind} to step {summary['step']}{loss} -> {summary['checkpoint']}")
    return 0


def main_train(argv: list[str] | None = None) -> int:
    """`python -m training.train dit|vae --config FILE --data OUT --output RUN [--max-steps N] [--set k=v]`."""
    parser = argparse.ArgumentParser(prog="spacetime train", description=__doc__.split("\n\n")[0])
    add_train_args(parser)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parent.parent / "configs/train/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return cmd_train(args)
    except ConfigError as err:
        print(f"spacetime train: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main_train())
