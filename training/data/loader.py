"""BucketLoader: the trainer's endless, resumable stream of bucket-homogeneous batches.

    loader = BucketLoader(cfg.loader)                # LoaderConfig; rank/world from torch.distributed
    loader.load_state_dict(checkpoint["loader"])     # optional: exact resume
    for batch in loader:                             # endless; epochs roll over
        batch["video"]    # float32 [B, C=3, T, H, W] in [-1, 1]; T, H, W: the bucket's frames and size
                          # (latent caches instead: batch["latent"] [B, 2, C, T', H', W'] posterior mean
                          # and log-variance, batch["text"] [B, L, D], batch["text_mask"] [B, L])
        batch["caption"]  # list[str], B;  batch["clip_id"]: list[str], B;  batch["bucket"]: str
        batch["fps"]      # list[float], B: frame rate of the T frames
        batch["stats"]    # this step: epoch, step, bucket, samples, tokens, wait_s (the trainer's
                          # wait for this batch), decode_s, cropped_fraction, corrupt, errors, worker
        checkpoint["loader"] = loader.state_dict()  # the state AFTER the batches handed out
`loader.stats` sums them (per bucket: samples, tokens, mean cropped fraction; waits; corrupt) and
an INFO line is logged every `log_every` steps; every corrupt sample a batch replaced is logged as
an error with its clip id, shard and reason. `dtype` may be bfloat16/float16, or uint8 (0..255,
unnormalised: 4x less memory and copying for the trainer to normalise on the device).

Data flow: read_index + bucket_specs (training.data.index) at construction; iterating starts a
DataLoader whose workers run BucketDataset (training.data.dataset) from the current state. The
state after a batch travels with the batch, so `state_dict()` is the state after the last batch the
TRAINER received, not after what workers prefetched (resume semantics: training.data.plan).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from spacetime.errors import UserError
from training.config import LoaderConfig
from training.data.dataset import BucketDataset
from training.data.index import bucket_specs, read_index
from training.data.plan import LoaderState

log = logging.getLogger(__name__)


@dataclass
class LoaderStats:
    """Counters since the loader was made (this process; not saved in the state)."""

    steps: int = 0
    wait_s: float = 0.0
    decode_s: float = 0.0
    samples: Counter = field(default_factory=Counter)  # per bucket
    tokens: Counter = field(default_factory=Counter)  # per bucket
    cropped: Counter = field(default_factory=Counter)  # sum of per-sample cropped fractions, per bucket
    corrupt: int = 0
    errors: list[dict] = field(default_factory=list)  # the most recent 100

    padding: float = 0.0  # sum of per-step padding fractions (packed sequences)

    def add(self, stats: dict) -> None:
        self.steps += 1
        self.padding += stats.get("padding", 0.0)
        self.wait_s += stats["wait_s"]
        self.decode_s += stats["decode_s"]
        b = stats["bucket"]
        self.samples[b] += stats["samples"]
        self.tokens[b] += stats["tokens"]
        self.cropped[b] += stats["cropped_fraction"] * stats["samples"]
        self.corrupt += stats["corrupt"]
        self.errors = (self.errors + stats["errors"])[-100:]

    def as_dict(self) -> dict:
        return {"steps": self.steps, "wait_s": self.wait_s, "decode_s": self.decode_s,
                "samples": dict(self.samples), "tokens": dict(self.tokens), "corrupt": self.corrupt,
                "cropped_fraction": {b: self.cropped[b] / n for b, n in self.samples.items() if n},
                "padding": self.padding / self.steps if self.steps else 0.0}


class BucketLoader:
    """Bucket-homogeneous batches for one rank, resumable from `state_dict()`.

    rank / world_size default to torch.distributed's when a process group is initialised, else 0 / 1.
    Iterating starts DataLoader workers at the current state and streams batches endlessly (epochs
    roll over); stop whenever, the state follows the batches handed out.
    """

    def __init__(self, cfg: LoaderConfig, rank: int | None = None, world_size: int | None = None,
                 holdout: float = 0.0):
        """`holdout`: the fraction of sources held out for validation, never loaded here
        (training.data.index.held_out; eval.fraction of a training config)."""
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if dist else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.cfg = cfg
        self.samples = read_index(cfg.data, cfg.s3, holdout, "train")
        self.state = LoaderState(seed=cfg.seed)
        self.stats = LoaderStats()
        self._plan()
        if self.rank == 0:
            self._log_plan()

    def _plan(self) -> None:
        """What the epochs are made of (here: the bucket specs), checked before any worker starts."""
        cfg = self.cfg
        self.specs = bucket_specs(self.samples, cfg)
        if not self.steps_per_epoch():
            sizes = ", ".join(f"{r['bucket']}: {r['epoch_samples_planned']} < {self.world_size} x {r['batch_per_rank']}"
                              for r in self.describe())
            raise UserError(f"{cfg.data}: no bucket fills one global batch ({sizes}); lower token_budget or "
                            "max_batch_size, or add data")

    # ---- plan information
    def describe(self) -> list[dict]:
        """Per bucket: samples, size, tokens per sample, batch per rank, steps per epoch (at this
        world size) and planned token share of an epoch."""
        rows, total = [], 0
        for s in self.specs:
            steps = s.length // (s.batch * self.world_size)
            used = steps * s.batch * self.world_size
            total += used * s.tokens
            rows.append({"bucket": s.name, "samples": len(s.members), "width": s.size[0], "height": s.size[1],
                         "frames": s.frames, "tokens_per_sample": s.tokens, "batch_per_rank": s.batch,
                         "epoch_samples_planned": s.length, "epoch_samples": used, "steps_per_epoch": steps})
        for row in rows:
            row["token_share"] = row["epoch_samples"] * row["tokens_per_sample"] / (total or 1)
        return rows

    def steps_per_epoch(self) -> int:
        return sum(row["steps_per_epoch"] for row in self.describe())

    def assignments(self) -> dict[str, str]:
        """clip id -> bucket, for every sample of the index (no tar opened)."""
        return dict(zip(self.samples.clip_id, self.samples.bucket))

    def _log_plan(self) -> None:
        for row in self.describe():
            if row["epoch_samples_planned"] and not row["steps_per_epoch"]:
                log.warning("bucket %s: %d samples per epoch, less than one global batch (%d x %d): "
                            "never used", row["bucket"], row["epoch_samples_planned"], self.world_size,
                            row["batch_per_rank"])
            log.info("bucket %(bucket)s: %(samples)d samples, %(width)dx%(height)d x %(frames)d frames, "
                     "%(tokens_per_sample)d tokens/sample, batch %(batch_per_rank)d/rank, "
                     "%(steps_per_epoch)d steps/epoch, token share %(token_share).3f", row)

    # ---- state
    def state_dict(self) -> dict:
        state = asdict(self.state)
        state.update(dataset=self.samples.fingerprint, world_size=self.world_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("dataset") not in (None, self.samples.fingerprint):
            raise ValueError(f"loader state is for dataset {state['dataset']}, but {self.cfg.data} is "
                             f"{self.samples.fingerprint}: resuming would not continue the same order")
        if state["seed"] != self.cfg.seed:
            log.warning("resuming with the saved loader seed %s (config says %s)", state["seed"], self.cfg.seed)
        self.state = LoaderState(seed=int(state["seed"]), epoch=int(state["epoch"]), step=int(state["step"]),
                                 cursors={k: int(v) for k, v in state.get("cursors", {}).items()})

    # ---- iteration
    def dataset(self) -> BucketDataset:
        return BucketDataset(self.samples, self.specs, self.cfg, self.state, self.rank, self.world_size)

    def _dataloader(self) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(self.dataset(), batch_size=None, num_workers=workers,
                          pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                          prefetch_factor=self.cfg.prefetch_factor if workers else None,
                          multiprocessing_context=self.cfg.multiprocessing_context if workers else None)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self._dataloader())
        try:
            while True:
                t0 = time.perf_counter()
                batch = next(batches)
                stats = batch["stats"]
                stats["wait_s"] = time.perf_counter() - t0
                self._advance(stats)
                yield batch
        finally:
            del batches  # shuts the workers down

    def _advance(self, stats: dict) -> None:
        after = LoaderState(**stats.pop("_state"))
        same_epoch = stats["epoch"] == self.state.epoch and stats["step"] == self.state.step
        next_epoch = stats["epoch"] > self.state.epoch and stats["step"] == 0
        if not (same_epoch or next_epoch):  # a broken worker order would silently reorder data
            raise RuntimeError(f"loader: got step {stats['step']} of epoch {stats['epoch']}, expected step "
                               f"{self.state.step} of epoch {self.state.epoch}")
        if next_epoch and self.rank == 0:  # the trainer's step lines carry the epoch
            log.debug("loader: epoch %d starts", stats["epoch"])
        self.state = after
        self.stats.add(stats)
        self._log_step(stats)

    def _log_step(self, stats: dict) -> None:
        for err in stats["errors"]:
            log.error("corrupt sample %s in %s skipped (replaced in its batch): %s",
                      err["clip_id"], err["shard"], err["error"])
        every = self.cfg.log_every
        if every and self.rank == 0 and self.stats.steps % every == 0:
            log.info("loader step %d (epoch %d): %s x%d, %d tokens, wait %.3fs, decode %.3fs, cropped %.3f, "
                     "corrupt so far %d", stats["step"], stats["epoch"], stats["bucket"], stats["samples"],
                     stats["tokens"], stats["wait_s"], stats["decode_s"], stats["cropped_fraction"],
                     self.stats.corrupt)


class PackedLoader(BucketLoader):
    """`loader.packing`: every clip at its native size, packed into one sequence of at most
    token_budget tokens per rank and step (training.data.packing). The same interface, state and
    resume rules as BucketLoader; a batch holds LISTS of per-sample tensors:
        batch["video"]    # list of S float32 [3, T_i, H_i, W_i] (the dtype of loader.dtype); from a latent
                          # cache built with loader.packing: batch["latent"], a list of S [2, C, T', H', W'],
                          # and batch["text"] [S, L, D], batch["text_mask"] [S, L]
        batch["caption"], batch["clip_id"], batch["fps"]   # lists of S
        batch["bucket"]   # "packed"
        batch["stats"]    # as BucketLoader's, plus padding (the sequence's unused share of token_budget)
                          # and sample_tokens (each sample's)
    """

    def _plan(self) -> None:
        from training.data.packing import epoch_sequences, native_shapes

        if self.cfg.bucket_weights or self.cfg.image_token_fraction is not None:
            log.warning("loader.packing: bucket_weights and image_token_fraction do not apply (every sample "
                        "once per epoch)")
        from training.data.index import BucketSpec

        # one pseudo-bucket for the GPU memory planner (training.memory): a full sequence, as one sample
        # (an upper bound: block-diagonal attention costs less than one sample of that length)
        self.specs = [BucketSpec(name="packed", frames=0, size=(0, 0), tokens=self.cfg.token_budget, batch=1,
                                 members=np.arange(len(self.samples)), length=len(self.samples))]
        self.shapes = native_shapes(self.samples, self.cfg)
        self.sequences = len(epoch_sequences(self.shapes.tokens, self.cfg.seed, 0, self.cfg.token_budget,
                                             self.cfg.pack_window))

    def describe(self) -> list[dict]:
        """One row: samples, sequences and steps per epoch (at this world size), tokens, padding."""
        tokens = int(self.shapes.tokens.sum())
        budget = self.sequences * self.cfg.token_budget
        return [{"bucket": "packed", "samples": len(self.samples), "sequences_per_epoch": self.sequences,
                 "steps_per_epoch": self.sequences // self.world_size, "tokens_per_epoch": tokens,
                 "padding": 1.0 - tokens / budget if budget else 0.0, "token_share": 1.0}]

    def steps_per_epoch(self) -> int:
        return max(1, self.sequences // self.world_size)

    def _log_plan(self) -> None:
        row = self.describe()[0]
        log.info("packed: %(samples)d samples at native size, %(sequences_per_epoch)d sequences per epoch "
                 "(%(steps_per_epoch)d steps), %(tokens_per_epoch)d tokens, padding %(padding).4f", row)

    def dataset(self):
        from training.data.dataset import PackedDataset

        return PackedDataset(self.samples, self.shapes, self.cfg, self.state, self.rank, self.world_size)


def make_loader(cfg: LoaderConfig, rank: int | None = None, world_size: int | None = None,
                holdout: float = 0.0) -> BucketLoader:
    """The loader `cfg` asks for: PackedLoader with loader.packing, else BucketLoader."""
    return (PackedLoader if cfg.packing else BucketLoader)(cfg, rank, world_size, holdout)
