"""The data contract: clip ids, the bucket spec, the shard sample layout and the output paths.

This is the ONLY module that knows file names inside a tar or under an output directory; the sample
metadata `<key>.json` is the typed `spacetime.record.ClipRecord`. The curation writer and every reader
(the trainer's loader, `spacetime caption`, captioner fine-tuning, the report) import it.

Output layout (OUT is the `--output` of `spacetime curate`):
    shards/<bucket>/<bucket>-UUUUUU-NNNN.tar   WebDataset samples (unit U, shard N): <key>.mp4 .json .txt
    shards/index.parquet                  one row per sample (INDEX_SCHEMA)
    manifest/sources.parquet              every input and its fate
    manifest/clips.parquet                every candidate clip, kept or not, with its reason
    summary.json                          counts, hours, stage times, throughput
    versions/vNNNNNN/, latest.json        each published version's index, manifests and summary; the pointer
A sample's key is its clip id. Images are one-frame videos and share the layout.

Latent cache layout (CACHE is the --output of `spacetime train cache`; see the "latent cache"
section below): cache.json, index.parquet, shards/NNNNNN.tar, null_text.npy, .work/units/.
"""

from __future__ import annotations

import hashlib
import math
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

from spacetime.config import S3Config, StrictModel
from spacetime.io import atomic_path, s3_filesystem
from spacetime.record import ClipRecord

# ---------------------------------------------------------------------------------------- paths
SHARDS_DIR = "shards"
INDEX_PATH = "shards/index.parquet"
SOURCES_MANIFEST = "manifest/sources.parquet"
CLIPS_MANIFEST = "manifest/clips.parquet"
SUMMARY_PATH = "summary.json"
VERSIONS_DIR = "versions"  # versions/vNNNNNN/: the index, manifests and summary of each published version
LATEST_PATH = "latest.json"  # {"version": N, "path": "versions/vNNNNNN"}: written after that version's files
REPORT_DIR = "report"
CAPTIONS_MANIFEST = "manifest/captions.parquet"  # `spacetime caption` (recaption) outputs
CAPTION_SUMMARY = "caption_summary.json"
WORK_DIR = ".work"  # staging and per-source completion records; resumable state of a run
LOGS_DIR = "logs"  # ray.log: Ray's own messages of the runs (the console keeps ours)
LEASE_PATH = f"{WORK_DIR}/lease.json"  # the live run's lease on the output (spacetime.lease)
REVIEW_DIR = "review"  # people's decisions on clips (`spacetime review`): one Parquet file each (spacetime.review)

# Extensions of one sample inside a tar: the clip (native resolution), its record, its dense caption.
VIDEO_EXT, RECORD_EXT, CAPTION_EXT = "mp4", "json", "txt"
SAMPLE_EXTS = (VIDEO_EXT, RECORD_EXT, CAPTION_EXT)


def version_dir(version: int) -> str:
    """Relative folder of a published version's metadata: versions/v000001."""
    return f"{VERSIONS_DIR}/v{version:06d}"


def version_file(folder: str, rel: str) -> str:
    """Where a published version keeps its copy of the stable file `rel` (e.g. shards/index.parquet):
    <folder>/<file name>, folder = version_dir(n) or the `path` of latest.json."""
    return f"{folder}/{Path(rel).name}"


def published_file(store, rel: str) -> str:
    """Where a reader should read the stable file `rel` (INDEX_PATH, a manifest, SUMMARY_PATH) on
    `store` (a spacetime.store.Store): the copy of the version latest.json points at, else (an output
    written before versions) `rel` itself."""
    import json

    if store.exists(LATEST_PATH):
        return version_file(json.loads(store.read_bytes(LATEST_PATH))["path"], rel)
    return rel


def published_index(store) -> str:
    """The index a reader should read on `store`: `published_file(store, INDEX_PATH)`."""
    return published_file(store, INDEX_PATH)


def shard_path(bucket: str, number: int, unit: int = 0) -> str:
    """Relative path of shard `number` of work unit `unit` in `bucket`:
    shards/<bucket>/<bucket>-<unit:06d>-<number:04d>.tar (a unit's shards depend on its sources only)."""
    return f"{SHARDS_DIR}/{bucket}/{bucket}-{unit:06d}-{number:04d}.tar"


# ------------------------------------------------------------------------------------- clip ids
def clip_id(source_digest: str, start_frame: int, end_frame: int) -> str:
    """Content-addressed clip id: same source bytes and span -> same id on any machine or run.

    `source_digest` is the source's content digest (see curation.sources); frames are decoded-frame
    indices of the source, `end_frame` exclusive. 20 hex chars (80 bits) keep collisions negligible
    for billions of clips while staying short enough to be a WebDataset key (no dots allowed).
    """
    text = f"{source_digest}:{start_frame}:{end_frame}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------- bucket spec
# Aspect classes as width/height; a clip goes to the nearest class in log space.
ASPECT_CLASSES: dict[str, float] = {
    "9x21": 9 / 21, "9x16": 9 / 16, "3x4": 3 / 4, "1x1": 1.0, "4x3": 4 / 3, "16x9": 16 / 9, "21x9": 21 / 9,
}
# Resolution tiers by the short side in pixels: a clip's tier is the largest tier <= its short side.
RESOLUTION_TIERS: tuple[int, ...] = (144, 240, 360, 480, 720, 1080, 2160)
# Frame tiers: a clip's tier is the largest tier <= its frame count; 1 is the image tier. The top
# tiers hold a minute at the common native rates: 1440 = 60 s at 24 fps, 1800 at 30, 3600 at 60
# (a sample of such a bucket is ~10^5-10^6 latent tokens: train it with parallel.context).
FRAME_TIERS: tuple[int, ...] = (1, 16, 32, 64, 128, 256, 512, 1024, 1440, 1800, 3600)
# Bucket target sizes are multiples of this (VAE 8x spatial compression x 2x2 latent patches).
SIZE_MULTIPLE = 16


@dataclass(frozen=True)
class Bucket:
    aspect: str  # key of ASPECT_CLASSES
    resolution: int  # short side tier, pixels (0: below the smallest tier)
    frames: int  # frame tier (0: below... never: every clip has >= 1 frame)

    @property
    def name(self) -> str:
        return f"{self.aspect}_{self.resolution}p_{self.frames}f"

    @classmethod
    def parse(cls, name: str) -> "Bucket":
        aspect, res, frames = name.split("_")
        return cls(aspect, int(res.rstrip("p")), int(frames.rstrip("f")))

    def target_size(self) -> tuple[int, int]:
        """(width, height) a trainer resizes+crops to: short side = tier, long side by the class ratio,
        both rounded to SIZE_MULTIPLE. Clips are never upscaled past their tier by construction."""
        ratio = ASPECT_CLASSES[self.aspect]
        short = max(self.resolution, SIZE_MULTIPLE)
        def rnd(x: float) -> int:
            return max(SIZE_MULTIPLE, int(x // SIZE_MULTIPLE) * SIZE_MULTIPLE)
        if ratio >= 1:
            return rnd(short * ratio), rnd(short)
        return rnd(short), rnd(short / ratio)


def bucket_for(width: int, height: int, num_frames: int) -> Bucket:
    """The bucket of a clip of `width` x `height` displayed pixels and `num_frames` frames."""
    if width <= 0 or height <= 0 or num_frames <= 0:
        raise ValueError(f"bucket_for: invalid clip size {width}x{height}x{num_frames}")
    log_ratio = math.log(width / height)
    aspect = min(ASPECT_CLASSES, key=lambda k: abs(math.log(ASPECT_CLASSES[k]) - log_ratio))
    short = min(width, height)
    resolution = max([t for t in RESOLUTION_TIERS if t <= short], default=0)
    frames = max(t for t in FRAME_TIERS if t <= num_frames)
    return Bucket(aspect, resolution, frames)


# ------------------------------------------------------------------------------------ schemas
INDEX_SCHEMA = pa.schema([
    ("shard", pa.string()),  # relative to OUT, e.g. shards/16x9_360p_64f/16x9_360p_64f-000000.tar
    ("key", pa.string()),
    ("clip_id", pa.string()),
    ("source_uri", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("num_frames", pa.int32()),
    ("fps", pa.float64()),
    ("duration", pa.float64()),
    ("bucket", pa.string()),
    ("has_caption", pa.bool_()),
])

SOURCES_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("digest", pa.string()),
    ("digest_kind", pa.string()),  # sha256 (content) | size-etag (remote, see curation.sources)
    ("size_bytes", pa.int64()),
    ("stream_digest", pa.string()),  # sha256 of the coded pictures (curation.probe.stream_digest), or null
    ("status", pa.string()),  # ok | failed | duplicate (same content, or coded pictures, as `duplicate_of`)
    ("error", pa.string()),
    ("duplicate_of", pa.string()),  # the URI of the source with the same content, processed once
    ("container", pa.string()),
    ("codec", pa.string()),
    ("width", pa.int32()),  # displayed (rotation applied)
    ("height", pa.int32()),
    ("rotation", pa.int32()),
    ("fps", pa.float64()),
    ("vfr", pa.bool_()),
    ("duration", pa.float64()),
    ("num_frames", pa.int64()),  # decoded frames
    ("decode_errors", pa.int64()),  # packets whose decode failed (damage): their frames are not in num_frames
    ("pix_fmt", pa.string()),
    ("has_audio", pa.bool_()),
    ("cuts", pa.list_(pa.list_(pa.int64()))),  # [start_frame, end_frame) of each transition
    ("num_clips", pa.int32()),
    ("num_kept", pa.int32()),
])

# Every filter score a clip record can hold (`ClipRecord.scores`), one float column each in the clips
# manifest's `scores` struct (null where the filter did not measure it): DuckDB / pandas / pyarrow
# filter on `scores.aesthetic > 5` with no JSON. A filter that adds a score adds its name here.
SCORE_FIELDS: tuple[str, ...] = (
    "aesthetic",  # filters.aesthetic: CLIP + aesthetic head, ~1..10
    "motion", "shake", "camera_pan_x", "camera_pan_y", "camera_zoom",  # filters.motion: optical flow
    "sharpness",  # filters.sharpness: variance of the Laplacian
    "luma_mean", "luma_clipped",  # filters.exposure
    "picture_area",  # filters.borders: fraction of the frame inside black borders (1.0: none; record schema 2)
    "text_area", "text_band",  # filters.text: burned-in text (PP-OCR); band rows (+ bottom, - top)
    "caption_alignment", "short_caption_alignment",  # filters.alignment: CLIP cosine, caption vs frames
)
CAPTION_SCORES = ("caption_alignment", "short_caption_alignment")  # of a caption: stale when it is replaced
SCORES_TYPE = pa.struct([(name, pa.float64()) for name in SCORE_FIELDS])


def score_columns(scores: dict[str, float] | None) -> dict[str, float | None]:
    """A record's scores as the manifest's struct (every field; null where not measured). An unknown
    score name is an error: it would otherwise vanish from the manifest."""
    scores = scores or {}
    unknown = sorted(set(scores) - set(SCORE_FIELDS))
    if unknown:
        raise ValueError(f"scores {unknown} are not in spacetime.contract.SCORE_FIELDS: add them there")
    return {name: (float(scores[name]) if name in scores else None) for name in SCORE_FIELDS}


# Scores renamed since: the old name -> the new one, read from older outputs (spacetime.record too).
RENAMED_SCORES = {"border_area": "picture_area"}  # schema 1 named the share KEPT inside the bars so


def upgrade_scores(scores: dict[str, float]) -> dict[str, float]:
    """Scores of an older output under today's names."""
    return {RENAMED_SCORES.get(k, k): v for k, v in scores.items()}


def scores_of(value) -> dict[str, float]:
    """A manifest row's `scores` -> {name: value} of the measured ones; reads the struct, and the JSON
    string that outputs written before typed scores hold, under today's names (RENAMED_SCORES)."""
    import json

    if value is None:
        return {}
    if isinstance(value, str):
        return upgrade_scores(json.loads(value or "{}"))
    return upgrade_scores({k: v for k, v in value.items() if v is not None})


# The captioner's structured fields besides the dense caption (the clips manifest's `caption_fields`).
CAPTION_FIELDS_TYPE = pa.struct([
    ("short", pa.string()), ("subjects", pa.list_(pa.string())), ("actions", pa.list_(pa.string())),
    ("scene", pa.string()), ("camera_motion", pa.string()), ("shot_type", pa.string()), ("lighting", pa.string()),
    ("style", pa.string()), ("on_screen_text", pa.string()),
])

# A caption field checked against the pipeline's measurements (curation.grounding; record `grounding`).
GROUNDING_TYPE = pa.list_(pa.struct([("field", pa.string()), ("claim", pa.string()), ("measured", pa.string()),
                                     ("verdict", pa.string())]))

CLIPS_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("source_uri", pa.string()),
    ("start_frame", pa.int64()),
    ("end_frame", pa.int64()),  # exclusive, in source frames
    ("start_time", pa.float64()),  # seconds
    ("end_time", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("num_frames", pa.int32()),
    ("fps", pa.float64()),
    ("status", pa.string()),  # kept | rejected | failed
    ("reason", pa.string()),
    ("duplicate_of", pa.string()),  # a near-duplicate's kept clip (reason `duplicate`)
    ("bucket", pa.string()),
    ("extract_mode", pa.string()),  # copy | partial | reencode | copy_only
    ("skip_frames", pa.int32()),  # leading frames of the clip file before its span (copy_only clips)
    ("scores", SCORES_TYPE),  # every filter score, typed (SCORE_FIELDS); null where not measured
    ("ocr_text", pa.string()),  # burned-in text the text filter read
    ("caption", pa.string()),
    ("caption_fields", CAPTION_FIELDS_TYPE),  # the structured caption (null without one)
    ("grounding", GROUNDING_TYPE),  # its fields checked: agrees | contradicts | unknown (curation.grounding)
    ("shard", pa.string()),
])


# The typed (Arrow) view of `<key>.json` (spacetime.record.ClipRecord), for readers that need a schema
# up front: Hugging Face `datasets` infers one from a shard's first 5 samples, and a field that is
# null there (an open-ended span's end_pts, a crop, a caption) and set later breaks that inference.
# The provenance dicts keep their main keys here (the JSON in the tar keeps everything).
_CAPTION_ARROW = pa.struct([
    ("dense", pa.string()), ("short", pa.string()), ("subjects", pa.list_(pa.string())),
    ("actions", pa.list_(pa.string())), ("scene", pa.string()), ("camera_motion", pa.string()),
    ("shot_type", pa.string()), ("lighting", pa.string()), ("style", pa.string()), ("on_screen_text", pa.string()),
    ("provenance", pa.struct([("engine", pa.string()), ("model", pa.string()), ("model_digest", pa.string()),
                              ("prompt_version", pa.string()), ("prompt_hash", pa.string()), ("seed", pa.int64()),
                              ("frames", pa.int64())])),
])
RECORD_ARROW = pa.struct([
    ("schema_version", pa.int64()), ("clip_id", pa.string()),
    ("source", pa.struct([("uri", pa.string()), ("digest", pa.string()), ("digest_kind", pa.string())])),
    ("span", pa.struct([("start_frame", pa.int64()), ("end_frame", pa.int64()), ("start_time", pa.float64()),
                        ("end_time", pa.float64()), ("start_pts", pa.int64()), ("end_pts", pa.int64())])),
    ("fps", pa.float64()), ("width", pa.int64()), ("height", pa.int64()), ("num_frames", pa.int64()),
    ("duration", pa.float64()), ("rotation", pa.int64()), ("crop", pa.list_(pa.int64())), ("bucket", pa.string()),
    ("extract_mode", pa.string()), ("skip_frames", pa.int64()), ("sampled_idx", pa.list_(pa.int64())),
    ("scores", SCORES_TYPE), ("ocr_text", pa.string()), ("caption", _CAPTION_ARROW), ("grounding", GROUNDING_TYPE),
    ("provenance", pa.struct([("spacetime", pa.string()), ("torch", pa.string()), ("av", pa.string())])),
])
SAMPLE_ARROW = pa.schema([(VIDEO_EXT, pa.binary()), (RECORD_EXT, RECORD_ARROW), (CAPTION_EXT, pa.string()),
                          ("__key__", pa.string()), ("__url__", pa.string())])


def hf_features():
    """`datasets.Features` of a shard sample (mp4 bytes, the typed record, the dense caption), for
    load_dataset("webdataset", data_files=..., features=hf_features()). Needs `datasets`."""
    import datasets

    return datasets.Features.from_arrow_schema(SAMPLE_ARROW)


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of exactly `schema` (missing fields become nulls, extra ones are dropped)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


CAPTIONS_SCHEMA = pa.schema([  # `spacetime caption` output: every clip and its caption verdict
    ("clip_id", pa.string()),
    ("shard", pa.string()),  # the input shard (the output shard has the same path when ok)
    ("status", pa.string()),  # ok | failed
    ("reason", pa.string()),
    ("attempts", pa.int32()),
    ("caption", pa.string()),
    ("short", pa.string()),
    ("provenance", pa.string()),  # JSON
])


# ------------------------------------------------------------------------------------- shards
def write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> None:
    """Write WebDataset samples ({"__key__": key, ext: bytes}) to `path` atomically, with
    webdataset's TarWriter and fixed mtime/owner/mode, so the bytes depend only on the samples."""
    import webdataset as wds

    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        with wds.TarWriter(stream, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
            for sample in samples:
                writer.write(sample)


def write_shard(path: Path, samples: Iterable[tuple[bytes, ClipRecord]]) -> None:
    """Write samples (clip video bytes, its record) to `path` atomically: <key>.mp4, <key>.json,
    <key>.txt (the dense caption, empty without one), key = the record's clip id."""
    write_tar(path, ({"__key__": record.clip_id, VIDEO_EXT: video, RECORD_EXT: record.to_json(),
                      CAPTION_EXT: record.dense_caption.encode()} for video, record in samples))


class ShardReader:
    """Reads samples of WebDataset tars, local or s3://: each shard's member offsets are scanned
    once (cached), then a sample is one ranged read. A sample is {"__key__": key, ext: bytes}.

        reader = ShardReader(s3_config)
        reader.read(uri, key)        # one sample, random access
        for sample in reader.samples(uri): ...   # every sample, in tar order
        record = read_record(sample, where=uri)
    """

    def __init__(self, s3: S3Config | None = None, max_open: int = 16, max_indexed: int = 256):
        self.s3_cfg, self.max_open, self.max_indexed = s3 or S3Config(), max_open, max_indexed
        self._s3 = None
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._members: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()

    def _file(self, uri: str):
        f = self._files.pop(uri, None)
        if f is None:
            if uri.startswith("s3://"):
                if self._s3 is None:
                    self._s3 = s3_filesystem(self.s3_cfg)
                f = self._s3.open_input_file(uri[len("s3://"):])
            else:
                f = open(uri, "rb")
            while len(self._files) >= self.max_open:
                self._files.popitem(last=False)[1].close()
        self._files[uri] = f
        return f

    def _index(self, uri: str) -> dict[str, tuple[int, int]]:
        """{member name: (data offset, size)} of the shard, in tar order."""
        members = self._members.pop(uri, None)
        if members is None:
            f = self._file(uri)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                members = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
            while len(self._members) >= self.max_indexed:
                self._members.popitem(last=False)
        self._members[uri] = members
        return members

    def _read_spans(self, uri: str, key: str, spans: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        lo = min(o for o, _ in spans.values())
        hi = max(o + n for o, n in spans.values())
        f = self._file(uri)
        f.seek(lo)
        buf = f.read(hi - lo)
        return {"__key__": key, **{ext: bytes(buf[o - lo: o - lo + n]) for ext, (o, n) in spans.items()}}

    def read(self, uri: str, key: str, exts: tuple[str, ...] = SAMPLE_EXTS,
             required: str = VIDEO_EXT) -> dict[str, bytes]:
        """Sample `key` of shard `uri`: the members of `exts` it has (`required` must be there)."""
        members = self._index(str(uri))
        spans = {ext: members[f"{key}.{ext}"] for ext in exts if f"{key}.{ext}" in members}
        if required not in spans:
            raise KeyError(f"{uri}: no member {key}.{required}")
        return self._read_spans(str(uri), key, spans)

    def samples(self, uri: str | Path) -> Iterator[dict[str, bytes]]:
        """Every sample of shard `uri` in tar order (members <key>.<ext>; keys have no dots)."""
        uri = str(uri)
        grouped: dict[str, dict[str, tuple[int, int]]] = {}
        for name, span in self._index(uri).items():
            key, _, ext = name.rpartition("/")[2].partition(".")
            grouped.setdefault(key, {})[ext] = span
        for key, spans in grouped.items():
            yield self._read_spans(uri, key, spans)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shard(path: str | Path, s3: S3Config | None = None) -> Iterator[dict[str, bytes]]:
    """Every sample of one shard, in tar order (see ShardReader.samples)."""
    with ShardReader(s3) as reader:
        yield from reader.samples(path)


def read_record(sample: dict[str, bytes], where: str = "") -> ClipRecord:
    """The typed record of a sample read from a shard (errors name `where` and the key)."""
    if RECORD_EXT not in sample:
        raise KeyError(f"{where}: sample {sample.get('__key__')} has no {RECORD_EXT} member")
    return ClipRecord.from_json(sample[RECORD_EXT], where=f"{where}:{sample.get('__key__')}.{RECORD_EXT}")


# ---------------------------------------------------------------------------------- latent cache
# CACHE, the --output of `spacetime train cache` (training.cache): what a DiT step needs of a clip,
# precomputed, so training from CACHE decodes no video and runs no VAE or text encoder.
#   cache.json              the manifest (CACHE_FORMAT): the cache key (VAE and text-encoder
#                           fingerprints, frame sampling), the data it covers, state building|complete;
#                           rewritten with state complete LAST, after the index
#   index.parquet           one row per cached clip (CACHE_INDEX_SCHEMA); `shard` relative to CACHE
#   shards/NNNNNN.tar       work unit N's entries, <key> = clip id:
#                             <key>.latent.npy  float32 [2, C, T', H', W']: the VAE posterior's mean
#                                               and log-variance (UNnormalised) at the bucket's size
#                                               and frame sampling
#                             <key>.text.npy    float32 [n, D]: the dense caption's encoder output, its
#                                               n unmasked tokens (padding restored on reading)
#                             <key>.short.npy   the same for the short caption (when the clip has one)
#                             <key>.json        CacheEntry: ids, captions, sizes, entry address
#   null_text.npy           float32 [n, D]: the empty caption's encoding (caption dropout)
#   .work/units/NNNNNN.json unit N's completion record: its index rows and errors (resume state)
CACHE_FORMAT = "spacetime-latent-cache/1"
CACHE_MANIFEST = "cache.json"
CACHE_INDEX = "index.parquet"
CACHE_NULL_TEXT = "null_text.npy"
CACHE_UNITS_DIR = f"{WORK_DIR}/units"
LATENT_EXT, TEXT_EXT, SHORT_TEXT_EXT, ENTRY_EXT = "latent.npy", "text.npy", "short.npy", "json"
CACHE_EXTS = (LATENT_EXT, TEXT_EXT, SHORT_TEXT_EXT, ENTRY_EXT)


def cache_shard_path(unit: int) -> str:
    return f"{SHARDS_DIR}/{unit:06d}.tar"


def cache_unit_record(unit: int) -> str:
    return f"{CACHE_UNITS_DIR}/{unit:06d}.json"


CACHE_INDEX_SCHEMA = pa.schema([
    ("shard", pa.string()),  # relative to CACHE: shards/NNNNNN.tar
    ("key", pa.string()),
    ("clip_id", pa.string()),
    ("bucket", pa.string()),
    ("width", pa.int32()),  # of the source clip (as in the curation index)
    ("height", pa.int32()),
    ("num_frames", pa.int32()),
    ("fps", pa.float64()),
    ("stride", pa.int32()),  # source frames between two encoded frames
    ("entry", pa.string()),  # content address (training.cache.entry_address)
    ("source_shard", pa.string()),  # the curation shard the clip came from (full URI)
    ("source_digest", pa.string()),  # its source's content digest (held-out splits: training.data.index)
])


class CacheEntry(StrictModel):
    """<key>.json of a cache entry: what the loader needs besides the tensors."""

    clip_id: str
    bucket: str
    size: tuple[int, int]  # (width, height) the frames were resized and cropped to (the bucket's)
    frames: int  # frames encoded (the bucket's frame tier)
    stride: int  # source frames between two encoded frames
    fps: float  # frame rate of the encoded frames
    cropped: float  # fraction of the resized frame cropped away to fit `size`
    entry: str  # content address
    dense_caption: str
    short_caption: str | None = None
    text_tokens: int  # rows of <key>.text.npy
    short_tokens: int | None = None  # rows of <key>.short.npy


def is_cache(store) -> bool:
    """Whether `store` (a spacetime.store.Store) holds a latent cache rather than a curation output."""
    return store.exists(CACHE_MANIFEST)
