"""A tiny curation output for trainer tests, written through the data contract (spacetime.contract) and
the typed clip record (spacetime.record).

Clips are 32x32 (below the smallest resolution tier, so the loader resizes them to their bucket's
16x16): a coloured disc moving over a smooth gradient (simple content a tiny VAE can learn in a
few hundred steps), 17 frames at 8 fps (bucket 1x1_0p_16f), plus 1-frame images (1x1_0p_1f). Writing the shards directly keeps trainer tests to seconds; the
loader tests run a real `run_curation` and check the loader reads what curation writes.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq

from spacetime import contract
from spacetime.record import Caption, ClipRecord, SourceRef, Span

SIZE = (32, 32)
CAPTIONS = ["a red texture drifting right", "green stripes sliding down", "a blue pattern moving left",
            "yellow blocks rising up", "a purple field panning diagonally", "orange dots at rest"]


def make_dataset(out: Path, videos: int = 4, images: int = 2, frames: int = 17, fps: int = 8,
                 sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write OUT/shards/<bucket>/*.tar, OUT/shards/index.parquet and OUT/manifest/sources.parquet (each
    clip its own source, of digest test-<i>); returns OUT. `sizes`: (width, height) of clip i is
    sizes[i % len(sizes)] (mixed shapes, for native-resolution packing); default all SIZE."""
    out = Path(out)
    media = out / "media"
    rows, by_bucket = [], {}
    velocities = [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (0, 0)]
    for i in range(videos + images):
        n = frames if i < videos else 1
        size = sizes[i % len(sizes)] if sizes else SIZE
        path = media / f"clip{i}.mp4"
        encode(path, disc_frames(n, velocities[i % len(velocities)], seed=i, size=size), fps)
        key = contract.clip_id(f"test-{i}", 0, n)
        bucket = contract.bucket_for(*size, n).name
        caption = CAPTIONS[i % len(CAPTIONS)]
        record = ClipRecord(clip_id=key, source=SourceRef(uri=str(path), digest=f"test-{i}", digest_kind="sha256"),
                            span=Span(start_frame=0, end_frame=n, start_time=0.0, end_time=n / fps),
                            fps=float(fps), width=size[0], height=size[1], num_frames=n, duration=n / fps,
                            bucket=bucket, caption=Caption(dense=caption, short=caption.split()[-1]))
        by_bucket.setdefault(bucket, []).append((path.read_bytes(), record))
        rows.append({"key": key, "clip_id": key, "source_uri": str(path), "width": size[0], "height": size[1],
                     "num_frames": n, "fps": float(fps), "duration": n / fps, "bucket": bucket, "has_caption": True})
    shard_of = {}
    for bucket, samples in by_bucket.items():
        rel = contract.shard_path(bucket, 0)
        contract.write_shard(out / rel, samples)
        shard_of[bucket] = rel
    for r in rows:
        r["shard"] = shard_of[r["bucket"]]
    pq.write_table(contract.table(rows, contract.INDEX_SCHEMA), out / contract.INDEX_PATH)
    sources = [{"uri": r["source_uri"], "digest": f"test-{i}", "digest_kind": "sha256", "status": "ok",
                "num_clips": 1, "num_kept": 1} for i, r in enumerate(rows)]
    (out / contract.SOURCES_MANIFEST).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(contract.table(sources, contract.SOURCES_SCHEMA), out / contract.SOURCES_MANIFEST)
    return out


def disc_frames(n: int, velocity: tuple[int, int], seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """[n, H, W, 3] uint8: a disc of a random colour moving by `velocity` px/frame over a gradient."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1, disc = rng.uniform(30, 220, (3, 3))
    background = c0 + (c1 - c0) * (x + y)[..., None] / (w + h)  # [H, W, 3]
    cx, cy = rng.uniform(8, w - 8), rng.uniform(8, h - 8)
    frames = []
    for t in range(n):
        inside = ((x - cx - velocity[0] * t) ** 2 + (y - cy - velocity[1] * t) ** 2) < 36.0
        frames.append(np.where(inside[..., None], disc, background))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def encode(path: Path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
