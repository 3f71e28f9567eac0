"""Throughput of the bucketed loader (training.data) on a video bucket and an image bucket.

    .venv/bin/python benchmarks/loader_throughput.py [--workers 0 2] [--steps 20] [--dtype uint8] [--data DIR]

Without --data, writes two small datasets with spacetime.contract (no curation run): 8 H.264 clips of
640x360, 72 frames (bucket 16x9_360p_64f: 64 frames decoded, resized to 640x352), and 32 one-frame
H.264 images of 640x360 (16x9_360p_1f), the layout curation writes. Each bucket is weighted up so
one epoch outlasts the measurement. With --data, measures that curation output as it is (all its
buckets mixed). Prints samples/s, tokens/s, frames/s and the trainer's mean wait per step, after
--warmup steps (worker start-up excluded). No assertions: figures only.

Latent caches (`spacetime train cache`). `--data CACHE` measures a cache the same way; `--cache`
writes one with the layout `train cache` writes (spacetime.contract, "latent cache") at DiT-XL's
shapes: 16x9_360p_128f entries (posterior [2, 16, 32, 44, 80] float32: 28,160 tokens per sample with
patch 1x2x2) and T5-XXL caption rows (up to 120 x 4096), random values (the loader's cost does not
depend on them). For caches the ratio to the trainer's consumption is printed: tokens/s over
--consume tokens/s (default 20,000: DiT-XL on one H200, measured in issue #14), default workers 4.
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


def write_cache(out: Path, count: int, channels: int = 16, text_dim: int = 4096, max_length: int = 120) -> Path:
    """A latent cache of `count` 16x9_360p_128f entries at DiT-XL's shapes (random values)."""
    import json

    import numpy as np

    from training.data.latents import npy_bytes

    rng = np.random.default_rng(0)
    bucket = contract.Bucket.parse("16x9_360p_128f")
    (w, h), frames = bucket.target_size(), bucket.frames
    latent_shape = (2, channels, 1 + (frames - 1) // 4, h // 8, w // 8)
    rel = contract.cache_shard_path(0)
    members, rows = [], []
    for i in range(count):
        key = contract.clip_id(f"cache{i:04d}".ljust(64, "0"), 0, frames)
        n_dense, n_short = 80 + i % 40, 12
        entry = contract.CacheEntry(clip_id=key, bucket=bucket.name, size=(w, h), frames=frames, stride=1, fps=24.0,
                                    cropped=0.0, entry=key, dense_caption=f"dense {i}", short_caption=f"short {i}",
                                    text_tokens=n_dense, short_tokens=n_short)
        members.append({"__key__": key,
                        contract.LATENT_EXT: npy_bytes(rng.standard_normal(latent_shape, np.float32)),
                        contract.TEXT_EXT: npy_bytes(rng.standard_normal((n_dense, text_dim), np.float32)),
                        contract.SHORT_TEXT_EXT: npy_bytes(rng.standard_normal((n_short, text_dim), np.float32)),
                        contract.ENTRY_EXT: entry.model_dump_json().encode()})
        rows.append(dict(shard=rel, key=key, clip_id=key, bucket=bucket.name, width=640, height=360, num_frames=frames,
                         fps=24.0, stride=1, entry=key, source_shard=""))
    contract.write_tar(out / rel, members)
    pq.write_table(contract.table(rows, contract.CACHE_INDEX_SCHEMA), out / contract.CACHE_INDEX)
    (out / contract.CACHE_NULL_TEXT).write_bytes(npy_bytes(rng.standard_normal((2, text_dim), np.float32)))
    (out / contract.CACHE_MANIFEST).write_text(json.dumps(
        {"format": contract.CACHE_FORMAT, "state": "complete", "max_length": max_length, "text_dim": text_dim,
         "entries": count, "note": "synthetic: benchmarks/loader_throughput.py --cache (random values)"}))
    return out


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
        frames += s["samples"] * contract.Bucket.parse(batch["bucket"]).frames
        wait += s["wait_s"]
    wall = time.perf_counter() - t0
    it.close()
    return {"samples/s": samples / wall, "tokens/s": tokens / wall, "frames/s": frames / wall,
            "wait/step ms": 1000 * wait / steps, "batch": samples / steps, "buckets": sorted(loader.stats.samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a curation output or latent cache to measure instead of generated data")
    parser.add_argument("--cache", action="store_true", help="generate and measure a latent cache at DiT-XL's shapes")
    parser.add_argument("--entries", type=int, default=24, help="--cache: entries to generate")
    parser.add_argument("--consume", type=float, default=20000.0,
                        help="caches: the trainer's consumption in tokens/s to compare with (DiT-XL, one H200)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DataLoader workers to measure (default: 0 2; caches: 4, the loader's default)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--token-budget", type=int, default=16384)
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | uint8")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        if args.workers is None:
            args.workers = [LoaderConfig().num_workers] if args.cache or _is_cache(args.data) else [0, 2]
        if args.cache:
            datasets = {"cache": (write_cache(Path(tmp) / "cache", args.entries), {"*": 50.0})}
        elif args.data:
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
            if _is_cache(root):
                print(f"{name:6s} cached-latent loader / trainer consumption ({args.consume:.0f} tokens/s): "
                      f"{r['tokens/s'] / args.consume:.1f}x")


def _is_cache(root) -> bool:
    return root is not None and (Path(root) / contract.CACHE_MANIFEST).exists()


if __name__ == "__main__":
    main()
