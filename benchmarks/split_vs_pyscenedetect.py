"""Our shot detectors vs every `scenedetect` CLI detector, on the same ground-truth files, in one run.

    .venv/bin/python benchmarks/split_vs_pyscenedetect.py [--quick] [--workdir DIR] [--json PATH]

Methods
  ours: the analysis pass (`curation.analyze.analyze`, in-process, the pipeline's defaults,
    window_frames=250) with `analyze.detector` = content, adaptive, transnetv2, and combined with each
    `analyze.combine` rule (union, agree, learned_plus_dissolves; the classic half of `combined` is
    always scenedetect's ContentDetector + our dissolve detector); TransNetV2 in float32, and
    transnetv2 and combined/agree again in bfloat16 (`analyze.transnet_dtype`). combined/agree runs
    the model near the classic transitions only (curation.analyze.CombinedShots).
  scenedetect: the `scenedetect` CLI (subprocess, its defaults: OpenCV backend, auto downscale,
    min scene length 0.6 s) with detect-content, detect-adaptive, detect-hist, detect-hash and
    detect-threshold. Where its default OpenCV backend decodes nothing (the AV1 file: OpenCV's FFmpeg
    has no software AV1 decoder) it is rerun with `-b pyav`, and the table says so.

Ground truth: benchmarks/shot_truth.py (real footage: a 1080p multi-shot file with a dissolve,
bikes.mp4, a VFR file, an AV1 file, a fade through black, an 8-frame shot, a jump cut, a dissolve
30 frames before the end of its file, and two negatives with NO transition: an exposure step + flash, and a fast pan). Frame numbers are decoded-
frame indices. scenedetect's CSV "Start Frame" is time x average fps, which is wrong on VFR files,
so its cuts are read from "Start Time (seconds)" and mapped to the decoded frame with that time.

Scoring: one-to-one matching. A found transition [a, b) matches a truth [s, e) if it overlaps
[s - 2, e + 2): a hard cut matches within +-2 frames, a gradual transition (dissolve, fade) matches
any found transition overlapping it (+-2; lenient to detectors that only report cuts). Unmatched
found transitions are false positives (one overlapping an already matched gradual transition is
listed as a "fragment" of it). F1 per file and overall (micro: summed TP/FP/FN).
Goals: overall F1 >= 0.995, every gradual transition found, no false cut on the negatives.

Timing (2 shared cores): every method's wall time divided by the BARE DECODE time of the same file
(PyAV, thread_type AUTO, every frame decoded, no conversion; best of --repeats). torch runs with
torch.set_num_threads(1). Ours: the analysis pass only (probe excluded; it includes what the pass
always does: small frames, per-frame signals, sampled frames for the filters). The TransNetV2 model
is loaded once before timing; its load time is printed separately. scenedetect: the subprocess's
wall time minus the CLI's start-up (measured on a 2-frame file, printed), raw times in the JSON.
To keep the run short the model's predictions are cached by input window: transnetv2 and
combined/union run the real model; combined/agree and combined/learned_plus_dissolves replay the
cached predictions for their (bit-identical) windows and their time is the replay time plus the
model time measured for those windows (marked *). --no-cache runs the model every time.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import av

SCENEDETECT = Path(sys.executable).with_name("scenedetect")
SD_DETECTORS = ("detect-content", "detect-adaptive", "detect-hist", "detect-hash", "detect-threshold")
OURS = {  # method -> AnalyzeConfig overrides
    "ours content": {"detector": "content"},
    "ours adaptive": {"detector": "adaptive"},
    "ours transnetv2": {"detector": "transnetv2", "transnet_dtype": "float32"},
    "ours combined/union": {"detector": "combined", "combine": "union", "transnet_dtype": "float32"},
    "ours combined/agree": {"detector": "combined", "combine": "agree", "transnet_dtype": "float32"},
    "ours combined/learned_plus_dissolves": {"detector": "combined", "combine": "learned_plus_dissolves", "transnet_dtype": "float32"},
    "ours transnetv2 bf16": {"detector": "transnetv2", "transnet_dtype": "bfloat16"},
    "ours combined/agree bf16": {"detector": "combined", "combine": "agree", "transnet_dtype": "bfloat16"},
}
# cached model unless --no-cache
REPLAYED = ("ours combined/agree", "ours combined/learned_plus_dissolves", "ours combined/agree bf16")
TOL = 2
GRADUAL = ("dissolve", "fade")


# ----------------------------------------------------------------------------------------- scoring
def score(found: list[list[int]], truth: list[list], negative: list[list]) -> dict:
    """One-to-one matching of found [a, b) to truth [s, e, kind]; see the module docstring."""
    def overlap(f, t):
        return f[0] < t[1] + TOL and f[1] > t[0] - TOL

    def dist(f, t):
        return abs((f[0] + f[1]) / 2 - (t[0] + t[1]) / 2)

    pairs = sorted((dist(f, t), i, j) for i, t in enumerate(truth) for j, f in enumerate(found) if overlap(f, t))
    t_match, f_match = {}, {}
    for _, i, j in pairs:
        if i not in t_match and j not in f_match:
            t_match[i], f_match[j] = j, i
    misses = [list(t) for i, t in enumerate(truth) if i not in t_match]
    false = []
    for j, f in enumerate(found):
        if j in f_match:
            continue
        why = next((f"fragment of {t[2]} {t[0]}-{t[1]}" for t in truth if t[2] in GRADUAL and overlap(f, t)), None)
        why = why or next((f"on {n[2]}" for n in negative if f[0] < n[1] and f[1] > n[0]), None)
        false.append([f[0], f[1], why or "no transition there"])
    tp, fp, fn = len(t_match), len(found) - len(f_match), len(truth) - len(t_match)
    fragments = sum(1 for x in false if x[2].startswith("fragment"))
    return {"tp": tp, "fp": fp, "fn": fn, "f1": f1(tp, fp, fn), "misses": misses, "false": false,
            "fragments": fragments,
            "gradual_missed": [m for m in misses if m[2] in GRADUAL],
            "fp_on_negatives": sum(1 for x in false if x[2].startswith("on "))}


def f1(tp: int, fp: int, fn: int) -> float | None:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


# ----------------------------------------------------------------------------------------- running
def file_info(path: Path) -> tuple[int, list[float]]:
    """Decoded frame count and each frame's time (seconds), untimed."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        times = [float(f.time) if f.time is not None else float("nan") for f in c.decode(stream)]
    return len(times), times


def bare_decode(path: Path) -> int:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in c.decode(stream))


def best_time(repeats: int, fn, *args):
    """(best wall time of `repeats` calls of fn(*args), the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


class CachedModel:
    """Wraps the loaded TransNetV2's predict_raw: records model time; optionally replays outputs
    for input windows seen before (same bytes -> the same deterministic model output)."""

    def __init__(self, model):
        self.model, self.real = model, model.predict_raw
        self.cache: dict[str, tuple] = {}
        self.model_s: dict[str, float] = {}  # window key -> seconds the real model took
        self.replay = False
        self.hits: list[str] = []  # windows served from the cache in this run
        model.predict_raw = self

    def __call__(self, frames):
        import torch

        key = (hashlib.sha1(frames.cpu().numpy().tobytes()).hexdigest() + str(tuple(frames.shape))
               + str(torch.is_autocast_enabled(frames.device.type)))  # bfloat16 windows apart
        if self.replay and key in self.cache:
            self.hits.append(key)
            return tuple(x.clone() for x in self.cache[key])
        t0 = time.perf_counter()
        out = self.real(frames)
        self.model_s[key] = time.perf_counter() - t0
        self.cache[key] = tuple(x.clone() for x in out)
        return out

    def start(self, replay: bool) -> None:
        self.replay, self.hits = replay, []

    def replayed_model_s(self) -> float:
        """Model time of the windows this run was served from the cache (measured when they ran)."""
        return sum(self.model_s[k] for k in self.hits)


def run_ours(source: dict, overrides: dict) -> list[list[int]]:
    from curation.analyze import analyze
    from curation.settings import AnalyzeConfig
    from spacetime.config import S3Config

    last = None
    for seg in analyze(source, AnalyzeConfig(**overrides), S3Config(), window_frames=250):
        last = seg
    return last["cuts"]


def run_scenedetect(path: Path, detector: str, workdir: Path, times: list[float], backend: str | None):
    """Cuts as [first, first + 1] (decoded-frame indices, from the CSV's start times); None if the
    CLI wrote no scene list (it decoded nothing)."""
    out = workdir / "sd.csv"
    out.unlink(missing_ok=True)
    cmd = [str(SCENEDETECT), "-q", "-i", str(path), "-o", str(workdir)] + (["-b", backend] if backend else [])
    subprocess.run(cmd + [detector, "list-scenes", "-s", "-f", out.name], check=True, capture_output=True)
    if not out.exists():
        return None
    with open(out) as f:
        rows = list(csv.DictReader(f))
    cuts = []
    for r in rows[1:]:
        t = float(r["Start Time (seconds)"])
        cuts.append(min(range(len(times)), key=lambda i: abs(times[i] - t)))
    return [[c, c + 1] for c in cuts]


def cli_startup(workdir: Path) -> float:
    """Wall time of the scenedetect CLI on a 2-frame file (interpreter, imports, open, write)."""
    from spacetime.standins import testmedia as tm

    tiny = workdir / "tiny.mp4"
    tm.make_multishot(tiny, [tm.Segment("bikes.mp4", 0, 1), tm.Segment("bigbuckbunny.mp4", 0, 1)],
                      size=(64, 64), dissolve_frames=0)
    t, _ = best_time(3, run_scenedetect, tiny, "detect-content", workdir, [0.0, 0.04], None)
    return t


# ----------------------------------------------------------------------------------------- report
def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cell_f1(s: dict, negative_file: bool) -> str:
    if negative_file:
        return "ok" if s["fp"] == 0 else f"**{s['fp']} FP**"
    txt = f"{s['f1']:.3f}"
    extra = ([f"{s['fn']}m"] if s["fn"] else []) + ([f"{s['fp']}f"] if s["fp"] else [])
    return txt + (f" ({' '.join(extra)})" if extra else "")


def report(results: dict, files: dict, methods: list[str], startup: float, load_s: float, cached: bool) -> dict:
    names = list(files)
    summary = {}
    for m in methods:
        tp = sum(results[n]["methods"][m]["score"]["tp"] for n in names)
        fp = sum(results[n]["methods"][m]["score"]["fp"] for n in names)
        fn = sum(results[n]["methods"][m]["score"]["fn"] for n in names)
        frag = sum(results[n]["methods"][m]["score"]["fragments"] for n in names)
        gradual = [(n, t) for n in names for t in files[n].transitions if t[2] in GRADUAL]
        g_missed = [(n, g) for n in names for g in results[n]["methods"][m]["score"]["gradual_missed"]]
        fp_neg = sum(results[n]["methods"][m]["score"]["fp_on_negatives"] for n in names)
        t_m = sum(results[n]["methods"][m]["time_s"] for n in names)
        t_d = sum(results[n]["decode_s"] for n in names)
        ok = (f1(tp, fp, fn) or 0) >= 0.995 and not g_missed and fp_neg == 0
        summary[m] = {"tp": tp, "fp": fp, "fn": fn, "f1": f1(tp, fp, fn), "fragments": frag,
                      "f1_fragments_ok": f1(tp, fp - frag, fn), "gradual_found": len(gradual) - len(g_missed),
                      "gradual": len(gradual), "fp_on_negatives": fp_neg, "time_s": t_m, "x_decode": t_m / t_d,
                      "goals_met": ok}

    short = {n: n.replace("multishot1080p", "1080p") for n in names}
    print("\n## F1 per file (hard cut +-2 frames, gradual by overlap; m = missed, f = false; negatives: false cuts)\n")
    rows = []
    for m in methods:
        rows.append([m] + [cell_f1(results[n]["methods"][m]["score"], not files[n].transitions) for n in names]
                    + [f"**{summary[m]['f1']:.3f}**"])
    print(md_table(["method"] + [short[n] for n in names] + ["overall"], rows))

    print("\n## Time as a multiple of the bare decode of each file\n")
    rows = [["bare decode (s)"] + [f"{results[n]['decode_s']:.3f}" for n in names]
            + [f"{sum(results[n]['decode_s'] for n in names):.2f}"]]
    rows.append(["bare decode (frames/s)"] + [f"{files[n].num_frames / results[n]['decode_s']:.0f}" for n in names] + [""])
    for m in methods:
        star = "*" if cached and m in REPLAYED else ""
        rows.append([m + star] + [f"{results[n]['methods'][m]['time_s'] / results[n]['decode_s']:.1f}" for n in names]
                    + [f"**{summary[m]['x_decode']:.1f}**"])
    print(md_table(["method"] + [short[n] for n in names] + ["all files"], rows))

    print("\n## Summary\n")
    rows = [[m, f"**{s['f1']:.3f}**", f"{s['tp']}/{s['fp']}/{s['fn']}", f"{s['f1_fragments_ok']:.3f} ({s['fragments']})",
             f"{s['gradual_found']}/{s['gradual']}", str(s["fp_on_negatives"]), f"{s['time_s']:.1f}",
             f"{s['x_decode']:.1f}", "yes" if s["goals_met"] else "no"]
            for m, s in summary.items()]
    print(md_table(["method", "F1", "TP/FP/FN", "F1 if fragments are ok (n)", "gradual found", "false cuts on negatives",
                    "time (s)", "x decode", "goals met"], rows))
    print("\n(fragments: extra pieces of a gradual transition that was found, e.g. a fade through black reported as "
          "fade-out + fade-in; counted as false positives in F1. Goals: F1 >= 0.995, every gradual transition "
          "found, no false cut on the negatives)")

    print("\n## Misses and false cuts\n")
    for m in methods:
        items = []
        for n in names:
            s = results[n]["methods"][m]["score"]
            items += [f"{n}: missed {k} {a}-{b}" for a, b, k in s["misses"]]
            items += [f"{n}: false [{a},{b}) ({why})" for a, b, why in s["false"]]
        print(f"- {m}: " + ("none" if not items else "; ".join(items)))

    print("\n## Notes\n")
    print("- truth: " + "; ".join(f"{n} ({files[n].num_frames} fr, {files[n].codec}): "
                                  + (", ".join(f"{k} {a}" + (f"-{b}" if b - a > 1 else "") for a, b, k in files[n].transitions)
                                     or "NEGATIVE: " + ", ".join(f"{w} {a}-{b}" for a, b, w in files[n].negative))
                                  for n in names))
    for n in names:
        if results[n].get("sd_backend_note"):
            print(f"- {n}: {results[n]['sd_backend_note']}")
    print(f"- scenedetect CLI start-up {startup:.2f} s per call, subtracted from its times (raw in the JSON)")
    print(f"- TransNetV2 model load {load_s:.2f} s, once, excluded from all times; torch.set_num_threads(1); "
          f"PyAV decoders thread_type AUTO; our pass runs with its defaults (incl. skip_loop_filter)")
    if cached:
        print("- * = replayed the cached TransNetV2 outputs for identical input windows; time = replay + "
              "the model time measured for those windows (--no-cache to run the model every time)")
    return summary


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small files (no 1080p, VFR, AV1)")
    parser.add_argument("--files", help="comma-separated subset of the ground-truth files")
    parser.add_argument("--workdir", type=Path, help="where the ground-truth files are made/reused (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--repeats", type=int, default=3, help="bare decode: best of this many")
    parser.add_argument("--mode-repeats", type=int, default=1, help="our modes and scenedetect: best of this many")
    parser.add_argument("--no-cache", action="store_true", help="run TransNetV2 for every mode (slower)")
    parser.add_argument("--methods", help="comma-separated subset of methods (e.g. 'ours content,detect-content')")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    import shot_truth

    from curation.probe import probe
    from curation.settings import ProbeConfig
    from curation.transnet import load_model
    from spacetime.config import S3Config

    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shots_"))
    names = args.files.split(",") if args.files else list(shot_truth.QUICK if args.quick else shot_truth.BUILDERS)
    print(f"ground truth in {work}")
    files = shot_truth.build_all(work, names)
    methods = list(OURS) + list(SD_DETECTORS)
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    need_model = any(OURS.get(m, {}).get("detector") in ("transnetv2", "combined") for m in methods)
    load_s = 0.0
    cache = None
    if need_model:
        t0 = time.perf_counter()
        cache = CachedModel(load_model("cpu"))
        load_s = time.perf_counter() - t0
    sdwork = work / "scenedetect"
    sdwork.mkdir(exist_ok=True)
    startup = cli_startup(sdwork) if any(m in SD_DETECTORS for m in methods) else 0.0

    results = {}
    for name, truth in files.items():
        path = Path(truth.path)
        n, times = file_info(path)
        assert n == truth.num_frames, (name, n, truth.num_frames)
        source = probe(str(path), ProbeConfig(), S3Config())
        decode_s, _ = best_time(args.repeats, bare_decode, path)
        res = results[name] = {"path": str(path), "num_frames": n, "decode_s": decode_s, "truth": truth.transitions,
                               "negative": truth.negative, "methods": {}}
        backend = None
        for m in methods:
            entry = {}
            if m in OURS:
                replay = cache is not None and not args.no_cache and m in REPLAYED
                if cache is not None:
                    cache.start(replay)
                t, found = best_time(args.mode_repeats, run_ours, source, OURS[m])
                if replay:
                    entry.update(replay_s=t, model_s=cache.replayed_model_s())
                    t += entry["model_s"]
            else:
                t, found = best_time(args.mode_repeats, run_scenedetect, path, m, sdwork, times, backend)
                if found is None and backend is None:  # the OpenCV backend decoded nothing
                    backend = "pyav"
                    res["sd_backend_note"] = ("scenedetect's default OpenCV backend decoded no frame (wrote no "
                                              "scene list); scored with -b pyav")
                    t, found = best_time(args.mode_repeats, run_scenedetect, path, m, sdwork, times, backend)
                entry.update(raw_s=t, backend=backend or "opencv")
                t = max(t - startup, 1e-6)
            entry.update(time_s=t, found=found, score=score(found, truth.transitions, truth.negative))
            res["methods"][m] = entry
        print(f"  {name}: {n} frames, decode {decode_s:.2f}s; "
              + ", ".join(f"{m.replace('ours ', '').replace('detect-', 'sd-')} {e['score']['f1'] if e['score']['f1'] is None else round(e['score']['f1'], 3)}"
                          for m, e in res["methods"].items()), flush=True)

    summary = report(results, files, methods, startup, load_s, cache is not None and not args.no_cache)
    total = time.perf_counter() - t_start
    print(f"\n(benchmark wall time {total:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({
            "meta": {"python": platform.python_version(), "av": av.__version__, "torch": torch.__version__,
                     "torch_threads": torch.get_num_threads(), "scenedetect_startup_s": startup,
                     "transnet_load_s": load_s, "cached_replay": cache is not None and not args.no_cache,
                     "tolerance_frames": TOL, "wall_s": total, "workdir": str(work)},
            "files": {n: {**r, "codec": files[n].codec, "notes": files[n].notes} for n, r in results.items()},
            "summary": summary}, indent=1))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
