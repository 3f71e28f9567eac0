"""Analysis pass vs a bare decode of the same 1080p H.264 file, in one run.

    .venv/bin/python benchmarks/analysis_vs_decode.py [--seconds 20] [--file PATH]

Reference: a bare PyAV decode loop with the same threading (thread_type AUTO), which measured about
as fast as `ffmpeg -threads 2 -f null` on these machines. Prints frames/s of both and the ratio
analysis/decode. Goal (issue 3): >= 0.8.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import av

from spacetime.standins import testmedia
from curation.analyze import analyze
from curation.probe import probe
from curation.settings import AnalyzeConfig, ProbeConfig
from spacetime.config import S3Config


def bare_decode(path: Path) -> int:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in c.decode(stream))


def analysis(path: Path, cfg: AnalyzeConfig) -> int:
    source = probe(str(path), ProbeConfig(), S3Config())
    frames = 0
    for seg in analyze(source, cfg, S3Config(), window_frames=250):
        frames += seg["end_frame"] - seg["start_frame"]
        if seg["final"]:
            return seg["num_frames"]
    return frames


def best_of(fn, repeats: int) -> float:
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the generated 1080p file")
    parser.add_argument("--file", type=Path, help="use this video instead of a generated one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="analyze.* override, e.g. height=180")
    args = parser.parse_args()
    path = args.file
    if path is None:
        path = Path(tempfile.mkdtemp()) / "bench1080p.mp4"
        testmedia.make_1080p(path, seconds=args.seconds)
    cfg = AnalyzeConfig(**{k: type(getattr(AnalyzeConfig(), k))(v) for k, v in (s.split("=", 1) for s in args.set)})
    n = bare_decode(path)
    t_decode = best_of(lambda: bare_decode(path), args.repeats)
    t_analysis = best_of(lambda: analysis(path, cfg), args.repeats)
    print(f"file: {path} ({n} frames)")
    print(f"bare decode : {n / t_decode:8.1f} frames/s")
    print(f"analysis    : {n / t_analysis:8.1f} frames/s")
    print(f"ratio analysis/decode speed: {t_decode / t_analysis:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
