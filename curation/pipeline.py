"""The curation pipeline: a short list of Ray Data stages, then the driver-side write.

    sources -> probe -> analyze -> split -> borders -> exposure -> sharpness -> motion -> aesthetic
            -> caption -> extract -> write (driver: completion records, shards, manifests, report)

A stage is a small class: `__init__` loads what it needs once per actor, `__call__` handles one row.
Resources (CPUs, GPUs, actor pool size) come from the config section of the same name. Rows are
{"meta": JSON text, "sampled": npy bytes of the frames kept for filters and captioning}: one stable
Arrow schema through every stage, and no large payload rides in a row (clips are staged as files).
Bad input never stops a run: each failure becomes a manifest row with a readable error.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from importlib import metadata
from pathlib import Path

from captioner.stage import Caption
from curation import shards
from curation.filters import Aesthetic, Borders, Exposure, Motion, Sharpness
from curation.settings import CurateConfig, Resources
from curation.stage import BatchStage, Stage, _error, pack, unpack  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


class Probe(Stage):
    name = "probe"

    def __call__(self, row: dict) -> dict:
        from curation.probe import ProbeError, probe

        t0 = time.perf_counter()
        meta, _ = unpack(row)
        try:
            meta["source"] = probe(meta["source"]["uri"], self.cfg.probe, self.cfg.sources.s3)
        except Exception as err:  # every failure is a manifest row, never a crash
            meta["source"].update(status="failed", error=str(err) if isinstance(err, ProbeError) else _error(err))
        return pack(self.timed(meta, t0))


class Analyze(Stage):
    """One decode pass; yields one row per segment (bounded memory for any video length)."""

    name = "analyze"

    def __call__(self, row: dict):
        from curation.analyze import analyze

        meta, _ = unpack(row)
        source = meta["source"]
        if source["status"] != "ok":
            yield pack(dict(meta, seg_index=0, final=True, segment=None))
            return
        window = max(1, int(self.cfg.split.max_duration * source["fps"]))
        t0 = time.perf_counter()
        seg_index = 0
        try:
            for seg in analyze(source, self.cfg.analyze, self.cfg.sources.s3, window):
                sampled = seg.pop("sampled")
                seg_index = seg["seg_index"] + 1
                if seg["final"]:
                    source.update(num_frames=seg.pop("num_frames"), cuts=seg.pop("cuts"))
                out = dict(meta, seg_index=seg["seg_index"], final=seg["final"], segment=seg, source=source)
                yield pack(self.timed(out, t0), sampled)
                t0 = time.perf_counter()
        except Exception as err:
            source.update(status="failed", error=f"analysis failed: {_error(err)}")
            log.debug(traceback.format_exc())
            yield pack(dict(meta, seg_index=seg_index, final=True, segment=None, source=source))


class Split(Stage):
    """One row per clip candidate; a segment without clips still yields one (clip-less) row, so
    the writer can count every segment's rows."""

    name = "split"

    def __call__(self, row: dict):
        from curation.split import split_segment

        t0 = time.perf_counter()
        meta, sampled = unpack(row)
        seg = meta.pop("segment")
        clips = []
        if seg is not None:
            seg["sampled"] = sampled
            clips = split_segment(meta["source"], seg, self.cfg.split, self.cfg.analyze)
        rows = [pack(dict(meta, clip=None))] if not clips else [
            pack(dict(meta, clip={k: v for k, v in c.items() if k != "sampled"}), c["sampled"]) for c in clips]
        for r in rows:
            m, s = unpack(r)
            m["rows_in_segment"] = len(rows)
            yield pack(self.timed(m, t0), s)


def write_thumbnail(sampled: bytes, path: Path, width: int = 192) -> None:
    """The middle sampled frame as a small JPEG, for the report (every clip: kept or rejected)."""
    import cv2

    from curation.analyze import decode_frames

    frames = decode_frames(sampled)
    if not len(frames):
        return
    frame = frames[len(frames) // 2]
    height = max(2, round(frame.shape[0] * width / frame.shape[1]))
    ok, data = cv2.imencode(".jpg", cv2.resize(frame[..., ::-1], (width, height), interpolation=cv2.INTER_AREA),
                            [cv2.IMWRITE_JPEG_QUALITY, 80])
    if ok:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data.tobytes())
        tmp.replace(path)


class Extract(Stage):
    name = "extract"

    def __call__(self, row: dict) -> dict:
        from curation.extract import extract_clip

        t0 = time.perf_counter()
        meta, sampled = unpack(row)
        clip = meta.get("clip")
        if clip and sampled:
            write_thumbnail(sampled, self.out / shards.REPORT_DIR / "thumbs" / f"{clip['clip_id']}.jpg")
        if clip and clip["status"] == "candidate":
            try:
                clip.update(extract_clip(clip, meta["source"], self.cfg.extract, self.cfg.sources.s3,
                                         self.out / shards.WORK_DIR / "clips"))
                clip["bucket"] = shards.bucket_for(clip["width"], clip["height"], clip["num_frames"]).name
                clip["status"] = "kept"
            except Exception as err:
                clip.update(status="failed", reason=f"extract failed: {_error(err)}")
        if clip:
            clip.pop("signals", None)  # per-frame signals stay out of the manifests
        return pack(self.timed(meta, t0))  # frames are dropped here: the driver never receives them


# The pipeline: (stage, Ray Data operation, config section holding its resources).
STAGES = [
    (Probe, "map", "probe"),
    (Analyze, "flat_map", "analyze"),
    (Split, "flat_map", "split"),
    (Borders, "map", "filters.borders"),  # first: crops the frames the next filters see
    (Exposure, "map", "filters.exposure"),
    (Sharpness, "map", "filters.sharpness"),
    (Motion, "map", "filters.motion"),
    (Aesthetic, "map_batches", "filters.aesthetic"),
    (Caption, "map_batches", "caption"),  # after the filters: only surviving clips are captioned
    (Extract, "map", "extract"),
]


def _section(cfg: CurateConfig, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _apply(ds, stage, op: str, res: Resources, cfg: CurateConfig, out: str):
    import ray.data

    pool = dict(size=max(1, res.actors))
    if res.calls_per_actor > 1:
        pool["max_concurrent_calls_per_actor"] = res.calls_per_actor
    kwargs = dict(fn_constructor_kwargs={"cfg": cfg, "out": out}, num_cpus=res.num_cpus,
                  compute=ray.data.ActorPoolStrategy(**pool))
    if res.num_gpus:
        kwargs["num_gpus"] = res.num_gpus
    if op == "map_batches":
        kwargs.update(batch_size=res.batch_size, batch_format="numpy")
    return getattr(ds, op)(stage, **kwargs)


def init_ray(cfg: CurateConfig, address: str | None) -> None:
    import ray

    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.print_on_execution_start = False


def _versions() -> dict:
    names = ["spacetime", "av", "scenedetect", "ray", "webdataset", "pyarrow", "torch"]
    return {n: metadata.version(n) for n in names}


def preflight(cfg: CurateConfig) -> None:
    """Resolve every model reference before any worker starts (builds tiny models if missing;
    fails early, naming the model, where real weights cannot be had)."""
    from curation.models import preflight_hf_model, preflight_open_clip, resolve

    a = cfg.filters.aesthetic
    if a.enabled:
        resolve(a.config_dir)
        resolve(a.head)
        preflight_open_clip(resolve(a.model), resolve(a.pretrained))
    if cfg.caption is not None:
        if cfg.caption.model.startswith("tiny:"):  # workers get the resolved local path
            cfg.caption.model = resolve(cfg.caption.model)
        if cfg.caption.engine != "openai":  # an endpoint serves its own model
            preflight_hf_model(cfg.caption.model)


def run_curation(inputs: list[str], output: str, cfg: CurateConfig, ray_address: str | None = None) -> dict:
    """Curate `inputs` into `output` (resumable: rerunning the same command continues)."""
    import ray.data
    from tqdm import tqdm

    from curation.config import dump_config
    from curation.sources import list_inputs
    from curation.write import CompletionTracker, RunDir, finalize

    wall_start = time.time()
    out = Path(output).resolve()
    uris = list_inputs(inputs, cfg.sources)
    if not uris:
        raise RuntimeError(f"no video found in inputs {inputs} (extensions: {cfg.sources.extensions})")
    preflight(cfg)
    run = RunDir(out)
    # Resources do not change results, so a rerun may use other ones; everything else must match.
    result_cfg = cfg.model_dump(mode="json", exclude={"ray": True})
    for section in result_cfg.values():
        if isinstance(section, dict):
            section.pop("resources", None)
    run.claim({"inputs": uris, "config": result_cfg, "spacetime": metadata.version("spacetime")})
    (out / "config.yaml").write_text(dump_config(cfg))
    pending = [u for u in uris if not run.is_done(u)]
    log.info("%d sources, %d already done, %d to process -> %s", len(uris), len(uris) - len(pending),
             len(pending), out)
    if pending:
        init_ray(cfg, ray_address)
        items = [pack({"source": {"uri": u, "status": "pending"}}) for u in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        for stage, op, section in STAGES:
            if _section(cfg, section) is not None:  # an optional stage left out of the config
                ds = _apply(ds, stage, op, _section(cfg, section).resources, cfg, str(out))
        tracker = CompletionTracker(run)
        with tqdm(total=len(pending), desc="sources", unit="src", disable=None) as bar:
            for row in ds.iter_rows():
                if tracker.add(unpack(row)[0]):
                    bar.update(1)
        missing = [u for u in pending if not run.is_done(u)]
        if missing:
            raise RuntimeError(f"{len(missing)} sources did not complete (first: {missing[0]}); rerun to resume")
    summary = finalize(run, uris, cfg.write.shard_size_mb, wall_start, _versions())
    from curation.report import build_report

    build_report(out)
    log.info("kept %d of %d clips in %d shards", summary["clips"]["kept"], summary["clips"]["total"],
             summary["shards"])
    return summary
