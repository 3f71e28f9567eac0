"""Bucketed, resumable loader of curation outputs for the DiT trainer.

    loader = BucketLoader(cfg.loader)                # LoaderConfig; rank/world from torch.distributed
    loader.load_state_dict(checkpoint["loader"])     # optional: exact resume
    for batch in loader:                             # endless; epochs roll over
        batch["video"]    # float32 [B, C=3, T, H, W] in [-1, 1]; T, H, W: the bucket's frames and size
        batch["caption"]  # list[str], B;  batch["clip_id"]: list[str], B;  batch["bucket"]: str
        batch["fps"]      # list[float], B: frame rate of the T frames
        batch["stats"]    # this step: epoch, step, bucket, samples, tokens, wait_s (the trainer's
                          # wait for this batch), decode_s, cropped_fraction, corrupt, errors, worker
        checkpoint["loader"] = loader.state_dict()  # the state AFTER the batches handed out
`loader.stats` sums them (per bucket: samples, tokens, mean cropped fraction; waits; corrupt) and
an INFO line is logged every `log_every` steps. `dtype` may be bfloat16/float16, or uint8 (0..255,
unnormalised: 4x less memory and copying for the trainer to normalise on the device).

Buckets. Every row of shards/index.parquet is assigned to the bucket its `bucket` column names,
through the same spec curation wrote it with (`spacetime.contract.Bucket.parse`; `bucket_for` when
the column is null): no tar is opened to plan. Images are 1-frame videos (frame tier 1). A sample
of bucket `A_Rp_Ff` gives the FIRST F frames of its clip at the clip's fps (with `target_fps`,
every k-th frame, k = round(fps / target_fps), reduced so the F frames fit in the clip), resized
to the bucket's `Bucket.target_size()`.

Resize rule. Scale (keeping the aspect ratio) by s = max(W / w, H / h), the smallest scale at
which the frame covers the W x H target (each side rounded, never below the target), then take
the centred W x H crop. The cropped fraction 1 - W*H / (w*s * h*s) is reported per step (0 when
the clip has the class's exact ratio). Frames are shown upright: a display rotation, if any,
is applied (curation.analyze.upright).

Token budget. Tokens of a sample = latent frames x latent height x latent width / patch volume
with latent frames = 1 + (F - 1) // vae_temporal (causal first frame), latent size = size /
vae_spatial, each divided by the patch (t, h, w) rounded up. Batch per rank and bucket =
max(1, token_budget // tokens), capped by max_batch_size.

Sampling, in tokens. A bucket's natural token mass is (its samples) x (tokens per sample);
`bucket_weights` (fnmatch patterns, last match wins) multiply it, and `image_token_fraction`
rescales image buckets so they carry that share of the epoch's tokens. A multiplier m makes an
epoch draw round(m x n) samples of a bucket of n: a random subset when m < 1 (a new one each
epoch), whole passes plus a partial one when m > 1 (only then does a sample repeat within an
epoch). The planned token share of every bucket is logged at start (`describe()`).

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
  steps w, w + N, w + 2N, ...; torch's DataLoader returns them in step order.
The state is {seed, epoch, step, cursors} plus a fingerprint of the dataset (a few hundred bytes).
The state after a batch travels with the batch, so `state_dict()` is the state after the last
batch the TRAINER received, not after what workers prefetched. Resuming on the same world size
yields exactly the batches that would have come next. Resuming on another world size continues
every bucket's sequence from its cursor: no sample of the epoch is repeated or skipped (except the
tails dropped at the epoch's end); the interleaving of buckets from then on differs, since it is
cut into batches of another size.

Corrupt samples. A sample that fails to read or decode (broken mp4, missing member, fewer frames
than its bucket needs) is replaced in its batch by a copy of a good sample of the same batch, so
every rank keeps the bucket's batch shape and step count (dropping it would change one rank's
batch size; skipping the step would desynchronise the ranks). If the whole per-rank batch fails,
up to `max_substitutes` other samples of the bucket are tried (chosen by (seed, epoch, step,
rank); they may repeat a sample within the epoch). Each failure is logged as an error with its
clip id, shard and reason, and counted (`batch["stats"]["corrupt"]`, `loader.stats.corrupt`).
Only when no substitute decodes either does the loader raise, naming the bucket.

Decoding happens in the DataLoader workers: PyAV decodes from the start of the clip (curated
clips start on a keyframe) and stops after the last frame needed; each frame is resized and
cropped by swscale, written planar into one uint8 batch buffer, and the batch is converted to
the output dtype once, into shared memory, so handing it to the trainer copies nothing.

Shards are read by random access: each worker scans a shard's tar headers once (cached) to find
its members' offsets, then reads each sample with one ranged read (local files, or s3:// through
pyarrow's S3FileSystem with `s3:` settings; one request per tar member when scanning a shard).
Each process opens its own S3 client lazily; should the AWS SDK misbehave in forked workers, set
`multiprocessing_context: forkserver`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import logging
import math
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from spacetime import contract
from spacetime.contract import ShardReader
from spacetime.config import S3Config
from spacetime.errors import describe
from spacetime.frames import upright
from spacetime.record import ClipRecord
from training.config import LoaderConfig

log = logging.getLogger(__name__)

_INTERPOLATION = {"area": "AREA", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}
_INDEX_COLUMNS = ("shard", "key", "clip_id", "width", "height", "num_frames", "fps", "bucket")


# ------------------------------------------------------------------------------------- samples
@dataclass
class Samples:
    """The sample table of every data directory, in a canonical order (bucket, clip id, shard)."""

    shard: list[str]  # full URI of the tar: <data dir>/<index shard column>
    key: list[str]
    clip_id: list[str]
    bucket: list[str]
    num_frames: np.ndarray  # int
    fps: np.ndarray  # float
    fingerprint: str  # of the (clip id, bucket) list; a resume on other data is refused

    def __len__(self) -> int:
        return len(self.key)


def _read_index_table(root: str, s3: S3Config):
    if root.startswith("s3://"):
        from spacetime.io import s3_filesystem

        path = f"{root[len('s3://'):].rstrip('/')}/{contract.INDEX_PATH}"
        return pq.read_table(path, filesystem=s3_filesystem(s3)), f"s3://{path}"
    path = Path(root).expanduser() / contract.INDEX_PATH
    if not path.exists():
        raise FileNotFoundError(f"{path}: no index; is {root} the --output of `spacetime curate`?")
    return pq.read_table(path), str(path)


def read_index(data: list[str], s3: S3Config) -> Samples:
    """Read shards/index.parquet of every data directory and assign each row its bucket."""
    if not data:
        raise ValueError("loader.data is empty: give the curation output directories to train on")
    rows: list[tuple] = []
    stale = 0
    for root in data:
        table, where = _read_index_table(root, s3)
        missing = [c for c in _INDEX_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{where}: index lacks columns {missing}; rerun `spacetime curate`")
        base = root.rstrip("/")
        for r in table.select(list(_INDEX_COLUMNS)).to_pylist():
            spec = contract.bucket_for(r["width"], r["height"], r["num_frames"])
            if r["bucket"] is None:
                name = spec.name
            else:
                bucket = contract.Bucket.parse(r["bucket"])
                if bucket.aspect not in contract.ASPECT_CLASSES or bucket.frames not in contract.FRAME_TIERS:
                    raise ValueError(f"{where}: clip {r['clip_id']}: unknown bucket {r['bucket']!r}")
                if bucket.frames > r["num_frames"]:
                    raise ValueError(f"{where}: clip {r['clip_id']} has {r['num_frames']} frames, "
                                     f"fewer than its bucket {r['bucket']} needs")
                name, stale = bucket.name, stale + (bucket != spec)
            rows.append((name, r["clip_id"], f"{base}/{r['shard']}", r["key"], r["num_frames"], r["fps"] or 0.0))
    if stale:
        log.warning("%d index rows name another bucket than the current spec gives (index written "
                    "by an older curation?); the index's buckets are used", stale)
    rows.sort()
    digest = hashlib.sha256("\n".join(f"{r[1]} {r[0]}" for r in rows).encode()).hexdigest()[:16]
    return Samples(shard=[r[2] for r in rows], key=[r[3] for r in rows], clip_id=[r[1] for r in rows],
                   bucket=[r[0] for r in rows], num_frames=np.array([r[4] for r in rows], np.int64),
                   fps=np.array([r[5] for r in rows], np.float64), fingerprint=digest)


# ---------------------------------------------------------------------------------- token math
def latent_tokens(frames: int, width: int, height: int, cfg: LoaderConfig) -> int:
    """Latent patches of a `frames` x `height` x `width` sample (see the module docstring)."""
    pt, ph, pw = cfg.patch
    lt = 1 + (frames - 1) // cfg.vae_temporal
    lh, lw = math.ceil(height / cfg.vae_spatial), math.ceil(width / cfg.vae_spatial)
    return math.ceil(lt / pt) * math.ceil(lh / ph) * math.ceil(lw / pw)


def bucket_weight(name: str, weights: dict[str, float]) -> float:
    """The weight of the last pattern of `weights` that matches `name` (1.0 if none does)."""
    weight = 1.0
    for pattern, w in weights.items():
        if fnmatch.fnmatchcase(name, pattern):
            weight = w
    return weight


@dataclass(frozen=True)
class BucketSpec:
    """One bucket of the plan: its samples (indices into Samples) and how it is batched."""

    name: str
    frames: int  # frames per sample (the frame tier)
    size: tuple[int, int]  # (width, height) of every sample
    tokens: int  # latent tokens per sample
    batch: int  # samples per rank per step
    members: np.ndarray  # indices into Samples, canonical order
    length: int  # samples of this bucket in one epoch (members x multiplier)


def bucket_specs(samples: Samples, cfg: LoaderConfig) -> list[BucketSpec]:
    """Per-bucket batching and epoch length from the token budget and the token weights."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(samples.bucket):
        groups.setdefault(name, []).append(i)
    names = sorted(groups)
    base = {}
    for name in names:
        b = contract.Bucket.parse(name)
        w, h = b.target_size()
        tokens = latent_tokens(b.frames, w, h, cfg)
        batch = max(1, cfg.token_budget // tokens)
        if cfg.max_batch_size:
            batch = min(batch, cfg.max_batch_size)
        base[name] = (b, (w, h), tokens, batch)
    mult = {n: bucket_weight(n, cfg.bucket_weights) for n in names}
    f = cfg.image_token_fraction
    if f is not None:
        mass = {n: mult[n] * len(groups[n]) * base[n][2] for n in names}
        img = sum(m for n, m in mass.items() if base[n][0].frames == 1)
        vid = sum(m for n, m in mass.items() if base[n][0].frames != 1)
        if img > 0 and vid > 0:
            for n in names:
                is_image = base[n][0].frames == 1
                if f >= 1.0 and not is_image:
                    mult[n] = 0.0
                elif f < 1.0 and is_image:
                    mult[n] *= f * vid / ((1.0 - f) * img)
        else:
            log.warning("image_token_fraction=%s ignored: the data has %s", f,
                        "no image bucket" if img == 0 else "no video bucket")
    return [BucketSpec(name=n, frames=base[n][0].frames, size=base[n][1], tokens=base[n][2],
                       batch=base[n][3], members=np.array(groups[n], np.int64),
                       length=int(round(mult[n] * len(groups[n]))))
            for n in names]


# ---------------------------------------------------------------------------------------- plan
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


def plan_steps(specs: list[BucketSpec], state: LoaderState, world_size: int) -> Iterator[Step]:
    """Every global batch from `state` on, endlessly (see the module docstring for the scheme)."""
    seed, epoch, step = state.seed, state.epoch, state.step
    cursors = np.array([state.cursors.get(s.name, 0) for s in specs], np.int64)
    global_batch = np.array([s.batch * world_size for s in specs], np.int64)
    while True:
        seqs = [bucket_sequence(s, seed, epoch) for s in specs]
        lengths = np.array([len(q) for q in seqs], np.int64)
        fresh = not cursors.any()
        produced = False
        while True:
            left = np.maximum(lengths - cursors, 0) // global_batch
            total = int(left.sum())
            if total == 0:
                break
            draw = np.random.default_rng([seed, epoch, int(cursors.sum())]).integers(total)
            b = int(np.searchsorted(np.cumsum(left), draw, side="right"))
            batch = seqs[b][cursors[b]: cursors[b] + global_batch[b]]
            cursors[b] += global_batch[b]
            step += 1
            after = LoaderState(seed, epoch, step, {s.name: int(c) for s, c in zip(specs, cursors) if c})
            yield Step(epoch, step - 1, b, batch, after)
            produced = True
        if fresh and not produced:
            need = ", ".join(f"{s.name}: {s.length} < {s.batch * world_size}" for s in specs)
            raise RuntimeError(f"no bucket holds one full global batch (world size {world_size}): {need}; "
                               "lower token_budget / max_batch_size or add data")
        epoch, step = epoch + 1, 0
        cursors[:] = 0


# ----------------------------------------------------------------------------------- decoding
def frame_stride(fps: float, num_frames: int, frames: int, target_fps: float | None) -> int:
    """Source frames between two sample frames: round(fps / target_fps), shrunk to fit the clip."""
    if target_fps is None or frames <= 1 or fps <= 0:
        return 1
    stride = max(1, round(fps / target_fps))
    return max(1, min(stride, (num_frames - 1) // (frames - 1)))


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """Smallest aspect-preserving size of a width x height frame that covers target (W, H)."""
    tw, th = target
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


def resize_crop(frame: av.VideoFrame, target: tuple[int, int], interpolation: str) -> tuple[np.ndarray, float]:
    """Upright frame, resized to cover `target` and centre-cropped: ([H, W, 3] uint8, cropped fraction)."""
    rotation = int(getattr(frame, "rotation", 0) or 0)
    turned = rotation % 180 != 0
    w, h = (frame.height, frame.width) if turned else (frame.width, frame.height)
    rw, rh = cover_size(w, h, target)
    cw, ch = (rh, rw) if turned else (rw, rh)
    image = frame.reformat(width=cw, height=ch, format="rgb24", interpolation=interpolation).to_ndarray()
    image = upright(image, rotation)
    tw, th = target
    x0, y0 = (rw - tw) // 2, (rh - th) // 2
    return image[y0:y0 + th, x0:x0 + tw], 1.0 - (tw * th) / (rw * rh)


def decode_clip(data: bytes, frames: int, stride: int, target: tuple[int, int], interpolation: str = "AREA",
                threads: int = 1, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Frames 0, stride, 2*stride, ... (`frames` of them) of an encoded clip, decoding no further
    than the last one, each resized+cropped to `target` (W, H): ([3, T, H, W] uint8 (into `out` if
    given), cropped fraction). Planar, so the float conversion of a batch is one contiguous pass."""
    tw, th = target
    if out is None:
        out = np.empty((3, frames, th, tw), np.uint8)
    n, cropped = 0, 0.0
    with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if threads != 1:
            stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i % stride:
                continue
            image, cropped = resize_crop(frame, target, interpolation)
            out[:, n] = image.transpose(2, 0, 1)
            n += 1
            if n == frames:
                break
    if n < frames:
        raise ValueError(f"decoded {n} of the {frames} frames its bucket needs (stride {stride})")
    return out, cropped


def caption_draw(seed: int, epoch: int, clip_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, clip id)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def choose_caption(record: ClipRecord, draw: float, cfg: LoaderConfig) -> str:
    """Empty with probability caption_dropout, else the short caption with probability
    short_caption_prob (when the record has one), else the dense caption."""
    if draw < cfg.caption_dropout:
        return ""
    if draw < cfg.caption_dropout + cfg.short_caption_prob and record.short_caption:
        return record.short_caption
    return record.dense_caption


# ------------------------------------------------------------------------------------ dataset
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
            for k, step in enumerate(plan_steps(self.specs, self.state, self.world_size)):
                if k % workers == worker:
                    yield self.batch(step, reader, worker)
        finally:
            reader.close()

    def load(self, i: int, spec: BucketSpec, epoch: int, reader: ShardReader, out: np.ndarray) -> dict:
        """Sample i decoded into `out` ([3, T, H, W] uint8); returns its caption, id, crop and fps."""
        s = self.samples
        parts = reader.read(s.shard[i], s.key[i])
        record = contract.read_record(parts, where=s.shard[i])
        stride = frame_stride(float(s.fps[i]), int(s.num_frames[i]), spec.frames, self.cfg.target_fps)
        _, cropped = decode_clip(parts[contract.VIDEO_EXT], spec.frames, stride, spec.size,
                                 _INTERPOLATION[self.cfg.interpolation], self.cfg.decode_threads, out)
        caption = choose_caption(record, caption_draw(self.state.seed, epoch, s.clip_id[i]), self.cfg)
        return {"caption": caption, "clip_id": s.clip_id[i], "cropped": cropped, "fps": float(s.fps[i]) / stride}

    def _try(self, i: int, spec: BucketSpec, epoch: int, reader: ShardReader, errors: list,
             out: np.ndarray) -> dict | None:
        try:
            return self.load(i, spec, epoch, reader, out)
        except Exception as err:  # a bad sample never stops training: it is replaced and counted
            errors.append({"clip_id": self.samples.clip_id[i], "shard": self.samples.shard[i], "error": describe(err)})
            return None

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
        video.copy_(source)
        return video if dtype == torch.uint8 else video.mul_(1 / 127.5).sub_(1.0)

    def batch(self, step: Step, reader: ShardReader, worker: int = 0) -> dict:
        t0 = time.perf_counter()
        spec = self.specs[step.bucket]
        mine = step.samples[self.rank * spec.batch: (self.rank + 1) * spec.batch]
        errors: list[dict] = []
        w, h = spec.size
        frames = np.empty((len(mine), 3, spec.frames, h, w), np.uint8)
        loaded = [self._try(int(i), spec, step.epoch, reader, errors, frames[j]) for j, i in enumerate(mine)]
        good = [j for j, x in enumerate(loaded) if x is not None]
        if not good:  # the whole per-rank batch failed: try other samples of the bucket
            rng = np.random.default_rng([step.after.seed, step.epoch, step.step, self.rank, 1])
            failed = set(int(i) for i in mine)
            others = [int(i) for i in rng.permutation(spec.members) if int(i) not in failed]
            for i in others[: self.cfg.max_substitutes]:
                if (x := self._try(i, spec, step.epoch, reader, errors, frames[0])) is not None:
                    loaded[0], good = x, [0]
                    break
            else:
                raise RuntimeError(f"bucket {spec.name}: no sample of step {step.step} (epoch {step.epoch}) "
                                   f"nor {self.cfg.max_substitutes} substitutes decoded; last: {errors[-1]}")
        for j, x in enumerate(loaded):  # a failed sample becomes a copy of a good one of the batch
            if x is None:
                source = good[j % len(good)]
                loaded[j] = loaded[source]
                frames[j] = frames[source]
        video = self.to_tensor(frames)
        stats = {"epoch": step.epoch, "step": step.step, "bucket": spec.name, "samples": len(loaded),
                 "tokens": len(loaded) * spec.tokens, "worker": worker,
                 "cropped_fraction": float(np.mean([x["cropped"] for x in loaded])),
                 "corrupt": len(errors), "errors": errors, "decode_s": time.perf_counter() - t0,
                 "_state": asdict(step.after)}
        return {"video": video, "caption": [x["caption"] for x in loaded],
                "clip_id": [x["clip_id"] for x in loaded], "bucket": spec.name,
                "fps": [x["fps"] for x in loaded], "stats": stats}


# ------------------------------------------------------------------------------------- loader
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

    def add(self, stats: dict) -> None:
        self.steps += 1
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
                "cropped_fraction": {b: self.cropped[b] / n for b, n in self.samples.items() if n}}


class BucketLoader:
    """Bucket-homogeneous batches for one rank, resumable from `state_dict()`.

    rank / world_size default to torch.distributed's when a process group is initialised, else 0 / 1.
    Iterating starts DataLoader workers at the current state and streams batches endlessly (epochs
    roll over); stop whenever, the state follows the batches handed out.
    """

    def __init__(self, cfg: LoaderConfig, rank: int | None = None, world_size: int | None = None):
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if dist else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        self.cfg = cfg
        self.samples = read_index(cfg.data, cfg.s3)
        self.specs = bucket_specs(self.samples, cfg)
        self.state = LoaderState(seed=cfg.seed)
        self.stats = LoaderStats()
        if not self.steps_per_epoch():
            sizes = ", ".join(f"{r['bucket']}: {r['epoch_samples_planned']} < {self.world_size} x {r['batch_per_rank']}"
                              for r in self.describe())
            raise ValueError(f"{cfg.data}: no bucket fills one global batch ({sizes}); lower token_budget or "
                             "max_batch_size, or add data")
        if self.rank == 0:
            for row in self.describe():
                if row["epoch_samples_planned"] and not row["steps_per_epoch"]:
                    log.warning("bucket %s: %d samples per epoch, less than one global batch (%d x %d): "
                                "never used", row["bucket"], row["epoch_samples_planned"], self.world_size,
                                row["batch_per_rank"])
                log.info("bucket %(bucket)s: %(samples)d samples, %(width)dx%(height)d x %(frames)d frames, "
                         "%(tokens_per_sample)d tokens/sample, batch %(batch_per_rank)d/rank, "
                         "%(steps_per_epoch)d steps/epoch, token share %(token_share).3f", row)

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
        if next_epoch and self.rank == 0:
            log.info("loader: epoch %d starts", stats["epoch"])
        self.state = after
        self.stats.add(stats)
        for err in stats["errors"]:
            log.error("corrupt sample %s in %s skipped (replaced in its batch): %s",
                      err["clip_id"], err["shard"], err["error"])
        every = self.cfg.log_every
        if every and self.rank == 0 and self.stats.steps % every == 0:
            log.info("loader step %d (epoch %d): %s x%d, %d tokens, wait %.3fs, decode %.3fs, cropped %.3f, "
                     "corrupt so far %d", stats["step"], stats["epoch"], stats["bucket"], stats["samples"],
                     stats["tokens"], stats["wait_s"], stats["decode_s"], stats["cropped_fraction"],
                     self.stats.corrupt)
