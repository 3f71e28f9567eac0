"""Our split (analysis pass + split) vs the `scenedetect` CLI on the same files, in one run.

    .venv/bin/python benchmarks/split_vs_pyscenedetect.py [--repeats 2]

Inputs: a ~40 s 1080p H.264 multi-shot file made of real footage with hard cuts and one 12-frame dissolve
(known ground truth), and the real bikes.mp4 (5 known hard cuts). Both tools run as subprocesses
(interpreter start-up included on both sides). Prints, per file, wall time of ours vs
`scenedetect detect-content` and the ratio, and F1 against ground truth for ours and for each of
scenedetect's detectors (content, adaptive, hist, hash). A hard cut matches within +-1 frame; a
dissolve matches a detected transition that overlaps its span (lenient to scenedetect, which only
reports cuts). Goal (issue 3): >= 1.4x faster than detect-content, F1 >= the best detector's.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENEDETECT = Path(sys.executable).with_name("scenedetect")
DETECTORS = ("detect-content", "detect-adaptive", "detect-hist", "detect-hash")


def ours(path: Path) -> list[list[int]]:
    """Run in a subprocess: our analysis + split on `path`; prints the transitions as JSON."""
    code = ("import json,sys; from curation.probe import probe; from curation.analyze import analyze;"
            "from curation.settings import *; from spacetime.config import S3Config; s=probe(sys.argv[1], ProbeConfig(), S3Config());"
            "segs=list(analyze(s, AnalyzeConfig(), S3Config(), window_frames=250)); print(json.dumps(segs[-1]['cuts']))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scenedetect(path: Path, detector: str, workdir: Path) -> list[list[int]]:
    subprocess.run([str(SCENEDETECT), "-q", "-i", str(path), "-o", str(workdir), detector,
                    "list-scenes", "-s", "-f", "scenes.csv"], check=True, capture_output=True)
    with open(workdir / "scenes.csv") as f:
        rows = list(csv.DictReader(f))
    # CSV frame numbers are 1-based; a scene starting at frame f (0-based) means a cut at f.
    return [[int(r["Start Frame"]) - 1, int(r["Start Frame"])] for r in rows[1:]]


def f1(found: list[list[int]], truth: list[tuple[int, int]]) -> float:
    def hit(f, t):
        if t[1] - t[0] == 1:
            return abs(f[0] - t[0]) <= 1
        return f[0] < t[1] + 2 and f[1] > t[0] - 2  # overlaps the dissolve
    matched_truth = sum(any(hit(f, t) for f in found) for t in truth)
    matched_found = sum(any(hit(f, t) for t in truth) for f in found)
    p = matched_found / len(found) if found else 0.0
    r = matched_truth / len(truth) if truth else 1.0
    return 2 * p * r / (p + r) if p + r else 0.0


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=3, help="length of the 1080p file in ~14 s cycles of shots")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from spacetime.standins import testmedia as tm

    work = Path(tempfile.mkdtemp())
    multishot = work / "multishot1080p.mp4"
    # ~40 s of 1080p: long enough that interpreter start-up (both sides) does not decide the ratio
    segments = list(tm._CYCLE_SEGMENTS) * args.cycles
    gt = tm.make_multishot(multishot, segments, size=(1920, 1080), dissolve_frames=12,
                           options={"preset": "superfast", "crf": "23"})
    files = {f"multishot1080p.mp4 ({gt.num_frames} frames, {len(gt.hard_cuts)} cuts + 1 dissolve)": (multishot, gt.cuts),
             "bikes.mp4 (real, 5 cuts)": (tm.real_footage("bikes.mp4"),
                                          [(c, c + 1) for c in tm.REAL_FOOTAGE_CUTS["bikes.mp4"]])}
    for name, (path, truth) in files.items():
        t_ours, found = timed(lambda: ours(path), args.repeats)
        t_sd, _ = timed(lambda: scenedetect(path, "detect-content", work), args.repeats)
        print(f"\n{name}")
        print(f"  time: ours {t_ours:.2f}s, scenedetect detect-content {t_sd:.2f}s -> ours is {t_sd / t_ours:.2f}x faster")
        print(f"  F1 ours            : {f1(found, truth):.3f}  {found}")
        for det in DETECTORS:
            cuts = scenedetect(path, det, work)
            print(f"  F1 scenedetect {det[7:]:9}: {f1(cuts, truth):.3f}  {[c[0] for c in cuts]}")
        print(f"  truth: {truth}")


if __name__ == "__main__":
    main()
