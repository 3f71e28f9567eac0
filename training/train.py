"""`spacetime train dit|vae`: the training loop (one process, or every rank under torchrun).

    run_train("dit", load_config(TrainConfig, "configs/train/tiny.yaml"), data_dir="out", run_dir="runs/a")
    torchrun --nproc-per-node 8 -m spacetime train dit --config configs/train/dit_xl.yaml --data OUT --output RUN
    spacetime train dit --config configs/train/tiny.yaml --data OUT --output RUN

One step, for every kind: `optim.grad_accum` bucket-homogeneous batches from the loader
(training.data) -> for each, the task's loss (training.tasks: rectified flow of the DiT on frozen VAE
latents and text embeddings, or the VAE's own reconstruction + KL) / grad_accum -> backward
(gradients synchronised across ranks on the last batch only) -> gradient clipping and AdamW with warm-up
(training.optim) -> EMA update -> values into the metrics window (training.metrics). Every
`log.every` steps the window becomes one record; every `checkpoint.every` steps a checkpoint is
written (training.checkpoint) and the task's checkpoint hook runs (the VAE task exports RUN/vae).
With held-out data (`eval.fraction` of the sources, or `eval.data`), the loader never reads it, and
every `eval.every` steps (and at step 0 and the last step) the EMA weights are validated on it
(training.validate): a record of its own in metrics.jsonl, and a log line. A DiT run draws sample
videos from its checkpoints every `eval.sample_every` steps, a VAE run writes held-out clips beside
their reconstructions (training.eval_samples: RUN/samples/).

Rerunning the same command on an existing RUN resumes from its newest checkpoint (model, EMA,
optimizer, scheduler, loader position, RNG and the task's extra state): on the same world size on
CPU the result is bitwise the one of an uninterrupted run (tests/test_train.py kills a run with
SIGKILL to check).

RUN/ holds config.yaml (resolved config), checkpoints/ (training.checkpoint), metrics.jsonl (one
JSON record per log step: loss overall and per bucket, lr, grad norm, tokens/s, TFLOP/s, MFU,
loader wait; and one per evaluation: val_loss overall, per timestep quantile and per bucket),
heldout.json (the held-out clips and sources, and those evaluated), samples/ (training.eval_samples),
tensorboard/ (the same scalars and the samples as animated images, with log.tensorboard) and vae/ (the VAE the run trained or, for a DiT run on an
UNTRAINED VAE, that VAE, so samples decode with the same weights).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from spacetime.config import ConfigError, dump_config, load_config
from training.checkpoint import latest_checkpoint, load_checkpoint, remove_stale, save_checkpoint
from training.dit import num_params
from training.eval_samples import write_reconstructions, write_samples
from training.flow import EMA
from training.metrics import Metrics, Window, peak_tflops
from training.optim import build_optimizer, clip_grad_norm
from training.parallel import Dist, autocast_dtype, init_distributed, parallelize
from training.tasks import Task, build_task, sync_loader
from training.train_config import TrainConfig
from training.validate import ValSet, ema_weights, validate, write_heldout

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ run
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


class _Trainer:
    """A task's model on the device with its parallel wrapper, optimiser, schedule, EMA, noise
    generator and autocast: everything a step and a checkpoint touch. Built in a fixed order after
    torch.manual_seed(cfg.seed), so every rank and every rerun starts from the same weights."""

    def __init__(self, task: Task, cfg: TrainConfig, d: Dist, checkpoint_units: int | None = None):
        self.task, self.cfg, self.d = task, cfg, d
        self.model = task.model.to(d.device)
        log.info("%s: %.2fM trainable parameters, %d process(es), parallel %s, device %s", task.kind,
                 num_params(self.model) / 1e6, d.world_size, cfg.parallel.mode, d.device)
        self.forward_model = parallelize(self.model, cfg.parallel, d, checkpoint_units)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg, d.device)
        self.ema = EMA(self.model, cfg.ema.decay)
        self.generator = torch.Generator(device=d.device)
        self.generator.manual_seed(cfg.seed * 1_000_003 + d.dp_rank)  # per-replica noise, reproducible
        amp_dtype = autocast_dtype(cfg.parallel, d.device)
        self.amp = torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def step(self, batches: list[dict]) -> tuple[torch.Tensor, dict, int, torch.Tensor, list[torch.Tensor]]:
        """One optimiser step on the mean loss of `batches` (gradient accumulation): (mean loss, mean
        loss parts, this rank's tokens, gradient norm, each batch's loss)."""
        n = len(batches)
        losses, parts_sum, tokens = [], {}, 0
        for i, batch in enumerate(batches):
            with self._gradient_sync(i == n - 1):
                loss, parts, t = self.task.loss(self.forward_model, batch, self.generator, self.amp)
                (loss / n if n > 1 else loss).backward()
            losses.append(loss.detach())
            tokens += t
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v / n
        loss = losses[0] if n == 1 else torch.stack(losses).mean()
        grad_norm = clip_grad_norm(self.model, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        return loss, parts_sum, tokens, grad_norm, losses

    def _gradient_sync(self, sync: bool):
        """Backward without the data-parallel gradient reduction unless `sync` (the last batch of an
        accumulated step): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(self.forward_model, DistributedDataParallel):
            return nullcontext() if sync else self.forward_model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return nullcontext()

    def resume(self, run_dir: Path, loader, metrics: Metrics) -> tuple[int, Path | None]:
        """Restore RUN's newest checkpoint, if any (collective): (its step or 0, its folder or None)."""
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            return 0, None
        trainer = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.ema, self.generator,
                                  self.d)
        loader.load_state_dict(trainer["loader"])
        self.task.load_state(trainer["extra"])
        metrics.truncate_after(trainer["step"])
        log.info("resumed from %s (step %d)", ckpt, trainer["step"])
        return trainer["step"], ckpt

    def checkpoint(self, run_dir: Path, step: int, loader, meta: dict) -> Path:
        """Write checkpoint `step`, then run the task's hook (both collectives)."""
        fmt = self.cfg.checkpoint.format
        sharded = fmt == "sharded" or (fmt == "auto" and self.cfg.parallel.mode == "fsdp" and self.d.enabled)
        path = save_checkpoint(run_dir, step, self.model, self.optimizer, self.scheduler, self.ema,
                               loader.state_dict(), self.generator, meta, self.d, keep=self.cfg.checkpoint.keep,
                               extra=self.task.state(), sharded=sharded)
        self.task.on_checkpoint(run_dir)
        return path


def _train(kind: str, cfg: TrainConfig, run_dir: Path, max_steps: int, d: Dist) -> dict:
    from tqdm import tqdm

    from training.data.index import index_path
    from training.data.loader import make_loader

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for root in cfg.loader.data:  # a wrong path fails here, not after the models have loaded
        index_path(root, cfg.loader.s3)
    task = build_task(kind, cfg, run_dir, d)
    cfg = sync_loader(cfg, *task.compression, task.patch)
    _prepare_run_dir(cfg, run_dir, d)
    # a context-parallel group reads one stream; held-out sources are never read for training
    loader = make_loader(cfg.loader, d.dp_rank, d.dp_size, holdout=cfg.eval.fraction)
    valset = ValSet(cfg) if cfg.eval.every or cfg.eval.sample_every else None
    if valset is not None:
        write_heldout(run_dir, valset, d)
        every = lambda n: f"every {n} steps" if n else "off"  # noqa: E731
        log.info("held out %d clips; validation %s (%d of them, %d tokens); samples %s", len(valset.samples),
                 every(cfg.eval.every), len(valset.items), valset.tokens, every(cfg.eval.sample_every))
    trainer = _Trainer(task, cfg, d, _plan_memory(kind, cfg, task, loader, d))
    metrics = Metrics(run_dir, cfg.log.tensorboard, d.is_main)
    step, last_ckpt = trainer.resume(run_dir, loader, metrics)
    resumed_from = step if last_ckpt is not None else None

    peak = peak_tflops(cfg.log.peak_tflops, d.device)
    meta = {**task.meta(), "config": cfg.model_dump(mode="json")}
    last: dict = {}
    bar = tqdm(total=max_steps, initial=step, desc=f"train {kind}", unit="step", dynamic_ncols=True,
               disable=True if not (d.is_main and cfg.log.progress) else None)
    val: dict = {}  # the last validation figure, repeated on each log line

    def evaluate() -> None:
        record = {}
        if cfg.eval.raw:
            record.update(validate(task, trainer.model, valset, cfg, d, trainer.amp, prefix="val_raw"))
        with ema_weights(trainer.model, trainer.ema):
            record.update(validate(task, trainer.model, valset, cfg, d, trainer.amp))
        metrics.write(step, record)
        main = next(k for k in record if "/" not in k and not k.endswith("_clips"))
        val.update(name=main, value=record[main])
        bar.set_postfix(val=f"{record[main]:.4f}", refresh=False)
        if d.is_main:
            log.info("step %d/%d validation: %s", step, max_steps, " ".join(
                f"{k} {v:.4g}" for k, v in record.items() if "/bucket/" not in k))

    batches = iter(loader)
    window = Window(d.device)
    started, first = time.perf_counter(), step  # for the ETA: this process's pace, evaluations included
    try:
        if cfg.eval.every and step == 0:
            evaluate()  # the untrained model's figure: what learning is measured against
        while step < max_steps:
            micro = [next(batches) for _ in range(cfg.optim.grad_accum)]
            loss, parts, tokens, grad_norm, losses = trainer.step(micro)
            step += 1
            bar.update(1)
            flops = _flops_per_token(task, micro)
            # this rank's share of the tokens: a context-parallel group splits its samples' tokens
            window.add(loss, grad_norm, parts, [(b["bucket"], x) for b, x in zip(micro, losses)], tokens / d.context,
                       d.world_size, sum(b["stats"]["wait_s"] for b in micro), flops)
            if step % cfg.log.every == 0 or step == max_steps:
                last = window.record(trainer.scheduler.get_last_lr()[0], loader.state.epoch, peak, d)
                eta = (time.perf_counter() - started) / (step - first) * (max_steps - step)
                _report(metrics, bar, step, max_steps, last, d, val, eta)
                window.reset()
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == max_steps):
                evaluate()
            if step % cfg.checkpoint.every == 0 or step == max_steps:
                last_ckpt = trainer.checkpoint(run_dir, step, loader, meta)
                if cfg.eval.sample_every and step % cfg.eval.sample_every == 0 and d.is_main:
                    show = lambda tag, video, fps: metrics.video(tag, video, fps, step)  # noqa: E731
                    if kind == "dit":
                        write_samples(last_ckpt, run_dir, step, cfg, valset, show=show)
                    else:
                        write_reconstructions(last_ckpt, run_dir, step, cfg, valset, d.device, show=show)
    finally:
        batches.close()  # stops the loader's workers
        bar.close()
        metrics.close()
    return {"step": step, "resumed_from": resumed_from, "checkpoint": str(last_ckpt) if last_ckpt else None,
            "metrics": last, "run_dir": str(run_dir)}


def _plan_memory(kind: str, cfg: TrainConfig, task: Task, loader, d: Dist) -> int | None:
    """On GPUs, for the DiT: the blocks activation_checkpointing "auto" recomputes (the same on every
    rank) and a warning for buckets that will not fit (training.memory). None elsewhere."""
    if kind != "dit" or d.device.type != "cuda":
        if cfg.parallel.activation_checkpointing == "auto":
            log.info("activation_checkpointing auto: no GPU memory to plan for, no block is recomputed")
        return None
    from training.memory import checkpoint_blocks, warn_if_too_big

    params, capacity = num_params(task.model), torch.cuda.get_device_properties(d.device).total_memory
    units = checkpoint_blocks(cfg, loader.specs, params, capacity, d.world_size)
    if cfg.parallel.activation_checkpointing == "auto":
        log.info("activation_checkpointing auto: %d of %d blocks recomputed (the largest bucket at parallel.context %d "
                 "on %.0f GiB)", units, cfg.dit.depth, cfg.parallel.context, capacity / 2**30)
    if d.is_main:
        warn_if_too_big(cfg, loader.specs, params, capacity, d.world_size, log)
    return units


def _flops_per_token(task: Task, batches: list[dict]) -> float | None:
    """Training FLOPs per token over a step's batches (each at its own sequence length)."""
    # each sample at its own length (a packed batch's samples differ: attention grows with each one's)
    counts = [(task.flops(n), n) for b in batches
              for n in b["stats"].get("sample_tokens") or [b["stats"]["tokens"] // b["stats"]["samples"]] * b["stats"]["samples"]]
    if counts[0][0] is None:
        return None
    return sum(f * t for f, t in counts) / sum(t for _, t in counts)


def _report(metrics: Metrics, bar, step: int, max_steps: int, record: dict, d: Dist, val: dict, eta: float) -> None:
    """The log step's record to metrics.jsonl; one console line: step, the loader's epoch, loss, the last
    validation figure, tokens/s, MFU and the rest of the scalars, and the ETA."""
    metrics.write(step, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    if d.is_main:
        scalars = {k: v for k, v in record.items() if "/" not in k and isinstance(v, float)}
        if val:
            scalars[val["name"]] = val["value"]
        first = [k for k in ("loss", val.get("name"), "tokens_per_s", "mfu") if k in scalars]
        line = " ".join(f"{k} {scalars[k]:.4g}" for k in first + sorted(scalars.keys() - set(first)))
        log.info("step %d/%d epoch %d %s eta %s", step, max_steps, record["epoch"], line, _duration(eta))


def _duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------------------ CLI
def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.kind == "cache":
        from training.cache import cmd_cache

        return cmd_cache(args)
    if args.kind == "plan":
        from training.memory import cmd_plan

        return cmd_plan(args)
    if args.rebuild:
        raise ConfigError("--rebuild is for `spacetime train cache`")
    if args.output is None:
        raise ConfigError("spacetime train: give --output RUN")
    summary = run_train(args.kind, cfg, args.data, args.output, args.max_steps)
    if int(os.environ.get("RANK", "0")) == 0:
        m = summary["metrics"]
        loss = f", loss {m['loss']:.4f}" if "loss" in m else ""
        print(f"trained {args.kind} to step {summary['step']}{loss} -> {summary['checkpoint']}")
    return 0
