"""Checkpoints that hold everything a run needs to continue exactly.

    RUN/checkpoints/step-00001000/
        model.safetensors   full (unsharded) model weights, fp32, the model's own parameter names
        ema.safetensors     the EMA of the weights (what the sampler uses by default)
        optimizer.pt        full AdamW state keyed by parameter name (torch.distributed.checkpoint
                            .state_dict), so it loads under another parallelism or world size
        trainer.pt          step, LR-scheduler state, loader state (BucketLoader.state_dict()),
                            RNG states of every rank (python, numpy, torch, CUDA, the trainer's
                            generator), extra run state (e.g. VAE latent statistics)
        meta.json           kind, step, world size, model arguments, VAE / text-encoder references,
                            the resolved config: all the sampler needs besides the weights

Sharded (checkpoint.format sharded; auto: under FSDP2 with several processes): instead of the
three full-state files, `state/` is a torch.distributed.checkpoint (DCP) folder of model, optimizer
and EMA in which every rank writes its own shards in parallel (no rank gathers the full model), and
loading reshards them onto any world size or parallelism (FSDP2 on 8, DDP on 2, one process):

    RUN/checkpoints/step-00001000/
        state/              DCP: {"model": ..., "optimizer": ..., "ema": ...}, .distcp files + .metadata
        trainer.pt, meta.json

`load_model_weights` reads either format into a plain model (the sampler uses it).

Atomic: RUN/checkpoints/.step-N.tmp is filled (by rank 0, or by every rank for DCP) and renamed to
step-N by rank 0 once complete, so a killed run never leaves a half checkpoint under a final name;
stale temp folders are removed at start. Saving and loading are collectives (every rank calls them).
Loading reads the files on every rank (RUN must be on a filesystem every node sees).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from spacetime.errors import MissingInput
from spacetime.io import atomic_dir
from training.flow import EMA
from training.parallel import Dist

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its newest checkpoint)."""
    path = Path(path).expanduser()
    if (path / "meta.json").exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise MissingInput(f"{path}: neither a checkpoint (no meta.json) nor a run folder with checkpoints")
    return latest


def remove_stale(run_dir: Path) -> None:
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ RNG
def rng_state(generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj, d: Dist) -> list:
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------- save/load
def _full_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets the full tensors
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


STATE_DIR = "state"  # the DCP folder of a sharded checkpoint


def _sharded_state(model, optimizer, ema: EMA | None) -> dict:
    """Model, optimizer and EMA as DCP wants them: this rank's shards (DTensors under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema.sharded_state_dict()
    return state


def _save_sharded(final: Path, model, optimizer, ema: EMA | None, trainer: dict, meta: dict, d: Dist) -> None:
    import torch.distributed.checkpoint as dcp

    tmp = final.with_name(f".{final.name}.tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if d.enabled:
        dist.barrier()
    dcp.save(_sharded_state(model, optimizer, ema), checkpoint_id=str(tmp / STATE_DIR))  # every rank its shards
    if d.enabled:
        dist.barrier()
    if d.is_main:
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, ema: EMA | None, loader_state: dict,
                    generator: torch.Generator, meta: dict, d: Dist, keep: int = 0, extra: dict | None = None,
                    sharded: bool = False) -> Path:
    """Write checkpoint `step` (collective: call on every rank); returns its folder. `sharded`: DCP
    (every rank writes its shards) instead of full tensors gathered to rank 0."""
    from safetensors.torch import save_file

    rngs = _gather(rng_state(generator), d)
    final = checkpoint_dir(run_dir, step)
    trainer = {"step": step, "scheduler": scheduler.state_dict(), "loader": loader_state, "rng": rngs,
               "extra": extra or {}}
    meta = {**meta, "step": step, "world_size": d.world_size, "saved_at": time.time(),
            "format": "sharded" if sharded else "full"}
    if sharded:
        _save_sharded(final, model, optimizer, ema, trainer, meta, d)
        _prune(run_dir, keep, d)
        return final
    model_sd, optim_sd = _full_state(model, optimizer)
    ema_sd = ema.state_dict() if ema is not None else None
    if d.is_main:
        with atomic_dir(final) as tmp:
            save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"))
            if ema_sd is not None:
                save_file({k: v.contiguous() for k, v in ema_sd.items()}, str(tmp / "ema.safetensors"))
            torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(trainer, tmp / "trainer.pt")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    _prune(run_dir, keep, d)
    return final


def _prune(run_dir: Path, keep: int, d: Dist) -> None:
    """Rank 0 removes all but the newest `keep` checkpoints (0: keeps all); then every rank goes on."""
    if d.is_main and keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if d.enabled:
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, ema: EMA | None, generator: torch.Generator,
                    d: Dist) -> dict:
    """Restore model, optimizer, scheduler, EMA and this rank's RNG from `path` (collective);
    returns trainer.pt's dict (step, loader state, extra)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if (path / STATE_DIR).is_dir():  # sharded: DCP reshards onto this world size and parallelism
        import torch.distributed.checkpoint as dcp

        state = _sharded_state(model, optimizer, ema)
        with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path / STATE_DIR))  # in place (the EMA's shadows too)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    else:
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, load_file(str(path / "model.safetensors")), options=opts)
        set_optimizer_state_dict(model, optimizer, torch.load(path / "optimizer.pt", weights_only=False), options=opts)
        if ema is not None:
            ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    rngs = trainer["rng"]
    if len(rngs) == d.world_size:
        set_rng_state(rngs[d.rank], generator)
    else:  # another world size: the data order continues (loader), random draws are reseeded
        log.warning("checkpoint %s was written by %d processes, this run has %d: RNG streams are reseeded "
                    "(the run continues, but not bit-exactly)", path, len(rngs), d.world_size)
        generator.manual_seed(hash((trainer["step"], d.rank)) % 2**63)
    return trainer


def load_model_weights(path: Path, model: torch.nn.Module, ema: bool = True) -> None:
    """Load a checkpoint's EMA (or raw) weights into a plain, unparallelised `model`, from either
    format (one process, no process group needed)."""
    path = Path(path)
    if (path / STATE_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        key = "ema" if ema else "model"
        state = {key: model.state_dict()}
        with warnings.catch_warnings():  # "... assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            # no_dist: this process alone, even inside a process group (samples drawn during training)
            dcp.load(state, checkpoint_id=str(path / STATE_DIR), no_dist=True)
        model.load_state_dict(state[key])
        return
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / ("ema.safetensors" if ema else "model.safetensors"))))
