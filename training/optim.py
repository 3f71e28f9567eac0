"""The optimiser side of a step: gradients -> clipped norm -> AdamW -> LR schedule.

    optimizer, scheduler = build_optimizer(model, cfg, device)
    loss.backward(); grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
    optimizer.step(); scheduler.step(); optimizer.zero_grad(set_to_none=True)

The schedule is a function of the step and `steps` / `optim.*` only, and its state is saved in
every checkpoint (training.checkpoint), so a stopped and resumed run follows the same curve.
"""

from __future__ import annotations

import math

import torch

from training.train_config import TrainConfig


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


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the gradients to `max_norm` (None: measure only) and return their total norm, a plain
    tensor also under FSDP2 (whose norm is a DTensor over the shards)."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"), foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
