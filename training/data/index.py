"""The sample table and the per-bucket batching the loader plans with.

    samples = read_index(cfg.data, cfg.s3)   # every row of shards/index.parquet, with its bucket
    specs = bucket_specs(samples, cfg)       # per bucket: size, tokens/sample, batch, epoch length
    train = read_index(cfg.data, cfg.s3, holdout=0.05, part="train")   # less the held-out sources

Held out. A fraction of the SOURCES is kept for validation (training.validate): a source is held out
when the hash of its content digest (from the output's sources manifest; its URI where an output
has none) falls below `holdout` (`held_out`). All clips of a source fall on one side, so near-identical
shots of one video never straddle the split; the choice depends on nothing else (not the seed, not
the other data), so a run, its resume, the cache builder and `spacetime eval` make the same one, and a
smaller fraction holds out a subset of a larger one's sources.

Buckets. Every row of shards/index.parquet is assigned to the bucket its `bucket` column names,
through the same spec curation wrote it with (`spacetime.contract.Bucket.parse`; `bucket_for` when
the column is null): no tar is opened to plan. Images are 1-frame videos (frame tier 1). A sample
of bucket `A_Rp_Ff` gives the FIRST F frames of its clip at the clip's fps (training.data.decode
picks and resizes them) at the bucket's `Bucket.target_size()`.

Token budget. Tokens of a sample = latent frames x latent height x latent width / patch volume
with latent frames = 1 + (F - 1) // vae_temporal (causal first frame), latent size = size /
vae_spatial, each divided by the patch (t, h, w) rounded up. Batch per rank and bucket =
max(1, token_budget // tokens), capped by max_batch_size.

Sampling, in tokens. A bucket's natural token mass is (its samples) x (tokens per sample);
`bucket_weights` (fnmatch patterns, last match wins) multiply it, and `image_token_fraction`
rescales image buckets so they carry that share of the epoch's tokens. A multiplier m makes an
epoch draw round(m x n) samples of a bucket of n: a random subset when m < 1 (a new one each
epoch), whole passes plus a partial one when m > 1 (only then does a sample repeat within an
epoch); training.data.plan draws them. The planned token share of every bucket is logged at start
(`BucketLoader.describe()`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from spacetime import contract
from spacetime.config import S3Config
from spacetime.errors import MissingInput
from spacetime.store import Store
from training.config import LoaderConfig

log = logging.getLogger(__name__)

_INDEX_COLUMNS = ("shard", "key", "clip_id", "width", "height", "num_frames", "fps", "bucket")
# The source each row came from: a curation index names its URI (mapped to the content digest by the
# sources manifest); a latent cache (training.cache) stores the digest itself.
_SOURCE_COLUMNS = ("source_uri", "source_digest")


def held_out(source: str, fraction: float) -> bool:
    """Whether the source of digest (or URI) `source` is held out at `fraction` (module docstring)."""
    if fraction <= 0:
        return False
    draw = int(hashlib.sha256(f"spacetime-holdout:{source}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return draw < fraction


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
    width: np.ndarray  # int, of the stored clip
    height: np.ndarray  # int
    fingerprint: str  # of the (clip id, bucket) list; a resume on other data is refused
    source: list[str]  # each clip's source: content digest, or URI where the output has no digests
    # Latent caches (training.cache) instead of curation outputs: shard/key address cache entries;
    # the empty caption's encoding [n, D] and the padded text length come with them.
    cached: bool = False
    null_text: np.ndarray | None = None
    max_length: int = 0

    def __len__(self) -> int:
        return len(self.key)


def index_path(root: str, s3: S3Config) -> tuple[Store, str]:
    """(store, relative path) of a data root's index: the version latest.json points at (readers never
    see a half-published one), or a latent cache's (its cache.json says state complete only once the
    index is written). MissingInput, naming the root, if there is none: the trainer checks every root
    this way before it loads a model."""
    store = Store(root, s3)
    if contract.is_cache(store):
        if not store.exists(contract.CACHE_INDEX):
            raise MissingInput(f"{store.uri_of(contract.CACHE_INDEX)}: no index: the latent cache is unfinished; "
                               "rerun the same `spacetime train cache` command to complete it")
        return store, contract.CACHE_INDEX
    rel = contract.published_index(store)
    if not store.exists(rel):
        raise MissingInput(f"{store.uri_of(rel)}: no index; is {root} the --output of `spacetime curate`?")
    return store, rel


def _read_index_table(root: str, s3: S3Config):
    store, rel = index_path(root, s3)
    return pq.read_table(store.path(rel), filesystem=store.fs), store.uri_of(rel)


def _row_bucket(row: dict, where: str) -> tuple[str, bool]:
    """The bucket an index row names (the current spec's when the column is null), and whether the
    current spec would give another one."""
    spec = contract.bucket_for(row["width"], row["height"], row["num_frames"])
    if row["bucket"] is None:
        return spec.name, False
    bucket = contract.Bucket.parse(row["bucket"])
    if bucket.aspect not in contract.ASPECT_CLASSES or bucket.frames not in contract.FRAME_TIERS:
        raise ValueError(f"{where}: clip {row['clip_id']}: unknown bucket {row['bucket']!r}")
    if bucket.frames > row["num_frames"]:
        raise ValueError(f"{where}: clip {row['clip_id']} has {row['num_frames']} frames, "
                         f"fewer than its bucket {row['bucket']} needs")
    return bucket.name, bucket != spec


def read_index(data: list[str], s3: S3Config, holdout: float = 0.0, part: str = "all",
               whole: list[str] | tuple = ()) -> Samples:
    """Read the published index of every data directory (contract.published_index) and assign each
    row its bucket. `part`: "all" rows, the "train" rows (sources not held out at `holdout`) or the
    held-out "val" rows (module docstring) of `data`; and every row of `whole` (outputs used only
    for validation: eval.data)."""
    if not data and not whole:
        raise ValueError("loader.data is empty: give the curation output directories to train on")
    if part not in ("all", "train", "val"):
        raise ValueError(f"part {part!r}: expected all, train or val")
    rows: list[tuple] = []
    stale = 0
    cache = _cache_of([*data, *whole], s3)
    for root in [*data, *whole]:
        table, where = _read_index_table(root, s3)
        missing = [c for c in _INDEX_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{where}: index lacks columns {missing}; rerun `spacetime curate`")
        base = root.rstrip("/")
        split = part != "all" and root not in whole
        sources = _sources_of(root, s3, table, where, needed=split and holdout > 0)
        for r, source in zip(table.select(list(_INDEX_COLUMNS)).to_pylist(), sources):
            if split and held_out(source, holdout) != (part == "val"):
                continue
            name, changed = _row_bucket(r, where)
            stale += changed
            rows.append((name, r["clip_id"], f"{base}/{r['shard']}", r["key"], r["num_frames"], r["fps"] or 0.0,
                         r["width"], r["height"], source))
    if stale:
        log.warning("%d index rows name another bucket than the current spec gives (index written "
                    "by an older curation?); the index's buckets are used", stale)
    rows.sort()
    digest = hashlib.sha256("\n".join(f"{r[1]} {r[0]}" for r in rows).encode()).hexdigest()[:16]
    return Samples(shard=[r[2] for r in rows], key=[r[3] for r in rows], clip_id=[r[1] for r in rows],
                   bucket=[r[0] for r in rows], num_frames=np.array([r[4] for r in rows], np.int64),
                   fps=np.array([r[5] for r in rows], np.float64), width=np.array([r[6] for r in rows], np.int64),
                   height=np.array([r[7] for r in rows], np.int64), fingerprint=digest,
                   source=[r[8] for r in rows], **cache)


def _sources_of(root: str, s3: S3Config, table, where: str, needed: bool) -> list[str]:
    """Each index row's source: the cache's digest column, or the curation index's URI mapped to its
    digest by the published sources manifest (the URI itself where there is none). `needed`: a
    held-out split depends on it, so an index that names no source is an error."""
    if "source_digest" in table.column_names:
        return table.column("source_digest").to_pylist()
    if "source_uri" not in table.column_names:
        if needed:
            raise ValueError(f"{where}: the index names no source, so no source can be held out; rebuild it "
                             "(`spacetime train cache --rebuild` for a latent cache) or set eval.fraction: 0")
        return [""] * table.num_rows
    uris = table.column("source_uri").to_pylist()
    store = Store(root, s3)
    manifest = contract.published_file(store, contract.SOURCES_MANIFEST)
    if not store.exists(manifest):
        return uris
    m = pq.read_table(store.path(manifest), columns=["uri", "digest"], filesystem=store.fs)
    digests = dict(zip(m.column("uri").to_pylist(), m.column("digest").to_pylist()))
    return [digests.get(u) or u for u in uris]


def _cache_of(data: list[str], s3: S3Config) -> dict:
    """Samples' cache fields: {} for curation outputs, the null text and length for latent caches
    (all of `data` one or the other, with one key: training.cache.training_cache checks)."""
    import json

    stores = [Store(root, s3) for root in data]
    caches = [contract.is_cache(st) for st in stores]
    if not any(caches):
        return {}
    if not all(caches):
        raise ValueError(f"loader.data {data} mixes latent caches and curation outputs")
    from training.data.latents import npy_load

    manifest = json.loads(stores[0].read_bytes(contract.CACHE_MANIFEST))
    if manifest["state"] != "complete":
        raise ValueError(f"{data[0]}: the latent cache is unfinished; rerun `spacetime train cache` to complete it")
    return {"cached": True, "null_text": npy_load(stores[0].read_bytes(contract.CACHE_NULL_TEXT)),
            "max_length": int(manifest["max_length"])}


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


# -------------------------------------------------------------------------------- bucket specs
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


@dataclass(frozen=True)
class _Shape:
    frames: int
    size: tuple[int, int]
    tokens: int
    batch: int


def _bucket_shape(name: str, cfg: LoaderConfig) -> _Shape:
    """Frames, size, tokens per sample and batch per rank of bucket `name`."""
    bucket = contract.Bucket.parse(name)
    w, h = bucket.target_size()
    tokens = latent_tokens(bucket.frames, w, h, cfg)
    batch = max(1, cfg.token_budget // tokens)
    if cfg.max_batch_size:
        batch = min(batch, cfg.max_batch_size)
    return _Shape(bucket.frames, (w, h), tokens, batch)


def _apply_image_fraction(mult: dict[str, float], sizes: dict[str, int], shapes: dict[str, _Shape],
                          fraction: float) -> None:
    """Rescale the multipliers in place so image buckets carry `fraction` of the epoch's tokens."""
    mass = {n: mult[n] * sizes[n] * shapes[n].tokens for n in mult}
    img = sum(m for n, m in mass.items() if shapes[n].frames == 1)
    vid = sum(m for n, m in mass.items() if shapes[n].frames != 1)
    if img <= 0 or vid <= 0:
        log.warning("image_token_fraction=%s ignored: the data has %s", fraction,
                    "no image bucket" if img == 0 else "no video bucket")
        return
    for n in mult:
        is_image = shapes[n].frames == 1
        if fraction >= 1.0 and not is_image:
            mult[n] = 0.0
        elif fraction < 1.0 and is_image:
            mult[n] *= fraction * vid / ((1.0 - fraction) * img)


def bucket_specs(samples: Samples, cfg: LoaderConfig) -> list[BucketSpec]:
    """Per-bucket batching and epoch length from the token budget and the token weights."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(samples.bucket):
        groups.setdefault(name, []).append(i)
    names = sorted(groups)
    shapes = {n: _bucket_shape(n, cfg) for n in names}
    mult = {n: bucket_weight(n, cfg.bucket_weights) for n in names}
    if cfg.image_token_fraction is not None:
        _apply_image_fraction(mult, {n: len(groups[n]) for n in names}, shapes, cfg.image_token_fraction)
    return [BucketSpec(name=n, frames=shapes[n].frames, size=shapes[n].size, tokens=shapes[n].tokens,
                       batch=shapes[n].batch, members=np.array(groups[n], np.int64),
                       length=int(round(mult[n] * len(groups[n]))))
            for n in names]
