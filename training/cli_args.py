"""Arguments of `spacetime train` and `spacetime sample`, kept free of torch imports so that
`spacetime --help` and every other command start fast; the handlers import the heavy modules."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of `spacetime train` besides --config / --set / --print-config / -v."""
    parser.add_argument("kind", choices=["dit", "vae", "cache", "plan"],
                        help="what to train; cache: precompute the DiT's VAE latents and text embeddings of "
                             "--data into the latent cache --output (then train dit --data CACHE); plan: print "
                             "each bucket's estimated memory per rank and the parallel.context it needs")
    parser.add_argument("--data", action="append", default=None, metavar="DIR",
                        help="curation output (or, for dit, latent cache) folder or s3:// URI (repeatable; "
                             "default: loader.data of the config)")
    parser.add_argument("--output", type=str, required=False, default=None, metavar="RUN",
                        help="run folder; rerunning on an existing one resumes from its newest checkpoint "
                             "(cache: the cache folder or s3:// URI; a rerun finishes it)")
    parser.add_argument("--rebuild", action="store_true",
                        help="cache only: replace a cache built with other models, frame sampling or data")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="plan only: memory of one GPU (default: this machine's GPU)")
    parser.add_argument("--world", type=int, default=None, help="plan only: number of ranks (default: WORLD_SIZE or 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop at this step (default: steps)")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of `spacetime eval`."""
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its newest checkpoint) or a checkpoint folder, of `spacetime train dit|vae`")
    parser.add_argument("--data", action="append", default=None, metavar="DIR",
                        help="curation output or latent cache whose held-out sources (the run's eval.fraction) are "
                             "evaluated (repeatable; default: the run's loader.data)")
    parser.add_argument("--val-data", action="append", default=None, metavar="DIR",
                        help="outputs evaluated whole (repeatable; default: the run's eval.data)")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA's")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")


MODES = ("text", "i2v", "extend-forward", "extend-backward", "loop", "interpolate", "v2v")


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run folder (its newest checkpoint) or a checkpoint folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="", help="the unconditional prompt of CFG (default: empty)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--frames", type=int, default=33, help="1 for an image (PNG)")
    parser.add_argument("--out", type=Path, required=True, help="output .mp4 (or .png for 1 frame)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=24.0)
    parser.add_argument("--mode", choices=MODES, default="text",
                        help="text: text only; i2v: --image as frame 0; extend-forward/-backward: --video at the "
                             "start/end; loop: --video (or --image) at both ends; interpolate: --video then --video2; "
                             "v2v: SDEdit of --video with --strength")
    parser.add_argument("--image", type=Path, help="image (or video: its first frame) for i2v / loop")
    parser.add_argument("--video", type=Path, help="input video for extend / loop / interpolate / v2v")
    parser.add_argument("--video2", type=Path, help="second video for interpolate")
    parser.add_argument("--strength", type=float, default=0.6, help="v2v: noise level to restart from (0..1)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--upsample", action="store_true", help="make the prompt dense with captioner.upsample")
    parser.add_argument("--caption-config", type=Path, default=None, help="captioner config for --upsample")
    parser.add_argument("--device", default=None)
