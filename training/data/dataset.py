"""One rank's batches as a torch IterableDataset: plan steps in, decoded batch tensors out.

    dataset = BucketDataset(samples, specs, cfg, state, rank, world_size)
    DataLoader(dataset, batch_size=None, num_workers=N)   # one dict per step, in step order

Workers. Every DataLoader worker of a rank walks the same plan (training.data.plan: integer work
only) and worker w of N builds steps w, w + N, w + 2N, ...: it takes this rank's slice of the
step's global batch, reads each sample's record through `spacetime.contract.read_record` and its
mp4 through training.data.decode, all into one uint8 batch buffer, and converts the batch to the
output dtype once, into shared memory, so handing it to the trainer copies nothing. The state
after the step (Step.after) travels with the batch under stats["_state"] for the loader to adopt.

Corrupt samples. A sample that fails to read or decode (broken mp4, missing member, fewer frames
than its bucket needs) is replaced in its batch by a copy of a good sample of the same batch, so
every rank keeps the bucket's batch shape and step count (dropping it would change one rank's
batch size; skipping the step would desynchronise the ranks). If the whole per-rank batch fails,
up to `max_substitutes` other samples of the bucket are tried (chosen by (seed, epoch, step,
rank); they may repeat a sample within the epoch). Each failure is recorded with its clip id,
shard and reason in stats["errors"] and counted in stats["corrupt"] (the loader logs them). Only
when no substitute decodes either does the dataset raise, naming the bucket.

Latent caches. When loader.data names latent caches (training.cache), a sample is a cache entry:
the VAE posterior [2, C, T', H', W'] and the encoder rows of the caption drawn for the epoch
(training.data.latents), and a batch holds "latent", "text" and "text_mask" instead of "video".
The plan, the caption draw and the corrupt-sample handling are the same.

Shards are read by random access (spacetime.contract.ShardReader): each worker scans a shard's tar
headers once (cached) to find its members' offsets, then reads each sample with one ranged read
(local files, or s3:// through pyarrow's S3FileSystem with `s3:` settings; one request per tar
member when scanning a shard). Each process opens its own S3 client lazily; should the AWS SDK
misbehave in forked workers, set `multiprocessing_context: forkserver`.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from spacetime import contract
from spacetime.contract import ShardReader
from spacetime.errors import describe
from training.config import LoaderConfig
from training.data.decode import caption_draw, caption_kind, choose_caption, sample_frames
from training.data.index import BucketSpec, Samples
from training.data.latents import caption_rows, pad_text, read_entry
from training.data.plan import LoaderState, Step, plan_steps

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def to_unit_range(frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] (into `out`, of any float dtype, when given): x / 127.5 - 1."""
    video = out if out is not None else torch.empty(frames.shape, dtype=torch.float32)
    video.copy_(frames)
    return video.mul_(1 / 127.5).sub_(1.0)


class BucketDataset(IterableDataset):
    """One rank's batches from `state` on (one dict per step; use with DataLoader(batch_size=None))."""

    def __init__(self, samples: Samples, specs: list[BucketSpec], cfg: LoaderConfig, state: LoaderState,
                 rank: int, world_size: int):
        self.samples, self.specs, self.cfg, self.state = samples, specs, cfg, state
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.cfg.s3)
        try:
            for k, step in enumerate(self.plan()):
                if k % workers == worker:
                    yield self.batch(step, reader, worker)
        finally:
            reader.close()

    def plan(self) -> Iterator:
        """Every global step from the state on (training.data.plan)."""
        return plan_steps(self.specs, self.state, self.world_size)

    # ---- one sample
    def load(self, i: int, spec: BucketSpec, epoch: int, reader: ShardReader, out: np.ndarray) -> dict:
        """Sample i decoded into `out` ([3, T, H, W] uint8); returns its caption, id, crop and fps."""
        s = self.samples
        parts = reader.read(s.shard[i], s.key[i])
        record = contract.read_record(parts, where=s.shard[i])
        _, cropped, stride = sample_frames(parts, record, float(s.fps[i]), int(s.num_frames[i]), spec.frames,
                                           spec.size, self.cfg, out)
        caption = choose_caption(record, caption_draw(self.state.seed, epoch, s.clip_id[i]), self.cfg)
        return {"caption": caption, "clip_id": s.clip_id[i], "cropped": cropped, "fps": float(s.fps[i]) / stride}

    def load_cached(self, i: int, spec: BucketSpec, epoch: int, reader: ShardReader) -> dict:
        """Cache entry i: its posterior and the encoder rows of the caption drawn for `epoch`."""
        s = self.samples
        parts = reader.read(s.shard[i], s.key[i], exts=contract.CACHE_EXTS, required=contract.LATENT_EXT)
        latent, entry = read_entry(parts, spec.size, spec.frames, where=s.shard[i])
        kind = caption_kind(caption_draw(self.state.seed, epoch, s.clip_id[i]), bool(entry.short_caption), self.cfg)
        text, mask = pad_text(caption_rows(parts, entry, kind, s.null_text), s.max_length)
        caption = {"empty": "", "short": entry.short_caption, "dense": entry.dense_caption}[kind]
        return {"caption": caption, "clip_id": s.clip_id[i], "cropped": entry.cropped, "fps": entry.fps,
                "latent": latent, "text": text, "text_mask": mask}

    def _try(self, i: int, spec: BucketSpec, epoch: int, reader: ShardReader, errors: list,
             out: np.ndarray | None) -> dict | None:
        try:
            if self.samples.cached:
                return self.load_cached(i, spec, epoch, reader)
            return self.load(i, spec, epoch, reader, out)
        except Exception as err:  # a bad sample never stops training: it is replaced and counted
            errors.append({"clip_id": self.samples.clip_id[i], "shard": self.samples.shard[i], "error": describe(err)})
            return None

    # ---- one batch
    def _substitute(self, step: Step, spec: BucketSpec, mine: np.ndarray, reader: ShardReader, errors: list,
                    out: np.ndarray) -> dict:
        """Another sample of the bucket decoded into `out`, when every sample of the batch failed."""
        rng = np.random.default_rng([step.after.seed, step.epoch, step.step, self.rank, 1])
        failed = set(int(i) for i in mine)
        others = [int(i) for i in rng.permutation(spec.members) if int(i) not in failed]
        for i in others[: self.cfg.max_substitutes]:
            if (x := self._try(i, spec, step.epoch, reader, errors, out)) is not None:
                return x
        raise RuntimeError(f"bucket {spec.name}: no sample of step {step.step} (epoch {step.epoch}) "
                           f"nor {self.cfg.max_substitutes} substitutes decoded; last: {errors[-1]}")

    def to_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """[B, 3, T, H, W] uint8 -> the configured dtype, in [-1, 1] (uint8: as is, 0..255). In a
        worker the tensor is made in shared memory, so handing it to the trainer copies nothing."""
        dtype = _DTYPES[self.cfg.dtype]
        source = torch.from_numpy(frames)
        if dtype == torch.uint8 and get_worker_info() is None:
            return source
        video = torch.empty(frames.shape, dtype=dtype)
        if get_worker_info() is not None:
            video.share_memory_()
        if dtype == torch.uint8:
            return video.copy_(source)
        return to_unit_range(source, out=video)

    def batch(self, step: Step, reader: ShardReader, worker: int = 0) -> dict:
        t0 = time.perf_counter()
        spec = self.specs[step.bucket]
        mine = step.samples[self.rank * spec.batch: (self.rank + 1) * spec.batch]
        errors: list[dict] = []
        w, h = spec.size
        cached = self.samples.cached
        frames = None if cached else np.empty((len(mine), 3, spec.frames, h, w), np.uint8)
        slot = (lambda j: None) if cached else (lambda j: frames[j])
        loaded = [self._try(int(i), spec, step.epoch, reader, errors, slot(j)) for j, i in enumerate(mine)]
        good = [j for j, x in enumerate(loaded) if x is not None]
        if not good:
            loaded[0], good = self._substitute(step, spec, mine, reader, errors, slot(0)), [0]
        for j, x in enumerate(loaded):  # a failed sample becomes a copy of a good one of the batch
            if x is None:
                source = good[j % len(good)]
                loaded[j] = loaded[source]
                if not cached:
                    frames[j] = frames[source]
        if cached:
            tensors = {k: torch.from_numpy(np.stack([x.pop(k) for x in loaded])) for k in ("latent", "text", "text_mask")}
        else:
            tensors = {"video": self.to_tensor(frames)}
        stats = {"epoch": step.epoch, "step": step.step, "bucket": spec.name, "samples": len(loaded),
                 "tokens": len(loaded) * spec.tokens, "worker": worker,
                 "cropped_fraction": float(np.mean([x["cropped"] for x in loaded])),
                 "corrupt": len(errors), "errors": errors, "decode_s": time.perf_counter() - t0,
                 "_state": asdict(step.after)}
        return {**tensors, "caption": [x["caption"] for x in loaded],
                "clip_id": [x["clip_id"] for x in loaded], "bucket": spec.name,
                "fps": [x["fps"] for x in loaded], "stats": stats}


class PackedDataset(BucketDataset):
    """One rank's packed sequences from `state` on (loader.packing; training.data.packing): each step,
    this rank's sequence of samples, each decoded at its own native size. A sample that fails is left
    out of its sequence (recorded, as in BucketDataset); if all of a sequence's fail, up to
    `max_substitutes` other samples are tried, so every rank still gets one sequence per step."""

    def __init__(self, samples: Samples, shapes, cfg: LoaderConfig, state: LoaderState, rank: int, world_size: int):
        super().__init__(samples, [], cfg, state, rank, world_size)
        self.shapes = shapes

    def plan(self) -> Iterator:
        """Every global step from the state on (training.data.packing)."""
        from training.data.packing import plan_packed

        return plan_packed(self.shapes.tokens, self.state, self.world_size, self.cfg)

    def shape(self, i: int) -> BucketSpec:
        """Sample i's frames and size, in the form `load` takes."""
        s = self.shapes
        return BucketSpec(name="packed", frames=int(s.frames[i]), size=(int(s.width[i]), int(s.height[i])),
                          tokens=int(s.tokens[i]), batch=1, members=np.zeros(0, np.int64), length=0)

    def _one(self, i: int, epoch: int, reader: ShardReader, errors: list) -> tuple[dict, torch.Tensor] | None:
        """Sample i: (its fields, its video [3, T, H, W]) or, from a latent cache, (its fields with text and
        mask, its posterior [2, C, T', H', W']); None if it failed (recorded in `errors`)."""
        shape = self.shape(i)
        if self.samples.cached:
            x = self._try(i, shape, epoch, reader, errors, None)
            return None if x is None else (dict(x, tokens=shape.tokens), torch.from_numpy(x.pop("latent")))
        frames = np.empty((3, shape.frames, shape.size[1], shape.size[0]), np.uint8)
        x = self._try(i, shape, epoch, reader, errors, frames)
        return None if x is None else (dict(x, tokens=shape.tokens), self.to_tensor(frames))

    def batch(self, step, reader: ShardReader, worker: int = 0) -> dict:
        t0 = time.perf_counter()
        errors: list[dict] = []
        mine = step.sequences[self.rank]
        loaded = [x for i in mine if (x := self._one(int(i), step.epoch, reader, errors)) is not None]
        if not loaded:
            rng = np.random.default_rng([step.after.seed, step.epoch, step.step, self.rank, 1])
            failed = {int(i) for i in mine}
            for i in [int(i) for i in rng.permutation(len(self.samples)) if int(i) not in failed][: self.cfg.max_substitutes]:
                if (x := self._one(i, step.epoch, reader, errors)) is not None:
                    loaded = [x]
                    break
            else:
                raise RuntimeError(f"packed step {step.step} (epoch {step.epoch}): no sample of the sequence nor "
                                   f"{self.cfg.max_substitutes} substitutes decoded; last: {errors[-1]}")
        tokens = [x["tokens"] for x, _ in loaded]
        stats = {"epoch": step.epoch, "step": step.step, "bucket": "packed", "samples": len(loaded),
                 "tokens": sum(tokens), "sample_tokens": tokens, "padding": 1.0 - sum(tokens) / self.cfg.token_budget,
                 "worker": worker, "cropped_fraction": float(np.mean([x["cropped"] for x, _ in loaded])),
                 "corrupt": len(errors), "errors": errors, "decode_s": time.perf_counter() - t0,
                 "_state": asdict(step.after)}
        if self.samples.cached:
            tensors = {"latent": [v for _, v in loaded],
                       **{k: torch.from_numpy(np.stack([x.pop(k) for x, _ in loaded])) for k in ("text", "text_mask")}}
        else:
            tensors = {"video": [v for _, v in loaded]}
        return {**tensors, "caption": [x["caption"] for x, _ in loaded],
                "clip_id": [x["clip_id"] for x, _ in loaded], "bucket": "packed",
                "fps": [x["fps"] for x, _ in loaded], "stats": stats}
