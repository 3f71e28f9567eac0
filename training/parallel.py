"""Process group set-up and parallelism applied to a model from outside (torchtitan style).

    dist = init_distributed(cfg.parallel)          # torchrun env (RANK, WORLD_SIZE, LOCAL_RANK) or 1 process
    model = parallelize(model, cfg.parallel, dist) # AC -> compile -> FSDP2 (fully_shard) or DDP

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

from training.train_config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this process group was made by init_distributed (and is ours to destroy)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: ParallelConfig, timeout_s: float = 600.0) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPU unless
    `backend` says otherwise); one process otherwise. Each rank uses cuda:LOCAL_RANK when CUDA is there."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
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
    return Dist(rank, world, local, device, made)


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


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every unit's activations in backward (non-reentrant checkpoint wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    _replace_units(model, checkpoint_wrapper)


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


def parallelize(model: nn.Module, cfg: ParallelConfig, d: Dist) -> nn.Module:
    """Apply AC, compile and FSDP2 in place; returns the module to call forward on (DDP-wrapped
    under parallel.mode ddp with several processes, else `model` itself)."""
    if cfg.activation_checkpointing:
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
