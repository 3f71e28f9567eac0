"""The data contract: clip ids, the bucket spec, the shard sample layout and the output paths.

This is the ONLY module that knows file names inside a tar or under an output directory. The curation
writer and every reader (the trainer's loader, `spacetime caption`, the report) import it.

Output layout (OUT is the `--output` of `spacetime curate`):
    shards/<bucket>/<bucket>-NNNNNN.tar   WebDataset samples: <key>.mp4 <key>.json <key>.txt
    shards/index.parquet                  one row per sample (INDEX_SCHEMA)
    manifest/sources.parquet              every input and its fate
    manifest/clips.parquet                every candidate clip, kept or not, with its reason
    summary.json                          counts, hours, stage times, throughput
A sample's key is its clip id. Images are one-frame videos and share the layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa

# ---------------------------------------------------------------------------------------- paths
SHARDS_DIR = "shards"
INDEX_PATH = "shards/index.parquet"
SOURCES_MANIFEST = "manifest/sources.parquet"
CLIPS_MANIFEST = "manifest/clips.parquet"
SUMMARY_PATH = "summary.json"
REPORT_DIR = "report"
CAPTIONS_MANIFEST = "manifest/captions.parquet"  # `spacetime caption` (recaption) outputs
CAPTION_SUMMARY = "caption_summary.json"
WORK_DIR = ".work"  # staging and per-source completion records; resumable state of a run

# Extensions of one sample inside a tar: the clip (native resolution), its record, its dense caption.
VIDEO_EXT, RECORD_EXT, CAPTION_EXT = "mp4", "json", "txt"
SAMPLE_EXTS = (VIDEO_EXT, RECORD_EXT, CAPTION_EXT)


def shard_path(bucket: str, number: int) -> str:
    """Relative path of shard `number` of `bucket`: shards/<bucket>/<bucket>-000000.tar."""
    return f"{SHARDS_DIR}/{bucket}/{bucket}-{number:06d}.tar"


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
# Frame tiers: a clip's tier is the largest tier <= its frame count; 1 is the image tier.
FRAME_TIERS: tuple[int, ...] = (1, 16, 32, 64, 128, 256)
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
    ("status", pa.string()),  # ok | failed
    ("error", pa.string()),
    ("container", pa.string()),
    ("codec", pa.string()),
    ("width", pa.int32()),  # displayed (rotation applied)
    ("height", pa.int32()),
    ("rotation", pa.int32()),
    ("fps", pa.float64()),
    ("vfr", pa.bool_()),
    ("duration", pa.float64()),
    ("num_frames", pa.int64()),  # decoded frames
    ("pix_fmt", pa.string()),
    ("has_audio", pa.bool_()),
    ("cuts", pa.list_(pa.list_(pa.int64()))),  # [start_frame, end_frame) of each transition
    ("num_clips", pa.int32()),
    ("num_kept", pa.int32()),
])

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
    ("bucket", pa.string()),
    ("extract_mode", pa.string()),  # copy | reencode
    ("scores", pa.string()),  # JSON object of every filter score
    ("caption", pa.string()),
    ("shard", pa.string()),
])


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of exactly `schema` (missing fields become nulls, extra ones are dropped)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


# --------------------------------------------------------------------------------- shard writing
def sample_dict(key: str, video: bytes, record: dict, caption: str) -> dict[str, Any]:
    """One WebDataset sample: the clip, its record (sorted-key JSON), its dense caption."""
    return {
        "__key__": key,
        VIDEO_EXT: video,
        RECORD_EXT: json.dumps(record, sort_keys=True, ensure_ascii=False).encode(),
        CAPTION_EXT: caption.encode(),
    }


def write_shard(path: Path, samples: Iterable[tuple[str, bytes, dict, str]]) -> None:
    """Write samples (key, video bytes, record, caption) to `path` atomically (temp name + rename).

    webdataset's TarWriter with fixed mtime/owner/mode, so the bytes depend only on the samples.
    """
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        with wds.TarWriter(stream, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
            for key, video, record, caption in samples:
                writer.write(sample_dict(key, video, record, caption))
    tmp.replace(path)


def read_sample_record(sample: dict) -> dict:
    """Decode the record of a webdataset sample dict (raw bytes values) -> dict."""
    return json.loads(sample[RECORD_EXT])


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


def read_shard(path: Path) -> Iterator[dict]:
    """Samples of a WebDataset tar as {"__key__": key, ext: bytes, ...}, in tar order.
    Sample members are <key>.<ext>; keys have no dots."""
    current: dict | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            key, _, ext = name.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current
