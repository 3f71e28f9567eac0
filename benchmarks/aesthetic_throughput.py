"""CLIP aesthetic scoring throughput: the aesthetic stage's work against the bare image tower, in one run.

    .venv/bin/python benchmarks/aesthetic_throughput.py                        # ViT-L-14 on the CPU
    python3 benchmarks/aesthetic_throughput.py --device cuda --clips 256     # on a GPU (gpu_session.sh)
    .venv/bin/python benchmarks/aesthetic_throughput.py --model tiny          # the tiny stand-in

The model is the architecture `filters.aesthetic.model` names, with RANDOM weights (open_clip builds
it without a download): the figures are throughput only, which does not depend on the weights. The
stage's path is `Aesthetic.process`: `filters.aesthetic.frames` frames per clip, sampled at the
analysis size (`analyze.height` 144 px high), preprocessed one by one (PIL resize and crop to the
tower's input size, 224 px for ViT-L-14, as open_clip's transform does), embedded in batches, then the LAION head. The reference is
the image tower alone on tensors already on the device. Prints clips/s and frames/s of both, and the
stage's share of the tower's speed (the rest is preprocessing and copies).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from curation.clip_models import AestheticHead, embed_frames, load_clip
    from curation.settings import AestheticConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=AestheticConfig().model, help="open_clip architecture, or `tiny`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=AestheticConfig().frames, help="frames per clip")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 144), metavar=("W", "H"),
                        help="sampled frame size (analyze.height 144 at 16:9)")
    args = parser.parse_args()

    if args.model == "tiny":
        from spacetime.models import resolve

        model, preprocess = load_clip(resolve("tiny:clip.model_name"), resolve("tiny:clip.pretrained"),
                                      resolve("tiny:clip.config_dir"), device=args.device)
    else:
        model, preprocess = load_clip(args.model, None, device=args.device)  # RANDOM weights: speed only
    dim = getattr(model, "embed_dim", None) or model.visual.output_dim
    head = AestheticHead(dim).to(args.device).eval()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (args.size[1], args.size[0], 3), np.uint8) for _ in range(args.clips * args.frames)]

    def stage() -> None:
        embedded = embed_frames(model, preprocess, frames)
        with torch.inference_mode():
            head(torch.from_numpy(embedded).to(args.device))

    side = model.visual.image_size
    side = side if isinstance(side, (tuple, list)) else (side, side)
    pixels = torch.randn(len(frames), 3, *side, device=args.device)

    def tower() -> None:
        with torch.inference_mode():
            for start in range(0, len(pixels), 64):
                model.encode_image(pixels[start:start + 64])

    def timed(fn) -> float:
        fn()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    name = f"{args.model} ({'tiny stand-in' if args.model == 'tiny' else 'random weights'})"
    print(f"{name} on {args.device}, {torch.get_num_threads()} threads; {args.clips} clips x {args.frames} frames "
          f"of {args.size[0]}x{args.size[1]}")
    t_stage, t_tower = timed(stage), timed(tower)
    print(f"{'path':<28} {'clips/s':>9} {'frames/s':>9}")
    for label, seconds in (("aesthetic stage (process)", t_stage), ("image tower alone", t_tower)):
        print(f"{label:<28} {args.clips / seconds:>9.1f} {len(frames) / seconds:>9.1f}")
    print(f"stage / tower speed: {t_tower / t_stage:.2f}")


if __name__ == "__main__":
    main()
