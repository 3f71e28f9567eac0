"""The `spacetime` command for every wing (also `python -m spacetime`, `torchrun -m spacetime`).

Each subcommand takes --config FILE, repeated --set key=value and --print-config. The wings
(curation, captioner, training) and the stand-ins are imported inside the handlers, so
`spacetime --help` stays instant. `tiny:` model references build the tiny random stand-ins on first
use: this layer registers that builder with the resolver (spacetime.models), which never imports them.
Errors a user can fix (spacetime.errors.UserError) print as one line with exit status 2; a run that an
infrastructure fault left incomplete (spacetime.faults.RunIncomplete) says how many sources are left and
why, with exit status 3: the same command completes them.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from importlib import metadata
from pathlib import Path

from spacetime.config import ConfigError, dump_config, load_config
from spacetime.errors import UserError
from spacetime.faults import EXIT_INCOMPLETE, RunIncomplete

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _config_args(parser: argparse.ArgumentParser, default: Path | None) -> None:
    parser.add_argument("--config", type=Path, default=default,
                        help=f"YAML config file (default: {default})" if default else "YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. --set split.max_duration=8 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging (curate: also Ray's own messages on the console, not in OUT/logs/ray.log)")


def _resolve(args: argparse.Namespace, model):
    cfg = load_config(model, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        raise SystemExit(0)
    return cfg


# ------------------------------------------------------------------------------------ handlers
def cmd_version(args: argparse.Namespace) -> int:
    print(f"spacetime {metadata.version('spacetime')}")
    return 0


def cmd_models_build_tiny(args: argparse.Namespace) -> int:
    from spacetime.models import default_tiny_dir
    from spacetime.standins.tiny_models import build_all

    out = args.out or default_tiny_dir()
    info = build_all(Path(out))
    print(f"tiny random models (untrained stand-ins, NOT real weights) in {out}")
    for name, value in info.items():
        print(f"  {name}: {value}")
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from spacetime.standins.samples import copy_samples

    for path in copy_samples(args.out):
        print(path)
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from curation.pipeline import run_curation
    from curation.settings import CurateConfig

    cfg = _resolve(args, CurateConfig)
    if args.dashboard:
        cfg.ray.dashboard = True
    if not args.input:
        raise ConfigError("spacetime curate: give at least one --input URI")
    if args.output is None:
        raise ConfigError("spacetime curate: give --output DIR")
    summary = run_curation(args.input, args.output, cfg, ray_address=args.ray_address,
                           ray_log=not getattr(args, "verbose", False), retry_failed=args.retry_failed)
    failed = summary["clips"]["failed"] + summary["sources"]["failed"]
    print(f"curated {summary['sources']['ok']}/{summary['sources']['total']} sources: "
          f"{summary['clips']['kept']} clips kept of {summary['clips']['total']} "
          f"in {summary['shards']} shards -> {args.output}"
          + (f"; {summary['sources']['failed']} sources and {summary['clips']['failed']} clips failed "
             "(after fixing the cause: --retry-failed)" if failed else ""))
    return 0


def _caption_config(args: argparse.Namespace):
    """The resolved CaptionConfig of a `spacetime caption` command (tiny: model references built)."""
    from captioner.config import CaptionConfig
    from spacetime.models import resolve

    cfg = _resolve(args, CaptionConfig)
    cfg.model = resolve(cfg.model)
    return cfg


def cmd_caption(args: argparse.Namespace) -> int:
    """`spacetime caption --input DIR --output DIR`: recaption an existing dataset (resumable)."""
    from captioner.recaption import run_recaption

    cfg = _caption_config(args)
    if args.input is None or args.output is None:
        raise ConfigError("spacetime caption: give --input DATASET and --output DIR (or an action: upsample, finetune)")
    summary = run_recaption(args.input, args.output, cfg)
    print(json.dumps(summary, indent=1))
    if summary.get("failed"):
        print(f"spacetime caption: {summary['failed']} clips failed; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


def cmd_caption_upsample(args: argparse.Namespace) -> int:
    from captioner.upsample import dataset_examples, upsample

    cfg = _caption_config(args)
    examples = dataset_examples(args.examples_from) if args.examples_from else None
    print(upsample(args.prompt, cfg, examples))
    return 0


def cmd_caption_finetune(args: argparse.Namespace) -> int:
    from captioner.finetune import FinetuneConfig, finetune

    cfg = _resolve(args, FinetuneConfig)
    result = finetune(args.data, args.base, args.output, cfg)
    print(json.dumps(result, indent=1))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import cmd_train as run

    return run(args)


def cmd_eval(args: argparse.Namespace) -> int:
    from training.validate import cmd_eval as run

    return run(args)


def cmd_sample(args: argparse.Namespace) -> int:
    from training.sample import cmd_sample as run

    return run(args)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from curation.calibrate import calibrate

    try:
        calibrate(args.filter, args.manifest, args.labels, args.target_precision, args.plot)
    except (ValueError, FileNotFoundError) as err:
        print(f"spacetime calibrate: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from curation.review import Review, serve
    from spacetime.config import S3Config

    s3 = S3Config(endpoint=args.s3_endpoint)
    try:
        if args.review_command is None:
            serve(args.output, args.port, args.reviewer, s3, args.host)
            return 0
        from curation import label_studio

        state = Review(args.output, args.reviewer or "label-studio", s3)
        if args.review_command == "export":
            result = label_studio.export(state, args.to, args.media_url or f"http://127.0.0.1:{args.port}",
                                         state.select(status=args.status))
        else:
            result = label_studio.import_annotations(state, args.file)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    print(json.dumps(result, indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from curation.report import build_report

    print(build_report(args.output))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from curation.inspection import inspect

    print(inspect(args.output, args.samples, args.seed))
    return 0


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spacetime",
        description="Video data engine and DiT trainer: curate raw video into native-resolution "
                    "captioned WebDataset shards, and train on them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("version", help="print the installed version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("models", help="model utilities (tiny random stand-ins for offline use)")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    b = msub.add_parser("build-tiny", help="build tiny RANDOM models (VLM, open_clip + aesthetic head, "
                                           "text encoder) loadable offline; untrained stand-ins")
    b.add_argument("--out", type=Path, default=None,
                   help="folder (default: $SPACETIME_TINY_MODELS or ~/.cache/spacetime/tiny-models)")
    b.set_defaults(func=cmd_models_build_tiny)

    p = sub.add_parser("samples", help="copy the bundled real sample videos (and a generated multi-shot "
                                       "video with known cuts) into a folder, for demos")
    p.add_argument("--out", type=Path, default=Path("samples"), help="destination folder (default: ./samples)")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("curate", help="raw videos -> scenes -> filtered native-resolution WebDataset shards",
                       description="Split raw videos into scene clips, filter, caption and write "
                                   "WebDataset shards plus Parquet manifests. Rerunning on the same "
                                   "--output resumes.")
    p.add_argument("--input", action="append", default=[], metavar="URI",
                   help="file, folder, glob, s3://bucket/prefix, or a .txt file listing URIs (repeatable)")
    p.add_argument("--output", default=None, metavar="DIR", help="output: a local folder or s3://bucket/prefix (S3 settings: sources.s3 of the config)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: $RAY_ADDRESS, else a local embedded Ray)")
    p.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard with the local Ray (127.0.0.1) and print its URL")
    p.add_argument("--retry-failed", action="store_true",
                   help="also run again the sources and clips the last version recorded as failed (after a "
                        "decoder or model upgrade), published as a new version; other shards are untouched")
    _config_args(p, CONFIG_DIR / "curate" / "default.yaml")
    p.set_defaults(func=cmd_curate)

    from training.cli_args import add_eval_args, add_sample_args, add_train_args

    p = sub.add_parser("train", help="train the DiT or the video VAE (torchrun for several processes)",
                       description="Train on curation outputs; rerunning on an existing --output resumes "
                                   "exactly. Several processes: torchrun --nproc-per-node N -m spacetime train ...")
    add_train_args(p)
    _config_args(p, CONFIG_DIR / "train" / "tiny.yaml")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation figures of a training checkpoint on held-out data, as JSON",
                       description="The validation record `spacetime train` logs (DiT: flow loss at fixed timesteps "
                                   "per quantile and bucket; VAE: L1, PSNR, SSIM), for any checkpoint: the run's "
                                   "config, held-out sources and EMA weights, bit for bit.")
    add_eval_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate a video or image from a DiT checkpoint (any size; i2v, "
                                      "extend, loop, interpolate, video-to-video)")
    add_sample_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("caption", help="(re)caption a dataset with a VLM; actions: upsample, finetune",
                       description="Without an action: recaption the curation output --input into --output "
                                   "(same shards, new captions; idempotent and resumable by clip id).")
    p.add_argument("--input", type=Path, default=None, metavar="DATASET", help="a curation (or caption) output")
    p.add_argument("--output", type=Path, default=None, metavar="DIR", help="output folder")
    _config_args(p, CONFIG_DIR / "caption" / "default.yaml")
    p.set_defaults(func=cmd_caption)
    csub = p.add_subparsers(dest="caption_command", metavar="ACTION", required=False)
    u = csub.add_parser("upsample", help="short prompt -> dense caption in the dataset's caption style")
    u.add_argument("prompt", help='e.g. "a cat on a skateboard"')
    u.add_argument("--examples-from", type=Path, default=None, metavar="DATASET",
                   help="take few-shot example captions from this dataset's shards")
    _config_args(u, CONFIG_DIR / "caption" / "default.yaml")
    u.set_defaults(func=cmd_caption_upsample)
    f = csub.add_parser("finetune", help="fine-tune the captioner VLM on (clip, caption) pairs (LoRA or full)",
                        description="Train with the same frames and prompt as captioning; writes "
                                    "OUTPUT/merged (serve with vLLM) and OUTPUT/adapter. Rerun to resume.")
    f.add_argument("--data", type=Path, required=True,
                   help="a curation output folder, OUT/review (the captions people edited in `spacetime review`), "
                        "or a JSONL of {video|shard+key, caption|fields}")
    f.add_argument("--base", required=True, help="base model: Hugging Face id or local path")
    f.add_argument("--output", type=Path, required=True, help="run folder (checkpoints, adapter, merged)")
    _config_args(f, CONFIG_DIR / "caption" / "finetune.yaml")
    f.set_defaults(func=cmd_caption_finetune)

    from curation.calibrate import FILTERS

    p = sub.add_parser("calibrate", help="precision/recall of a filter's threshold against labelled clips")
    p.add_argument("filter", choices=sorted(FILTERS), help="which filter (score) to calibrate")
    p.add_argument("--manifest", default=None,
                   help="OUT/manifest/clips.parquet of a curation run (default with --labels OUT/review: OUT's)")
    p.add_argument("--labels", required=True,
                   help="CSV with columns clip_id,bad (1 = should be rejected), or OUT/review: the accept/reject "
                        "decisions of `spacetime review OUT`")
    p.add_argument("--target-precision", type=float, default=0.9)
    p.add_argument("--plot", type=Path, default=Path("pr_curve.png"), help="where to write the PR-curve PNG")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("review", help="a local page to go through the clips of a curation output: accept, "
                                      "reject, edit captions (decisions in OUT/review/)",
                       description="Serve the review page on 127.0.0.1. Keys: j/k next/previous, a accept, r reject, "
                                   "e edit the caption (Ctrl+Enter saves). Each decision is appended to OUT/review/ "
                                   "at once; `spacetime calibrate FILTER --labels OUT/review` and `spacetime caption "
                                   "finetune --data OUT/review` read them.")
    p.add_argument("output", metavar="OUT", help="a `spacetime curate` output: folder or s3://bucket/prefix")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--reviewer", default=None, help="name recorded with each decision (default: your login)")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint of an s3:// OUT (default: $AWS_ENDPOINT_URL)")
    p.set_defaults(func=cmd_review)
    rsub = p.add_subparsers(dest="review_command", metavar="[ACTION]", required=False,
                            help="none: serve the page; export / import: Label Studio tasks and annotations")
    e = rsub.add_parser("export", help="Label Studio tasks of the clips (and the labeling config, FILE.xml)",
                        description="Write Label Studio tasks: each clip's video URL (served by `spacetime review OUT`) "
                                    "and its captions as pre-annotations; the labeling config goes beside them.")
    e.add_argument("--format", choices=["label-studio"], default="label-studio")
    e.add_argument("--to", type=Path, required=True, metavar="FILE", help="tasks JSON to write")
    e.add_argument("--status", default="kept", help="clips to export: kept (default), rejected, failed, flagged, or '' for all")
    e.add_argument("--media-url", default=None, help="base URL Label Studio loads the videos from "
                                                     "(default: http://127.0.0.1:PORT, the review page)")
    i = rsub.add_parser("import", help="append the decisions of a Label Studio JSON export to OUT/review/")
    i.add_argument("file", type=Path, help="Label Studio's JSON export of a project made with `export`")
    i.add_argument("--format", choices=["label-studio"], default="label-studio")

    p = sub.add_parser("report", help="(re)build OUT/report/index.html of a curation output")
    p.add_argument("output", metavar="OUT", help="a `spacetime curate` output: folder or s3://bucket/prefix")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("inspect", help="summarise a curation output in the terminal (sources, clips by reason, "
                                       "hours, buckets, captions) and show random clips with their captions")
    p.add_argument("output", metavar="OUT", help="a `spacetime curate` output: folder or s3://bucket/prefix")
    p.add_argument("--samples", type=int, default=0, metavar="N", help="also show N random kept clips")
    p.add_argument("--seed", type=int, default=0, help="seed of the --samples draw")
    p.set_defaults(func=cmd_inspect)
    return parser


def _build_tiny(folder: Path) -> dict:
    from spacetime.standins.tiny_models import build_all

    logging.getLogger("spacetime").info("building the tiny random stand-in models in %s (first use)", folder)
    return build_all(folder)


def main(argv: list[str] | None = None) -> int:
    from spacetime.models import register_tiny_builder

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    register_tiny_builder(_build_tiny)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"spacetime: config error: {err}", file=sys.stderr)
        return 2
    except RunIncomplete as err:  # an infrastructure fault left work undone: the same command resumes
        print(f"spacetime: {err}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except UserError as err:  # raised on purpose: the message names the input and the fix
        print(f"spacetime: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `spacetime inspect out | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _no_triton_without_a_gpu() -> None:
    """On a machine without an NVIDIA device, make `import triton` fail as if it were not installed.
    vLLM's xgrammar installs triton; transformers imports torch._dynamo, which imports triton when it
    is installed, and its native module then prints ~30 lines of nanobind "leaked" warnings at every
    exit of a training, sampling or eval command. Triton only compiles GPU kernels, so without a GPU
    nothing is lost (torch.compile on CPU uses its C++ backend). SPACETIME_KEEP_TRITON=1 keeps it."""
    if not Path("/dev/nvidiactl").exists() and not os.environ.get("SPACETIME_KEEP_TRITON"):
        sys.modules.setdefault("triton", None)  # type: ignore[assignment]


def entry() -> int:
    """The process's entry point (the `spacetime` script, `python -m spacetime`): `main`, then an exit
    without the interpreter's final garbage-collection passes over everything the command imported.
    Those passes took ~0.65 s after `spacetime curate` (Ray, Ray Data, pyarrow, pandas and the rest:
    ~2200 modules), a quarter of the run's tail after its last source (#12); `gc.freeze()` leaves
    them out. Exit handlers (atexit, `weakref.finalize`) still run; only objects in reference cycles
    are left to the operating system instead of being freed one by one. `main` does not freeze:
    tests call it in their own process."""
    _no_triton_without_a_gpu()
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
