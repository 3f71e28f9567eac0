"""Throughput of the bucketed loader (training.data) on a video bucket and an image bucket.

    .venv/bin/python benchmarks/loader_throughput.py [--workers 0 2] [--steps 20] [--dtype uint8] [--data DIR]

Without --data, writes two small datasets with spacetime.contract (no curation run): 8 H.264 clips of
640x360, 72 frames (bucket 16x9_360p_64f: 64 frames decoded, resized to 640x352), and 32 one-frame
H.264 images of 640x360 (16x9_360p_1f), the layout curation writes. Each bucket is weighted up so
one epoch outlasts the measurement. With --data, measures that curation output as it is (all its
buckets mixed). Prints samples/s, tokens/s, frames/s and the trainer's mean wait per step, after
--warmup steps (worker start-up excluded). No assertions: figures only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from spacetime import contract
from spacetime.record import Caption, ClipRecord, SourceRef, Span
from spacetime.standins import testmedia
from training.config import LoaderConfig
from training.data.loader import BucketLoader


def write_dataset(out: Path, kind: str, count: int) -> Path:
    """`count` samples of one bucket under out/<kind> (shards + index), like a curation output."""
    root = out / kind
    media = out / f"{kind}-media"
    media.mkdir(parents=True, exist_ok=True)
    samples, rows = [], []
    for i in range(count):
        path = media / f"{kind}{i}.mp4"
        if kind == "video":
            testmedia.make_moving(path, num_frames=72, size=(640, 360), velocity=(3, 1), seed=i)
            frames = 72
        else:
            sources = [("bigbuckbunny.mp4", 10 + 4 * i), ("bikes.mp4", 5 + 7 * i)]
            testmedia.make_image(path, size=(640, 360), source=sources[i % 2])
            frames = 1
        key = contract.clip_id(f"{kind}{i:04d}".ljust(64, "0"), 0, frames)
        bucket = contract.bucket_for(640, 360, frames).name
        rel = contract.shard_path(bucket, 0)
        record = ClipRecord(clip_id=key, source=SourceRef(uri=str(path), digest=key, digest_kind="sha256"),
                            span=Span(start_frame=0, end_frame=frames, start_time=0.0, end_time=frames / 25.0),
                            fps=25.0, width=640, height=360, num_frames=frames, duration=frames / 25.0,
                            bucket=bucket, caption=Caption(dense=f"a benchmark {kind} {i}"))
        samples.append((path.read_bytes(), record))
        rows.append(dict(shard=rel, key=key, clip_id=key, source_uri=str(path), width=640, height=360,
                         num_frames=frames, fps=25.0, duration=frames / 25.0, bucket=bucket, has_caption=True))
    contract.write_shard(root / rel, samples)
    pq.write_table(contract.table(rows, contract.INDEX_SCHEMA), root / contract.INDEX_PATH)
    return root


def measure(cfg: LoaderConfig, steps: int, warmup: int) -> dict:
    loader = BucketLoader(cfg)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    samples = tokens = frames = 0
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        s = batch["stats"]
        samples += s["samples"]
        tokens += s["tokens"]
        frames += s["samples"] * batch["video"].shape[2]
        wait += s["wait_s"]
    wall = time.perf_counter() - t0
    it.close()
    return {"samples/s": samples / wall, "tokens/s": tokens / wall, "frames/s": frames / wall,
            "wait/step ms": 1000 * wait / steps, "batch": samples / steps, "buckets": sorted(loader.stats.samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a curation output to measure instead of generated data")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | uint8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        if args.data:
            datasets = {"data": (args.data, {})}
        else:
            datasets = {"video": (write_dataset(Path(tmp), "video", 8), {"*": 50.0}),
                        "image": (write_dataset(Path(tmp), "image", 32), {"*": 50.0})}
        run(datasets, args)


def run(datasets: dict, args: argparse.Namespace) -> None:
    print(f"token budget {args.token_budget} per step, dtype {args.dtype}; after {args.warmup} warm-up steps")
    for name, (root, weights) in datasets.items():
        for workers in args.workers:
            cfg = LoaderConfig(data=[str(root)], token_budget=args.token_budget, num_workers=workers,
                               bucket_weights=weights, log_every=0, pin_memory=False, dtype=args.dtype)
            r = measure(cfg, args.steps, args.warmup)
            print(f"{name:6s} {','.join(r['buckets']):22s} workers={workers}: batch {r['batch']:5.1f}  "
                  f"{r['samples/s']:7.1f} samples/s  {r['tokens/s']:10.0f} tokens/s  {r['frames/s']:7.1f} frames/s"
                  f"  wait {r['wait/step ms']:7.1f} ms/step")


if __name__ == "__main__":
    main()
