"""How much GPU memory a DiT step takes, and how many ranks (parallel.context) one sample needs.

    est = step_memory(dit_cfg, params, tokens, batch, context=1, shards=8, checkpointing=True)
    n = context_needed(dit_cfg, params, tokens, batch, capacity_bytes, shards=8, checkpointing=True)
    spacetime train plan --config configs/train/dit_xl.yaml --data OUT --gpu-memory-gib 141 --world 8

The model (bytes per rank):
    state        params x (16 + 4): fp32 weights, gradients, AdamW's two moments, the fp32 EMA;
                 divided by `shards` under FSDP2 (1 under DDP)
    activations  tokens / context x batch x per-token bytes, where per token
                 without activation checkpointing: depth x ACT_PER_BLOCK x hidden
                 with it:    depth x KEPT_PER_BLOCK x hidden  (each block's saved input)
                             + RECOMPUTE x hidden              (the block being recomputed)
The constants are calibrated on the measurements of issue #14 (one H200, bf16 autocast, DiT-XL:
hidden 1152, depth 28, 829M parameters, 28,160 tokens, batch 1, no EMA): 88.3 GiB peak without
checkpointing, 15.5 GiB with it, so 89.8 h bytes per token and block without, 2 h + 48 h with.
Attention is SDPA (flash / memory-efficient): no term grows with tokens^2. The frozen VAE and text
encoder are not counted (train from a latent cache, or leave room for them with `reserve`).
A planner's estimate, not a guarantee: it is within the measured points' error there and is
checked against a CUDA peak only where a GPU was lent (see the issue notes).
"""

from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass

from training.dit import DiTConfig

STATE_BYTES_PER_PARAM = 20
ACT_PER_BLOCK = 89.8  # x hidden bytes per token and block, no activation checkpointing
KEPT_PER_BLOCK = 2.0  # x hidden: a checkpointed block's saved (bf16) input
RECOMPUTE = 48.3  # x hidden: the one block recomputed in backward (and its gradients)
HEADROOM = 0.9  # of the device's memory: allocator fragmentation, NCCL buffers, the CUDA context


def activation_bytes_per_token(cfg: DiTConfig, checkpointing: bool | int) -> float:
    """Per token: `checkpointing` True (every block), False (none) or the number of blocks checkpointed."""
    k = cfg.depth if checkpointing is True else int(checkpointing)
    k = min(max(k, 0), cfg.depth)
    return ((cfg.depth - k) * ACT_PER_BLOCK + k * KEPT_PER_BLOCK + (RECOMPUTE if k else 0.0)) * cfg.hidden


@dataclass
class StepMemory:
    state: float  # bytes
    activations: float

    @property
    def total(self) -> float:
        return self.state + self.activations


def step_memory(cfg: DiTConfig, params: int, tokens: int, batch: int, context: int = 1, shards: int = 1,
                checkpointing: bool | int = False) -> StepMemory:
    """Estimated peak bytes per rank of one training step (module docstring)."""
    local = math.ceil(tokens / context) * batch
    return StepMemory(state=params * STATE_BYTES_PER_PARAM / shards,
                      activations=local * activation_bytes_per_token(cfg, checkpointing))


def context_candidates(cfg: DiTConfig, limit: int = 1024) -> list[int]:
    """Context sizes Ulysses allows: the divisors of the head count (up to `limit`)."""
    return [n for n in range(1, min(cfg.heads, limit) + 1) if cfg.heads % n == 0]


def context_needed(cfg: DiTConfig, params: int, tokens: int, batch: int, capacity: float, shards: int = 1,
                   checkpointing: bool = False, reserve: float = 0.0) -> int | None:
    """The smallest context size whose step fits `capacity` bytes (x HEADROOM, minus `reserve`);
    None when even the largest (all heads) does not."""
    budget = capacity * HEADROOM - reserve
    for n in context_candidates(cfg):
        if step_memory(cfg, params, tokens, batch, n, shards, checkpointing).total <= budget:
            return n
    return None


def blocks_to_checkpoint(cfg: DiTConfig, params: int, tokens: int, batch: int, capacity: float, context: int = 1,
                         shards: int = 1, reserve: float = 0.0) -> int:
    """Partial activation checkpointing: the fewest blocks to recompute so that a step of `tokens` x
    `batch` (per rank: / context) fits `capacity` (x HEADROOM, minus `reserve`); every block when
    even that does not fit (the start-of-run warning says so). Recomputing a block costs about a
    third of its training FLOPs, so recomputing only what memory needs is the cheap end."""
    budget = capacity * HEADROOM - reserve
    for k in range(cfg.depth + 1):
        if step_memory(cfg, params, tokens, batch, context, shards, k).total <= budget:
            return k
    return cfg.depth


# ------------------------------------------------------------------------------------- planning
def checkpoint_blocks(cfg, specs, params: int, capacity: float, world: int) -> int:
    """Blocks to recompute for the run (parallel.activation_checkpointing: true -> all, false -> 0,
    auto -> what its largest bucket needs at its parallel.context)."""
    p = cfg.parallel
    if p.activation_checkpointing != "auto":
        return cfg.dit.depth if p.activation_checkpointing else 0
    shards = world if p.mode == "fsdp" else 1
    return max((blocks_to_checkpoint(cfg.dit, params, s.tokens, s.batch, capacity, p.context, shards) for s in specs),
               default=0)


def bucket_plan(cfg, specs, params: int, capacity: float, world: int) -> list[dict]:
    """Per bucket of the loader's plan (training.data.index.BucketSpec): tokens, batch, the blocks
    recomputed, estimated GiB per rank at the configured context, and the context size it needs
    (with checkpointing as configured; auto counts as every block) and with the alternative."""
    p = cfg.parallel
    shards = world if p.mode == "fsdp" else 1
    k = checkpoint_blocks(cfg, specs, params, capacity, world)
    ac = True if p.activation_checkpointing == "auto" else bool(p.activation_checkpointing)
    rows = []
    for s in specs:
        est = step_memory(cfg.dit, params, s.tokens, s.batch, p.context, shards, k)
        rows.append({"bucket": s.name, "tokens": s.tokens, "batch": s.batch, "gib": est.total / 2**30,
                     "checkpointed": k,
                     "context": context_needed(cfg.dit, params, s.tokens, s.batch, capacity, shards, ac),
                     "context_other_ac": context_needed(cfg.dit, params, s.tokens, s.batch, capacity, shards, not ac)})
    return rows


def warn_if_too_big(cfg, specs, params: int, capacity: float, world: int, log) -> None:
    """At the start of a DiT run on GPUs: a warning for every bucket the planner says will not fit."""
    for row in bucket_plan(cfg, specs, params, capacity, world):
        if row["context"] is None or row["context"] > cfg.parallel.context:
            need = "more than the heads allow" if row["context"] is None else f"parallel.context >= {row['context']}"
            log.warning("bucket %s (%d tokens x %d per rank) needs an estimated %.1f GiB per rank at parallel.context "
                        "%d, over this GPU's %.0f GiB: expect out-of-memory; it needs %s (spacetime train plan)",
                        row["bucket"], row["tokens"], row["batch"], row["gib"], cfg.parallel.context,
                        capacity / 2**30, need)


def cmd_plan(args) -> int:
    """`spacetime train plan`: the bucket table with memory estimates and context sizes."""
    import os

    import torch

    from spacetime.config import load_config
    from training.cache import training_cache
    from training.data.index import bucket_specs, read_index
    from training.dit import DiT, num_params
    from training.parallel import Dist
    from training.tasks import build_vae, sync_loader
    from training.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.data:
        cfg = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"data": [str(x) for x in args.data]})})
    world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
    if args.gpu_memory_gib:
        capacity = args.gpu_memory_gib * 2**30
    elif torch.cuda.is_available():
        capacity = torch.cuda.get_device_properties(0).total_memory
    else:
        raise SystemExit("spacetime train plan: no GPU here; give --gpu-memory-gib (e.g. 141 for an H200)")
    cache = training_cache(cfg)
    d = Dist(0, 1, 0, torch.device("cpu"), False)
    vae, _ = build_vae(cfg, Path("."), d, trainable=False, save_untrained=False)
    if cache is not None:
        text_dim = int(cache["text_dim"])
    else:
        from transformers import AutoConfig

        from spacetime.models import resolve

        tc = AutoConfig.from_pretrained(resolve(cfg.text_encoder.path))
        text_dim = int(getattr(tc, "d_model", None) or tc.hidden_size)
    cfg = sync_loader(cfg, vae.temporal_compression, vae.spatial_compression, tuple(cfg.dit.patch))
    with torch.device("meta"):
        params = num_params(DiT(cfg.dit, in_channels=vae.latent_channels, text_dim=text_dim))
    specs = bucket_specs(read_index(cfg.loader.data, cfg.loader.s3), cfg.loader)
    p = cfg.parallel
    k = checkpoint_blocks(cfg, specs, params, capacity, world)
    print(f"DiT {params / 1e6:.0f}M parameters; {world} rank(s), {p.mode}, activation checkpointing "
          f"{p.activation_checkpointing} ({k} of {cfg.dit.depth} blocks recomputed), parallel.context {p.context}; "
          f"{capacity / 2**30:.0f} GiB per GPU ({HEADROOM:.0%} usable). Estimates: training/memory.py")
    print(f"{'bucket':22s} {'tokens':>9s} {'batch':>5s} {'GiB/rank':>9s} {'needs context':>13s} "
          f"{'(AC ' + ('off' if p.activation_checkpointing else 'on') + ')':>9s}")
    for r in bucket_plan(cfg, specs, params, capacity, world):
        need = "-" if r["context"] is None else str(r["context"])
        other = "-" if r["context_other_ac"] is None else str(r["context_other_ac"])
        print(f"{r['bucket']:22s} {r['tokens']:9d} {r['batch']:5d} {r['gib']:9.1f} {need:>13s} {other:>9s}")
    return 0
