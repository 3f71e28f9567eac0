"""Burned-in text scoring (curation.ocr) on every real footage file, clean and with text burned in.

    .venv/bin/python benchmarks/ocr_text.py [--grid 16] [--persist 0.5] [--max-area 0.01] [--frames N]

Frames are sampled as the analysis pass does (2 fps, 224 px high, PyAV AREA scaling); one clip per
shot (bikes.mp4's known cuts; the other files are single shots). Text is burned into the
full-resolution frame before downscaling (tests/test_ocr.py's helpers): subtitles at 5%, 6% and 7%
of the frame height (white, black outline, bottom centre, a new line every second), and a "NEWS 24"
logo (6%) in the top-left and top-right corners. Per file and variant it prints: clips, frames,
detection seconds per frame (one onnxruntime thread), the range of text_area over the clips, how
many clips score above --max-area (clean: false positives; text: detections), how many got the
right crop band (bottom for subtitles, top for logos), for subtitles the share of the recognised
words that are burned words (recognition reads the persistent boxes of 3 frames per clip, so it
does not see every line of a clip), and recognition seconds per clip.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curation.ocr import GRID, MAX_AREA, PERSIST, load_ocr, score_text
from spacetime.standins.testmedia import SUBTITLES, logo, subtitled
from tests.test_ocr import FILES, decode_sampled, downscale, shots, words

VARIANTS = {
    "clean": None,
    "subs 5%": lambda rgb, t: subtitled(rgb, t, 0.05)[0],
    "subs 6%": lambda rgb, t: subtitled(rgb, t, 0.06)[0],
    "subs 7%": lambda rgb, t: subtitled(rgb, t, 0.07)[0],
    "logo TL": lambda rgb, t: logo(rgb, "top-left"),
    "logo TR": lambda rgb, t: logo(rgb, "top-right"),
}


def run(args: argparse.Namespace) -> list[dict]:
    engine = load_ocr(side=args.side, threads=args.threads)
    rows = []
    for name in FILES:
        items = decode_sampled(name)
        clips = shots(name, items)
        for variant, draw in VARIANTS.items():
            frames = np.stack([downscale(rgb if draw is None else draw(rgb, t)) for _, t, rgb in items])
            results, found, read = [], 0, 0
            for clip in clips:
                r = score_text(engine, frames[clip], grid=args.grid, persist=args.persist,
                               recognize=variant != "clean", max_frames=args.frames)
                results.append(r)
                if variant.startswith("subs"):
                    truth = set().union(*(words(SUBTITLES[int(items[k][1]) % len(SUBTITLES)]) for k in clip))
                    found += len(words(r["text"]) & truth)
                    read += len(words(r["text"]))
            want = {"subs": "bottom", "logo": "top"}.get(variant[:4])
            areas = [r["text_area"] for r in results]
            rows.append({
                "file": name, "variant": variant, "clips": len(clips),
                "frames": sum(r["frames"] for r in results),
                "size": f"{frames.shape[2]}x{frames.shape[1]}",
                "det_s": float(np.mean([r["seconds"] for r in results])),
                "area_min": min(areas), "area_max": max(areas),
                "over": sum(a > args.max_area for a in areas),
                "band_ok": sum((r["band"] or {}).get("side") == want for r in results) if want else None,
                "words": found / read if read else None,
                "rec_s": float(np.mean([r["rec_seconds"] for r in results])) if variant != "clean" else None,
            })
            print(_fmt(rows[-1]), flush=True)
    return rows


HEADER = (f"{'file':24s} {'variant':8s} {'size':8s} {'clips':>5s} {'frames':>6s} {'det s/f':>7s} "
          f"{'area min':>8s} {'area max':>8s} {'>thr':>5s} {'band':>5s} {'words':>6s} {'rec s':>6s}")


def _opt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def _fmt(r: dict) -> str:
    return (f"{r['file']:24s} {r['variant']:8s} {r['size']:8s} {r['clips']:5d} {r['frames']:6d} "
            f"{r['det_s']:7.3f} {r['area_min']:8.4f} {r['area_max']:8.4f} {r['over']:5d} "
            f"{_opt(r['band_ok'], '5d'):>5s} {_opt(r['words'], '6.0%'):>6s} {_opt(r['rec_s'], '6.3f'):>6s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=int, default=GRID, help="cells over the frame height")
    parser.add_argument("--persist", type=float, default=PERSIST, help="fraction of frames a cell must be text in")
    parser.add_argument("--max-area", type=float, default=MAX_AREA, help="threshold on text_area")
    parser.add_argument("--frames", type=int, default=None, help="score at most N evenly spaced frames per clip")
    parser.add_argument("--side", type=int, default=640, help="longest side detection runs at")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    args = parser.parse_args()
    start = time.perf_counter()
    print(HEADER)
    rows = run(args)
    clean = [r for r in rows if r["variant"] == "clean"]
    for kind in ("subs", "logo"):
        text = [r for r in rows if r["variant"].startswith(kind)]
        print(f"{kind}: detection rate {sum(r['over'] for r in text)}/{sum(r['clips'] for r in text)} clips, "
              f"right band {sum(r['band_ok'] for r in text)}/{sum(r['clips'] for r in text)}")
    print(f"clean: false positives {sum(r['over'] for r in clean)}/{sum(r['clips'] for r in clean)} clips "
          f"(text_area max {max(r['area_max'] for r in clean):.4f}); threshold {args.max_area}")
    frames = sum(r["frames"] for r in rows)
    print(f"detection {sum(r['det_s'] * r['frames'] for r in rows) / frames:.3f} s per frame over {frames} "
          f"frames; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
