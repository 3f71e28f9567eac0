"""The order of the batches: which bucket and which samples every global step takes.

    for step in plan_steps(specs, LoaderState(seed), world_size):   # endless
        step.bucket, step.samples, step.after   # spec index, world_size x B sample indices, state after

Order, distribution and resume. Everything is a pure function of (seed, epoch, cursors):
- For every bucket and epoch, a SEQUENCE of its samples: a permutation drawn with
  numpy.random.default_rng([seed, epoch, crc32(bucket name)]). It does not depend on the world
  size, the batch size or the number of workers.
- A per-bucket CURSOR counts the samples of the sequence already handed out (on all ranks).
- Step by step, a global batch is cut: the bucket is drawn among the buckets that still hold a
  full global batch (world_size x per-rank batch samples), with probability proportional to how
  many such batches each has left (a uniform shuffle of the epoch's batches), by
  default_rng([seed, epoch, samples handed out so far]); the batch is the next
  world_size x B samples of its sequence, rank r takes slice [r*B, (r+1)*B). Every rank computes
  the same plan, so all ranks take the same bucket at every step (no collective can hang on
  mismatched shapes) and ranks see disjoint samples.
- When no bucket holds a full global batch, the epoch ends: the incomplete tail of each bucket
  (fewer than world_size x B samples) is dropped for this epoch (a new permutation puts other
  samples in the tail next epoch). Then epoch += 1 and the cursors restart at 0.
- DataLoader workers of a rank all walk the same plan (integer work only) and worker w decodes
  steps w, w + N, w + 2N, ... (training.data.dataset); torch's DataLoader returns them in step order.
The state is {seed, epoch, step, cursors} plus a fingerprint of the dataset (a few hundred bytes).
Resuming on the same world size yields exactly the batches that would have come next. Resuming on
another world size continues every bucket's sequence from its cursor: no sample of the epoch is
repeated or skipped (except the tails dropped at the epoch's end); the interleaving of buckets from
then on differs, since it is cut into batches of another size.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from spacetime.errors import UserError
from training.data.index import BucketSpec


@dataclass
class LoaderState:
    """Where the loader stands: the next step is step `step` of epoch `epoch`; cursors[b] samples of
    bucket b's epoch sequence have been handed out (over all ranks)."""

    seed: int
    epoch: int = 0
    step: int = 0
    cursors: dict[str, int] = field(default_factory=dict)


@dataclass
class Step:
    epoch: int
    step: int
    bucket: int  # index into the spec list
    samples: np.ndarray  # global batch: world_size x B indices into Samples; rank r: [r*B, (r+1)*B)
    after: LoaderState


def bucket_sequence(spec: BucketSpec, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of `spec`'s samples (independent of world size, batch and workers)."""
    n = len(spec.members)
    if spec.length == 0 or n == 0:
        return spec.members[:0]
    rng = np.random.default_rng([seed, epoch, zlib.crc32(spec.name.encode())])
    passes = -(-spec.length // n)
    order = np.concatenate([rng.permutation(n) for _ in range(passes)])[: spec.length]
    return spec.members[order]


def _epoch_steps(specs: list[BucketSpec], seed: int, epoch: int, step: int, cursors: np.ndarray,
                 global_batch: np.ndarray) -> Iterator[Step]:
    """The remaining global batches of one epoch from `cursors` (advanced in place) and `step` on."""
    seqs = [bucket_sequence(s, seed, epoch) for s in specs]
    lengths = np.array([len(q) for q in seqs], np.int64)
    while True:
        left = np.maximum(lengths - cursors, 0) // global_batch
        total = int(left.sum())
        if total == 0:
            return
        draw = np.random.default_rng([seed, epoch, int(cursors.sum())]).integers(total)
        b = int(np.searchsorted(np.cumsum(left), draw, side="right"))
        batch = seqs[b][cursors[b]: cursors[b] + global_batch[b]]
        cursors[b] += global_batch[b]
        step += 1
        after = LoaderState(seed, epoch, step, {s.name: int(c) for s, c in zip(specs, cursors) if c})
        yield Step(epoch, step - 1, b, batch, after)


def plan_steps(specs: list[BucketSpec], state: LoaderState, world_size: int) -> Iterator[Step]:
    """Every global batch from `state` on, endlessly (see the module docstring for the scheme)."""
    seed, epoch, step = state.seed, state.epoch, state.step
    cursors = np.array([state.cursors.get(s.name, 0) for s in specs], np.int64)
    global_batch = np.array([s.batch * world_size for s in specs], np.int64)
    while True:
        fresh = not cursors.any()
        produced = False
        for planned in _epoch_steps(specs, seed, epoch, step, cursors, global_batch):
            produced = True
            yield planned
        if fresh and not produced:
            need = ", ".join(f"{s.name}: {s.length} < {s.batch * world_size}" for s in specs)
            raise UserError(f"no bucket holds one full global batch (world size {world_size}): {need}; "
                            "lower token_budget / max_batch_size or add data")
        epoch, step = epoch + 1, 0
        cursors[:] = 0
