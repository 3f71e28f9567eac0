"""What a training run reports: per-step values -> a window on the device -> one record per log step.

    window = Window(device)
    window.add(loss, grad_norm, parts, buckets, tokens, world, wait_s, flops_per_token)  # every step, no sync
    record = window.record(lr, epoch, peak_tflops(cfg.log.peak_tflops, device), d)  # one all-reduce
    metrics.write(step, record)                                                # RUN/metrics.jsonl (+ TB)

A record holds the loss overall and per bucket (mean over that bucket's steps of the window), the
task's loss parts, grad norm, lr, tokens/s (all ranks), step time, loader wait (seconds per step and
fraction of the window), epoch, TFLOP/s per device and MFU (tasks with a FLOP counter: the DiT), and
peak GPU memory. RUN/tensorboard gets the same scalars when the tensorboard package is installed, and
the sample videos drawn during training (`Metrics.video`: an animated GIF image summary, what
TensorBoard's own add_video writes, made with Pillow instead of moviepy).
Values stay on the device between log steps so that a step never waits for a GPU -> CPU copy.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from training.parallel import Dist

log = logging.getLogger(__name__)

# Dense bf16 peak TFLOP/s of one device (no sparsity), matched against torch.cuda.get_device_name.
PEAK_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "A10G": 70.0, "RTX 4090": 165.0}


def peak_tflops(configured: float | None, device: torch.device) -> float | None:
    """Peak bf16 TFLOP/s of one device for MFU: the configured figure, else by GPU name; None on CPU."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


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

    def video(self, tag: str, video: torch.Tensor, fps: float, step: int) -> None:
        """A [3, F, H, W] video in [-1, 1] to TensorBoard's image tab as an animated GIF (no-op without TB)."""
        if self.tb is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        gif, (h, w) = _gif(video, fps), video.shape[-2:]
        image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
        self.tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _gif(video: torch.Tensor, fps: float) -> bytes:
    import io

    from PIL import Image

    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def reduce_mean(values: dict[str, torch.Tensor], d: Dist) -> dict[str, float]:
    """Mean over ranks of scalar tensors with the same keys on every rank (one all-reduce)."""
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].float() for k in keys])
    if d.enabled:
        dist.all_reduce(stacked)
        stacked /= d.world_size
    return dict(zip(keys, stacked.tolist()))


class Window:
    """The steps since the last log step: sums of tensors on the device, counters on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = defaultdict(float)
        self.has_flops = False
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, parts: dict, buckets: list[tuple[str, torch.Tensor]],
            tokens: float, world_size: int, wait_s: float, flops_per_token: float | None) -> None:
        """One optimizer step; `buckets` (bucket, loss) of each of its batches (several under
        gradient accumulation); `tokens` are this rank's, `flops_per_token` None for a task without a
        FLOP counter."""
        per_bucket: dict = {}
        for bucket, value in buckets:
            per_bucket[f"loss/{bucket}"] = per_bucket.get(f"loss/{bucket}", 0) + value.detach()
            per_bucket[f"steps/{bucket}"] = per_bucket.get(f"steps/{bucket}", 0) + torch.ones((), device=self.device)
        for key, value in {"loss": loss.detach(), "grad_norm": grad_norm, **parts, **per_bucket}.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        self.counts["steps"] += 1
        self.counts["tokens"] += tokens * world_size
        self.counts["wait_s"] += wait_s
        self.counts["flops"] += (flops_per_token or 0.0) * tokens
        self.has_flops = flops_per_token is not None

    def record(self, lr: float, epoch: int, peak: float | None, d: Dist) -> dict:
        """The window's record (a collective: every rank calls it at the same step)."""
        seconds = time.perf_counter() - self.t0
        steps = self.counts["steps"]
        record = _means(reduce_mean(self.sums, d), steps)
        record.update({
            "lr": lr,
            "tokens_per_s": self.counts["tokens"] / seconds,
            "step_s": seconds / steps,
            "loader_wait_s": self.counts["wait_s"] / steps,
            "loader_wait_fraction": self.counts["wait_s"] / seconds,
            "epoch": epoch,
        })
        if self.has_flops:
            tflops = self.counts["flops"] / seconds / 1e12  # per device (every rank did the same work)
            record["tflops_per_device"] = tflops
            record["mfu"] = tflops / peak if peak else None
        if torch.cuda.is_available():
            record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return record


def _means(reduced: dict[str, float], steps: float) -> dict:
    """Per-step means; loss/<bucket> over the steps of that bucket only."""
    record: dict = {}
    for key, value in reduced.items():
        if key.startswith("steps/"):
            continue
        if key.startswith("loss/"):
            record[key] = value / reduced["steps/" + key[len("loss/"):]]
        else:
            record[key] = value / steps
    return record
