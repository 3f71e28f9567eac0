"""Native-resolution packing (NaViT's Patch n' Pack, `loader.packing`): which samples every packed
sequence holds, at which size.

    shapes = native_shapes(samples, cfg)            # per sample: frames, width, height, tokens
    for step in plan_packed(shapes.tokens, LoaderState(seed), world_size, cfg):   # endless
        step.sequences[rank]                         # this rank's samples (indices into Samples)

Sizes (`native_shape`). A clip keeps its own aspect ratio and resolution: width and height are rounded
DOWN to a multiple of vae_spatial x patch (16 px for an 8x VAE and 2x2 patches), so its latent grid
needs no padded patch; its frames are its frame tier (the bucket curation gave it; at most
loader.max_frames) rounded down to the VAE's temporal grid, 1 + k x vae_temporal (the causal first
frame), and a whole number of temporal patches. Only a sample above loader.max_tokens_per_sample
(default token_budget) is scaled down, both sides by one factor (the aspect kept up to the rounding),
never up. An image is a one-frame sample of the same stream.

Order and packing. Everything is a pure function of (seed, epoch, cursor), like the bucket plan
(training.data.plan):
- An epoch's order of ALL samples is a permutation drawn with default_rng([seed, epoch]); it depends
  on nothing else (not the world size, nor the workers).
- The order is cut into windows of loader.pack_window samples; each window is packed into
  sequences of at most token_budget tokens by first-fit-decreasing (largest first; ties by position).
  The last-opened sequence of a window (FFD's emptiest) is not emitted: its samples open the next
  window, so only the epoch's very last sequence may be short. No sample is dropped at an epoch's end.
- The epoch's sequences, in order, form one stream across epochs; global step k takes the next
  world_size of them, and rank r the r-th: every rank gets one sequence per step. A step may take
  the last sequences of one epoch and the first of the next.
The state is LoaderState(seed, epoch, step, cursors={"sequences": sequences of the epoch consumed}).
Since the sequences do not depend on the world size, a resume on another world size continues at
the same sequence: no sample of the epoch is repeated or skipped. On the same world size the steps
are exactly those that would have come next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from spacetime import contract
from training.config import LoaderConfig
from training.data.index import Samples, latent_tokens
from training.data.plan import LoaderState

CURSOR = "sequences"


@dataclass(frozen=True)
class NativeShapes:
    """Per sample (indices into Samples): the frames, width and height it is trained at, and its tokens."""

    frames: np.ndarray
    width: np.ndarray
    height: np.ndarray
    tokens: np.ndarray


def _temporal_grid(frames: int, cfg: LoaderConfig) -> int:
    """The most frames <= `frames` of the form 1 + k x vae_temporal x pt (whole temporal patches)."""
    step = cfg.vae_temporal * cfg.patch[0]
    if frames <= 1:
        return 1
    return 1 + (frames - 1) // step * step


def native_shape(width: int, height: int, num_frames: int, tier: int, cfg: LoaderConfig) -> tuple[int, int, int, int]:
    """(frames, width, height, tokens) a clip of `width` x `height` x `num_frames` (frame tier `tier`)
    is trained at (module docstring)."""
    uh, uw = cfg.vae_spatial * cfg.patch[1], cfg.vae_spatial * cfg.patch[2]
    frames = _temporal_grid(min(tier, cfg.max_frames or tier, num_frames), cfg)
    limit = cfg.max_tokens_per_sample or cfg.token_budget
    w, h = max(uw, width // uw * uw), max(uh, height // uh * uh)
    tokens = latent_tokens(frames, w, h, cfg)
    if tokens > limit:  # one factor for both sides, rounded down, until it fits
        scale = math.sqrt(limit / tokens)
        while tokens > limit:
            w, h = max(uw, int(width * scale) // uw * uw), max(uh, int(height * scale) // uh * uh)
            tokens = latent_tokens(frames, w, h, cfg)
            if tokens > limit and w == uw and h == uh:  # the smallest picture is still too long: fewer frames
                frames = _temporal_grid(frames - 1, cfg)
                tokens = latent_tokens(frames, w, h, cfg)
            scale *= 0.97
    return frames, w, h, tokens


def native_shapes(samples: Samples, cfg: LoaderConfig) -> NativeShapes:
    rows = [native_shape(int(w), int(h), int(n), contract.Bucket.parse(b).frames, cfg)
            for w, h, n, b in zip(samples.width, samples.height, samples.num_frames, samples.bucket)]
    f, w, h, t = (np.array(c, np.int64).reshape(-1) for c in zip(*rows)) if rows else [np.zeros(0, np.int64)] * 4
    return NativeShapes(frames=f, width=w, height=h, tokens=t)


def first_fit_decreasing(members: np.ndarray, tokens: np.ndarray, budget: int) -> list[list[int]]:
    """`members` (sample indices) packed into sequences of at most `budget` tokens: each sample, largest
    first (ties: earlier in `members` first), into the first sequence it fits, else a new one; the
    sequences in opening order."""
    order = sorted(range(len(members)), key=lambda j: -int(tokens[members[j]]))  # stable
    free = np.empty(0, np.int64)
    bins: list[list[int]] = []
    for j in order:
        i, t = int(members[j]), int(tokens[members[j]])
        fits = np.flatnonzero(free >= t)
        if fits.size:
            bins[int(fits[0])].append(i)
            free[int(fits[0])] -= t
        else:
            bins.append([i])
            free = np.append(free, budget - t)
    return bins


def epoch_sequences(tokens: np.ndarray, seed: int, epoch: int, budget: int, window: int) -> list[list[int]]:
    """Every packed sequence of one epoch, in order (module docstring)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(tokens))
    out: list[list[int]] = []
    carry: list[int] = []
    for pos in range(0, len(order), window):
        bins = first_fit_decreasing(np.array(carry + order[pos: pos + window].tolist(), np.int64), tokens, budget)
        if pos + window >= len(order):  # the epoch's last window: everything goes
            return out + bins
        out += bins[:-1]
        carry = bins[-1]
    return out


@dataclass
class PackStep:
    epoch: int
    step: int  # within the epoch the step began in
    sequences: list[list[int]]  # world_size sequences: rank r takes sequences[r]
    after: LoaderState


def plan_packed(tokens: np.ndarray, state: LoaderState, world_size: int, cfg: LoaderConfig) -> Iterator[PackStep]:
    """Every global step from `state` on, endlessly (module docstring)."""
    if not len(tokens):
        raise RuntimeError("no sample to pack")
    seed, epoch, step = state.seed, state.epoch, state.step
    cursor = int(state.cursors.get(CURSOR, 0))

    def sequences(e: int) -> list[list[int]]:
        return epoch_sequences(tokens, seed, e, cfg.token_budget, cfg.pack_window)

    seqs = sequences(epoch)
    while True:
        if cursor >= len(seqs):  # the epoch is used up: the next one starts
            epoch, cursor, step = epoch + 1, 0, 0
            seqs = sequences(epoch)
        began, first = epoch, step
        taken: list[list[int]] = []
        while len(taken) < world_size:
            if cursor >= len(seqs):  # the step goes on into the next epoch
                epoch, cursor = epoch + 1, 0
                seqs = sequences(epoch)
            n = min(world_size - len(taken), len(seqs) - cursor)
            taken += seqs[cursor: cursor + n]
            cursor += n
        step = first + 1 if epoch == began else 0
        yield PackStep(began, first, taken, LoaderState(seed, epoch, step, {CURSOR: cursor}))
