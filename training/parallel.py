"""Process group set-up and parallelism applied to a model from outside (torchtitan style).

    dist = init_distributed(cfg.parallel)          # torchrun env (RANK, WORLD_SIZE, LOCAL_RANK) or 1 process
    model = parallelize(model, cfg.parallel, dist) # context parallel -> AC -> compile -> FSDP2 or DDP

Context (sequence) parallelism, `parallel.context: N`: the world is cut into groups of N
consecutive ranks that share one sample; each rank holds 1/N of its tokens (DeepSpeed-Ulysses: an
all-to-all before self-attention trades the sequence split for a head split, attention runs on
whole sequences for heads/N heads, and a second all-to-all trades back). Everything else in a DiT
block is per token and needs no communication. The DiT's output is gathered (its backward a
reduce-scatter), so the loss is computed as without CP on every rank of the group. Ranks of a group
read the same batches (the loader sees the data-parallel rank `Dist.dp_rank` of `dp_size`) and draw
the same noise. Gradients are averaged over the whole world by DDP or FSDP2 as usual: each group's
N identical losses sum to N times its loss, so the average over dp x N ranks is the data-parallel
mean. N must divide the world size and the number of heads; a sample's tokens are padded to a
multiple of N (padded keys are masked out of attention, padded outputs dropped).

The model classes never see any of this: the units that are checkpointed, compiled and sharded are
`model.blocks` (DiT) or the encoder / decoder (VideoVAE), chosen here. State-dict keys stay the
model's own (the AC wrapper strips its prefix; FSDP2 shards in place; DDP and compile are applied
to the forward module only, the optimiser and checkpoints use the raw module).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from spacetime.config import ConfigError
from training.train_config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this process group was made by init_distributed (and is ours to destroy)
    context: int = 1  # ranks per context-parallel group (parallel.context)
    context_group: object = None  # this rank's context-parallel process group (context > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_rank(self) -> int:
        """The data-parallel rank: which batches this rank's group reads."""
        return self.rank // self.context

    @property
    def dp_size(self) -> int:
        return self.world_size // self.context


def keep_freed_memory() -> bool:
    """On CPU: ask glibc's malloc to keep freed memory for reuse (mmap and trim thresholds at 1 GiB)
    instead of returning every large block to the kernel and faulting it in again at the next
    allocation. A training step allocates and frees activations of tens of MB each: measured on 2
    cores (tiny VAE, learn_cpu.yaml), 3.0 -> 1.95 s a step at 256x144x16 (batch 2) and 8.9 -> 4.3 s at
    336x144x16, most of the difference kernel time spent zeroing pages. Returns whether glibc took it
    (False elsewhere: another libc, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def init_distributed(cfg: ParallelConfig, timeout_s: float = 600.0) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU unless
    `backend` says otherwise); one process otherwise. Each rank uses cuda:LOCAL_RANK when CUDA is there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        keep_freed_memory()
    made = False
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
        made = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    if world > 1 and cfg.mode == "none":
        raise ValueError(f"parallel.mode none with {world} processes: set parallel.mode to ddp or fsdp")
    cp, group = cfg.context, None
    if cp > 1:
        if world % cp:
            raise ConfigError(f"parallel.context {cp} does not divide the {world} processes: run a multiple of "
                              f"{cp} processes, or lower parallel.context")
        for start in range(0, world, cp):  # every rank makes every group, in the same order
            g = dist.new_group(list(range(start, start + cp)))
            if start <= rank < start + cp:
                group = g
    return Dist(rank, world, local, device, made, cp, group)


# -------------------------------------------------------------------------- context parallelism
class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 (chunk j goes to rank j); its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # (empty_like of a strided view would keep its strides)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


class _Gather(torch.autograd.Function):
    """all_gather along dim 0; backward: reduce-scatter (sum) of the gradients of every rank's copy."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // ctx.size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None, None


class ContextParallel:
    """One sample's tokens split over a group of `size` ranks (module docstring). The DiT calls
    `begin(n)`, `shard` on its token axis, `attention` in every self-attention and `gather` on
    its output."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.length = 0

    def begin(self, length: int) -> None:
        """A forward on `length` tokens starts (fixes the padding and the key mask)."""
        self.length = length

    @property
    def padded(self) -> int:
        return -(-self.length // self.size) * self.size

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's 1/size of `x` along `dim` (zero-padded to a multiple of size)."""
        pad = self.padded - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.chunk(self.size, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_local, ...] of every rank -> [B, length, ...] (padding dropped)."""
        full = _Gather.apply(x.transpose(0, 1), self.group, self.size).transpose(0, 1)
        return full[:, : self.length]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack=None) -> torch.Tensor:
        """Self-attention over the whole sequence from local [B, heads, n_local, hd] q, k, v. `pack`
        (a training.dit.Packing of the whole padded sequence): block-diagonal over its samples, the
        padding a segment of its own."""
        import torch.nn.functional as F

        b, h, n, hd = q.shape
        if h % self.size:
            raise ValueError(f"parallel.context {self.size} does not divide the {h} attention heads")

        def to_heads(x):  # [B, h, n, hd] -> [B, h/size, size*n, hd]
            x = x.reshape(b, self.size, h // self.size, n, hd).transpose(0, 1)
            x = _AllToAll.apply(x, self.group)  # [size (sequence chunk), B, h/size, n, hd]
            return x.permute(1, 2, 0, 3, 4).reshape(b, h // self.size, self.size * n, hd)

        if pack is not None:
            out = pack.self_attention(to_heads(q), to_heads(k), to_heads(v))
        else:
            mask = None
            if self.padded != self.length:
                mask = (torch.arange(self.padded, device=q.device) < self.length)[None]  # [1, keys]: padding masked
            out = F.scaled_dot_product_attention(to_heads(q), to_heads(k), to_heads(v), attn_mask=mask)
        out = out.reshape(b, h // self.size, self.size, n, hd).permute(2, 0, 1, 3, 4)  # [size, B, h/size, n, hd]
        out = _AllToAll.apply(out, self.group)  # [size (head group), B, h/size, n, hd]
        return out.transpose(0, 1).reshape(b, h, n, hd)


def apply_context_parallel(model: nn.Module, d: Dist) -> None:
    """Give the DiT (and each self-attention) this rank's ContextParallel."""
    if not hasattr(model, "blocks"):
        raise ConfigError("parallel.context applies to the DiT only (train dit)")
    if model.cfg.heads % d.context:
        raise ConfigError(f"parallel.context {d.context} does not divide the DiT's {model.cfg.heads} heads "
                         "(Ulysses splits heads): choose a divisor of dit.heads")
    cp = ContextParallel(d.context_group, d.context, d.rank % d.context)
    model.context = cp
    for block in model.blocks:
        block.attn.attend = cp.attention


def autocast_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (precision auto/bfloat16), none (fp32) on CPU unless asked for."""
    if cfg.precision == "float32" or (cfg.precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that are each one AC / compile / FSDP unit."""
    if hasattr(model, "blocks"):
        return list(model.blocks)  # DiT
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return [model.encoder, model.decoder]  # VideoVAE
    return []


def _replace_units(model: nn.Module, fn) -> None:
    if hasattr(model, "blocks"):
        for i, block in enumerate(model.blocks):
            model.blocks[i] = fn(block)
    elif hasattr(model, "encoder"):
        model.encoder, model.decoder = fn(model.encoder), fn(model.decoder)


def apply_activation_checkpointing(model: nn.Module, units: int | None = None) -> None:
    """Recompute the activations of the first `units` units (None: all) in backward (non-reentrant
    checkpoint wrapper); the others keep theirs."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    count = [0]

    def wrap(unit):
        count[0] += 1
        return checkpoint_wrapper(unit) if units is None or count[0] <= units else unit

    _replace_units(model, wrap)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each unit in place (module names unchanged); shapes vary by bucket, so dynamic."""
    for unit in shard_units(model):
        unit.compile(dynamic=True)


def apply_fsdp(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> None:
    """FSDP2: fully_shard each unit, then the root (parameters become DTensor shards in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dtype = autocast_dtype(cfg, device)
    # bf16 parameters for compute, fp32 gradient reduction; inputs are not cast (autocast does it,
    # and the timestep must stay fp32 for its sinusoidal features)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    units = shard_units(model)
    for i, unit in enumerate(units):
        # the last unit is gathered again at once by backward: keep it
        fully_shard(unit, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=cfg.reshard_after_forward and i < len(units) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)


def parallelize(model: nn.Module, cfg: ParallelConfig, d: Dist, checkpoint_units: int | None = None) -> nn.Module:
    """Apply context parallelism, AC, compile and FSDP2 in place; returns the module to call
    forward on (DDP-wrapped under parallel.mode ddp with several processes, else `model` itself).
    `checkpoint_units`: how many units activation_checkpointing "auto" recomputes (the caller plans it)."""
    if d.context > 1:
        apply_context_parallel(model, d)
    if cfg.activation_checkpointing == "auto":
        if checkpoint_units:
            apply_activation_checkpointing(model, checkpoint_units)
    elif cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if cfg.mode == "fsdp" and d.enabled:
        apply_fsdp(model, cfg, d.device)
        return model
    if cfg.mode == "ddp" and d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model
