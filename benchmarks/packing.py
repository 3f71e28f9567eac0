"""Native-resolution packing (loader.packing, issue #34) against the bucketed loader, on one curated
output of mixed shapes, in one run.

    .venv/bin/python benchmarks/packing.py [--data OUT] [--steps 12] [--budget 4096]

Without --data, generates clips of five shapes (16:9, 4:3, square, vertical (a rotated phone clip),
21:9) and images, and curates them with configs/curate/tiny.yaml (captions off, near-duplicate removal
off: every clip kept) on the embedded Ray. Then prints, for the bucketed and the packed plan of one
epoch at the same token budget per rank:
- padding: the share of each step's token budget left unused (mean and worst step);
- samples dropped per epoch (the bucketed plan drops each bucket's incomplete tail);
- resize error: mean |native area - trained area| / native area over the samples (bucketed: the
  bucket's target size; packed: the native size rounded to the VAE x patch grid);
then builds each loader's latent cache of the data (configs/train/tiny.yaml: its untrained VAE and tiny
T5) and trains a small DiT (--hidden, depth 4, 1x2x2 patches) from it for --steps steps with each
loader, printing tokens/s (mean over the steps after the first two) and the ratio packed / bucketed. Figures only, no assertions. The GPU side (flex_attention, compiled, at the
DiT-XL shape) is in benchmarks/gpu_session.sh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"16x9": (384, 216), "4x3": (320, 240), "1x1": (240, 240), "21x9": (448, 192)}


def make_media(folder: Path, per_shape: int) -> None:
    from spacetime.standins import testmedia as tm

    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for name, size in SHAPES.items():
        for i in range(per_shape):
            k += 1
            tm.make_moving(folder / f"{name}_{i}.mp4", num_frames=40 + 8 * i, size=size, velocity=(2 + i, 1), seed=k)
    for i in range(per_shape):
        tm.make_portrait_rotated(folder / f"vertical_{i}.mp4", num_frames=40 + 8 * i, seed=50 + i)
    for i in range(2 * per_shape):
        size = list(SHAPES.values())[i % len(SHAPES)]
        tm.make_image(folder / f"image_{i}.png", size=size, source=[("bigbuckbunny.mp4", 10 + 9 * i), ("bikes.mp4", 5 + 11 * i)][i % 2])


def curate(media: Path, out: Path) -> None:
    from curation.pipeline import run_curation
    from curation.settings import CurateConfig
    from spacetime.config import load_config

    cfg = load_config(CurateConfig, ROOT / "configs/curate/tiny.yaml",
                      ["caption=null", "dedup.enabled=false", "analyze.detector=content"])
    run_curation([str(media)], str(out), cfg)


def plan_figures(data: str, budget: int, patch: tuple[int, int, int]) -> dict:
    """Padding, drops and resize error of one epoch of each plan (no decoding: the plans and the index)."""
    from spacetime import contract
    from training.config import LoaderConfig
    from training.data.index import bucket_specs, read_index
    from training.data.packing import epoch_sequences, native_shapes

    cfg = LoaderConfig(data=[data], token_budget=budget, patch=patch)
    samples = read_index(cfg.data, cfg.s3)
    native_area = samples.width * samples.height
    out = {"samples": len(samples)}
    # bucketed: each step one bucket's batch of batch x tokens; each bucket's tail (< one batch) dropped
    specs = bucket_specs(samples, cfg)
    steps, used = [], 0
    for s in specs:
        full = s.length // s.batch
        steps += [1 - s.batch * s.tokens / budget] * full
        used += full * s.batch
    trained = np.array([np.prod(contract.Bucket.parse(b).target_size()) for b in samples.bucket])
    out["bucketed"] = {"steps": len(steps), "padding_mean": float(np.mean(steps)), "padding_max": float(np.max(steps)),
                       "dropped": len(samples) - used, "buckets": len(specs),
                       "resize_error": float(np.mean(np.abs(native_area - trained) / native_area))}
    # packed: every sample once, sequences of at most `budget` tokens
    shapes = native_shapes(samples, cfg)
    seqs = epoch_sequences(shapes.tokens, 0, 0, budget, cfg.pack_window)
    pad = [1 - shapes.tokens[s].sum() / budget for s in seqs]
    placed = sorted(i for s in seqs for i in s)
    out["packed"] = {"steps": len(seqs), "padding_mean": float(np.mean(pad)), "padding_max": float(np.max(pad)),
                     "padding_all_but_last": float(np.mean(pad[:-1])) if len(pad) > 1 else float(pad[0]),
                     "dropped": len(samples) - len(set(placed)),
                     "padding_50x": _padding(np.tile(shapes.tokens, 50), budget, cfg.pack_window),
                     "resize_error": float(np.mean(np.abs(native_area - shapes.width * shapes.height) / native_area))}
    return out


def _padding(tokens: np.ndarray, budget: int, window: int) -> float:
    """Padding tokens / sequence tokens of one epoch of samples of these token counts."""
    from training.data.packing import epoch_sequences

    seqs = epoch_sequences(tokens, 0, 0, budget, window)
    return float(1 - tokens.sum() / (len(seqs) * budget))


def train_config(packing: bool, budget: int, hidden: int):
    from spacetime.config import load_config
    from training.train_config import TrainConfig

    sets = ["log.progress=false", "log.every=1", "checkpoint.keep=1", f"loader.token_budget={budget}",
            "loader.max_batch_size=null", "dit.patch=[1,2,2]", f"dit.hidden={hidden}", "dit.depth=4",
            "loader.num_workers=1", f"loader.packing={str(packing).lower()}"]
    return load_config(TrainConfig, ROOT / "configs/train/tiny.yaml", sets)


def build_cache(data: str, out: Path, packing: bool, budget: int, hidden: int) -> str:
    """The latent cache of `data` for the bucketed or the packed loader (training.cache)."""
    from training.cache import build_cache as build

    build(train_config(packing, budget, hidden), [data], str(out))
    return str(out)


def train_rate(data: str, run: Path, packing: bool, steps: int, budget: int, hidden: int) -> dict:
    """tokens/s of `steps` DiT steps (mean of the records after the first two)."""
    from training.train import run_train

    cfg = train_config(packing, budget, hidden)
    cfg = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every": steps})})
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    t0 = time.perf_counter()
    run_train("dit", cfg, data, run, max_steps=steps)
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][2:]
    tokens = sum(r["tokens_per_s"] * r["step_s"] for r in records)
    seconds = sum(r["step_s"] for r in records)
    flops = sum(r["tflops_per_device"] * r["step_s"] for r in records)
    return {"tokens_per_s": tokens / seconds, "tflops": flops / seconds, "step_s": seconds / len(records), "wall_s": wall,
            "padding": float(np.mean([r.get("padding", 0.0) for r in records]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a curation output to measure (default: generate and curate one)")
    parser.add_argument("--steps", type=int, default=12, help="training steps per loader")
    parser.add_argument("--budget", type=int, default=16384, help="loader.token_budget (tokens per rank and step)")
    parser.add_argument("--per-shape", type=int, default=6, help="clips generated per shape")
    parser.add_argument("--hidden", type=int, default=256, help="DiT width for the training comparison")
    parser.add_argument("--work", help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="packing-"))
    data = args.data
    if data is None:
        from curation.pipeline import stop_ray

        make_media(work / "media", args.per_shape)
        t0 = time.perf_counter()
        curate(work / "media", work / "out")
        stop_ray()
        print(f"curated {work / 'media'} -> {work / 'out'} in {time.perf_counter() - t0:.0f} s")
        data = str(work / "out")
    from spacetime.models import register_tiny_builder
    from spacetime.standins.tiny_models import build_all

    register_tiny_builder(build_all)
    figures = plan_figures(data, args.budget, (1, 2, 2))
    print(f"{figures['samples']} samples, token budget {args.budget} per rank and step, patch 1x2x2, 8x VAE")
    print(f"{'':10} {'steps':>6} {'padding mean':>13} {'worst step':>11} {'dropped':>8} {'resize error':>13}")
    for name in ("bucketed", "packed"):
        f = figures[name]
        print(f"{name:10} {f['steps']:>6} {f['padding_mean']:>13.4f} {f['padding_max']:>11.4f} {f['dropped']:>8} "
              f"{f['resize_error']:>13.4f}")
    print(f"packed padding without the epoch's last sequence: {figures['packed']['padding_all_but_last']:.4f}; "
          f"of all tokens of an epoch of 50x these samples (the same shapes): {figures['packed']['padding_50x']:.4f}")
    # DiT steps from latent caches (the VAE and text encoder out of the step, as a real run does), each
    # loader's own cache of the same data; the untrained tiny VAE's encode would otherwise be most of it
    caches = {name: build_cache(data, work / f"cache_{name}_{args.budget}", name == "packed", args.budget, args.hidden)
              for name in ("bucketed", "packed")}
    rates = {name: train_rate(caches[name], work / f"run_{name}", name == "packed", args.steps, args.budget,
                              args.hidden) for name in ("bucketed", "packed")}
    print(f"DiT hidden {args.hidden}, depth 4, from latent caches, {args.steps} steps each:")
    for name, r in rates.items():
        print(f"train {name:8} tokens/s {r['tokens_per_s']:9.0f}  model TFLOP/s {r['tflops']:.4f}  step {r['step_s']:.3f} s  "
              f"padding {r['padding']:.4f}")
    p, b = rates["packed"], rates["bucketed"]
    print(f"packed / bucketed: tokens/s {p['tokens_per_s'] / b['tokens_per_s']:.3f}, model FLOP/s "
          f"{p['tflops'] / b['tflops']:.3f} (a native-size sample is longer than its bucket's resize, so each of "
          "its tokens attends to more: FLOP/s compares the implementations, tokens/s the training data)")


if __name__ == "__main__":
    main()
