"""The curation pipeline: a short list of Ray Data stages, then the driver-side write.

    sources -> probe -> analyze -> split -> borders -> text -> exposure -> sharpness -> motion -> fingerprint
            -> dedup gate -> aesthetic -> caption -> extract -> write (shards per unit; manifests, report)

The dedup gate decides duplicate sources and near-duplicate clips in processing order before the
expensive stages (after the aesthetic score when `dedup.keep` ranks by it): curation.duplicates.

`stages()` below is that list.

A stage is a small class built from its own config section: `__init__` loads what it needs once per
worker process, `__call__` handles one row. Stages without a model run as Ray tasks (Ray Data fuses
the consecutive ones: probe to the last filter is one task per source, in one process); the model
stages (aesthetic, caption) run as actor pools. Resources come from each section. Rows are
{"meta": JSON text, "sampled": npy bytes of the frames kept for filters and captioning}: one stable
Arrow schema through every stage, and no large payload rides in a row (clips are staged as files).
Bad input never stops a run: each failure becomes a manifest row with a readable error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from curation.caption import Caption
from curation.duplicates import DedupGate, FirstClaims, dedup_key
from curation.filters import Aesthetic, Alignment, Borders, Exposure, Fingerprint, Motion, Sharpness, Text
from curation.settings import AnalyzeConfig, CurateConfig, ExtractConfig, ProbeConfig, SplitConfig
from curation.stage import RETAINED, Stage, defer, fail, pack, unpack
from spacetime import contract
from spacetime.config import S3Config, result_fingerprint
from spacetime.errors import UserError, describe
from spacetime.faults import RunIncomplete, is_infrastructure, retry
from spacetime.store import Store

log = logging.getLogger(__name__)
LOGS_DIR = contract.LOGS_DIR


class Probe(Stage):
    """Also spots a source whose content an earlier dataset version already holds (its digest is in
    that version's sources manifest, `known`): status `duplicate`, and no later stage decodes it.
    Duplicates within one run are decided by the dedup gate (curation.duplicates.DedupGate)."""

    name = "probe"

    def __init__(self, cfg: ProbeConfig, s3: S3Config, out: Store, known: str | None, claims=None):
        """`claims`: the run's FirstClaims actor (curation.duplicates), if any."""
        import pyarrow.parquet as pq

        super().__init__(cfg)
        self.s3, self.claims = s3, claims
        self.known: set[str] = set()
        if known:  # two columns of the last version's manifest: ~150 bytes a source, per probe actor
            names = pq.read_schema(out.path(known), filesystem=out.fs).names
            columns = ["status", "digest"] + (["stream_digest"] if "stream_digest" in names else [])
            table = pq.read_table(out.path(known), columns=columns, filesystem=out.fs)
            status = table.column("status").to_pylist()
            for name in columns[1:]:
                self.known |= {d for d, st in zip(table.column(name).to_pylist(), status) if st == "ok" and d}

    def __call__(self, row: dict) -> dict:
        from curation.probe import ProbeError, probe

        t0 = time.perf_counter()
        meta, _ = unpack(row)
        uri = meta["source"]["uri"]
        try:  # a storage hiccup is retried; what persists leaves the source for the rerun
            meta["source"] = retry(lambda: probe(uri, self.cfg, self.s3), f"{uri}: probe")
            if {meta["source"]["digest"], dedup_key(meta["source"])} & self.known and "retain" not in meta:
                # (a retry may know itself)
                meta["source"]["status"] = "duplicate"  # of an earlier version's source (named by the gate)
            elif self.claims is not None and "order" in meta:
                self._claim(meta["source"], meta["order"])
        except Exception as err:  # every failure is a manifest row (or left for the rerun), never a crash
            if is_infrastructure(err):
                defer(meta["source"], f"probe: {describe(err)}")
            else:
                meta["source"].update(status="failed", error=str(err) if isinstance(err, ProbeError) else describe(err))
        return pack(self.timed(meta, t0))

    def _claim(self, source: dict, order: int) -> None:
        """A byte-identical copy of an earlier source of this run is a duplicate before anything decodes it."""
        import ray

        try:
            original = ray.get(self.claims.claim.remote(dedup_key(source), order, source["uri"]), timeout=60)
        except Exception as err:  # only work is lost: the dedup gate decides it all the same
            log.warning("%s: the digest claim failed (%s); the dedup gate decides", source["uri"], describe(err))
            return
        if original is not None:
            source.update(status="duplicate", duplicate_of=original)


class Analyze(Stage):
    """One decode pass; yields one row per segment (bounded memory for any video length)."""

    name = "analyze"

    def __init__(self, cfg: AnalyzeConfig, s3: S3Config, max_duration: float):
        """`max_duration`: split.max_duration; a long shot is flushed in windows of that length."""
        super().__init__(cfg)
        self.s3, self.max_duration = s3, max_duration

    def __call__(self, row: dict):
        from curation.analyze import analyze
        from curation.split import window_frames

        meta, _ = unpack(row)
        source = meta["source"]
        if source["status"] != "ok":  # failed, duplicate or deferred: nothing to decode
            yield pack(dict(meta, seg_index=0, final=True, segment=None))
            return
        window = window_frames(self.max_duration, source["fps"])
        t0 = time.perf_counter()
        seg_index = 0
        try:
            for seg in analyze(source, self.cfg, self.s3, window):
                sampled = seg.pop("sampled")
                seg_index = seg["seg_index"] + 1
                if seg["final"]:
                    source.update(num_frames=seg.pop("num_frames"), cuts=seg.pop("cuts"),
                                  decode_errors=seg.pop("decode_errors"))
                # Each row carries only its own seconds (the writer sums them over rows): the
                # upstream stages' on the first segment, this segment's analysis on each.
                out = dict(meta, seg_index=seg["seg_index"], final=seg["final"], segment=seg, source=source,
                           timings=dict(meta.get("timings", {})) if seg["seg_index"] == 0 else {})
                yield pack(self.timed(out, t0), sampled)
                t0 = time.perf_counter()
        except Exception as err:
            if is_infrastructure(err):  # e.g. the object store went away mid-read: not the video's fault
                defer(source, f"analyze: {describe(err)}")
            else:
                source.update(status="failed", error=f"analysis failed: {describe(err)}")
            log.debug(traceback.format_exc())
            yield pack(dict(meta, seg_index=seg_index, final=True, segment=None, source=source))


class Split(Stage):
    """One row per clip candidate; a segment without clips still yields one (clip-less) row, so
    the writer can count every segment's rows. A segment that cannot be split yields that row with
    its source failed; the source's other segments go on (as after an analysis that fails midway)."""

    name = "split"

    def __init__(self, cfg: SplitConfig, max_sampled: int):
        """`max_sampled`: analyze.max_sampled_per_clip (sampled frames handed on per clip)."""
        super().__init__(cfg)
        self.max_sampled = max_sampled

    def __call__(self, row: dict):
        from curation.retry import retain_settled
        from curation.split import split_segment

        t0 = time.perf_counter()
        meta, sampled = unpack(row)
        seg = meta.pop("segment")
        clips = []
        if seg is not None:
            seg["sampled"] = sampled
            try:
                clips = split_segment(meta["source"], seg, self.cfg, self.max_sampled)
                if "retain" in meta:  # a retried source: the clips an earlier attempt settled stand
                    retain_settled(clips, meta["retain"])
            except Exception as err:  # this segment's source fails (the writer reads it off any row)
                meta["source"] = dict(meta["source"], status="failed",
                                      error=f"split failed on segment {meta['seg_index']}: {describe(err)}")
                log.debug(traceback.format_exc())
        rows = [(dict(meta, clip=None), b"")] if not clips else [
            (dict(meta, clip={k: v for k, v in c.items() if k != "sampled"}),
             c["sampled"] if c["status"] != RETAINED else b"") for c in clips]
        share = (time.perf_counter() - t0) / len(rows)
        for k, (m, s) in enumerate(rows):
            # The segment's seconds so far go on its first row only (the writer sums over rows).
            m.update(rows_in_segment=len(rows), timings=dict(meta.get("timings", {})) if k == 0 else {})
            m["timings"]["split"] = m["timings"].get("split", 0.0) + share
            yield pack(m, s)


def write_thumbnail(frames, store: Store, rel: str, width: int = 192) -> None:
    """The middle sampled frame (RGB arrays) as a small JPEG, for the report (every clip: kept or rejected)."""
    import cv2

    if not len(frames):
        return
    frame = frames[len(frames) // 2]
    height = max(2, round(frame.shape[0] * width / frame.shape[1]))
    ok, data = cv2.imencode(".jpg", cv2.resize(frame[..., ::-1], (width, height), interpolation=cv2.INTER_AREA),
                            [cv2.IMWRITE_JPEG_QUALITY, 80])
    if ok:
        store.write(rel, data.tobytes())


def write_preview(frames, store: Store, rel: str, width: int = 256, frame_ms: int = 250) -> None:
    """The sampled frames (RGB arrays) as a small looping animated WebP, for the report's clip details."""
    import io

    from PIL import Image

    if len(frames) < 2:
        return
    height = max(2, round(frames[0].shape[0] * width / frames[0].shape[1]))
    images = [Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, "WEBP", save_all=True, append_images=images[1:], duration=frame_ms, loop=0, quality=60)
    store.write(rel, buf.getvalue())


class Extract(Stage):
    name = "extract"

    def __init__(self, cfg: ExtractConfig, s3: S3Config, out: Store):
        super().__init__(cfg)
        self.s3, self.out = s3, out

    def __call__(self, row: dict) -> dict:
        from curation.extract import extract_clip
        from curation.rundir import staged_clip

        t0 = time.perf_counter()
        meta, sampled = unpack(row)
        clip = meta.get("clip")
        if clip and sampled:
            from spacetime.frames import decode_frames

            try:  # the report's pictures: a clip whose frames a filter could not read has failed already
                frames = decode_frames(sampled)  # once, for the thumbnail and the preview
                write_thumbnail(frames, self.out, f"{contract.REPORT_DIR}/thumbs/{clip['clip_id']}.jpg")
                if clip["status"] == "candidate":  # the clips that may be kept: a looping preview
                    write_preview(frames, self.out, f"{contract.REPORT_DIR}/previews/{clip['clip_id']}.webp")
            except Exception as err:
                log.warning("%s: no thumbnail for clip %s: %s", meta["source"]["uri"], clip["clip_id"], describe(err))
        if clip and clip["status"] == "candidate":
            try:  # idempotent (the staged clip is published whole): a storage hiccup is retried
                clip.update(retry(lambda: extract_clip(clip, meta["source"], self.cfg, self.s3, self.out,
                                                       staged_clip(clip["clip_id"])), f"{clip['clip_id']}: extract"))
                clip["bucket"] = contract.bucket_for(clip["width"], clip["height"], clip["num_frames"]).name
                clip["status"] = "kept"
            except Exception as err:
                fail(clip, "extract", err)
        if clip:
            clip.pop("signals", None)  # per-frame signals stay out of the manifests
        worked = bool(sampled) or (clip or {}).get("status") == "kept"
        return pack(self.timed(meta, t0) if worked else meta)  # frames are dropped: the driver never gets them


@dataclass
class StageSpec:
    stage: type[Stage]
    op: str  # the Ray Data operation: map | flat_map | map_batches
    args: dict[str, Any] = field(default_factory=dict)  # constructor kwargs; args["cfg"].resources runs it


def stages(cfg: CurateConfig, out: Store, known: str | None = None, units: list | None = None,
           pending: list | None = None, claims=None) -> list[StageSpec]:
    """The pipeline, in order. Each stage gets its own section (and what it shares: S3 settings).
    `known`: the sources manifest of the last published version, if any, and `claims`: the run's
    FirstClaims actor (see Probe); `units`: every unit of the output and `pending`: the entries this
    invocation processes (the dedup gate's)."""
    s3, f = cfg.sources.s3, cfg.filters
    gate = StageSpec(DedupGate, "gate", dict(cfg=cfg.dedup, units=units or [], pending=pending or [], store=out))
    by_aesthetic = cfg.dedup.keep == "aesthetic" and f.aesthetic.enabled  # the gate needs that score first
    aligned = bool(cfg.caption) and f.alignment.enabled  # captions against the aesthetic stage's frame embeddings
    return [
        StageSpec(Probe, "map", dict(cfg=cfg.probe, s3=s3, out=out, known=known, claims=claims)),
        StageSpec(Analyze, "flat_map", dict(cfg=cfg.analyze, s3=s3, max_duration=cfg.split.max_duration)),
        StageSpec(Split, "flat_map", dict(cfg=cfg.split, max_sampled=cfg.analyze.max_sampled_per_clip)),
        StageSpec(Borders, "map", dict(cfg=f.borders)),  # first: crops the frames the next filters see
        StageSpec(Text, "map", dict(cfg=f.text)),  # then a subtitle band, the same way
        StageSpec(Exposure, "map", dict(cfg=f.exposure)),
        StageSpec(Sharpness, "map", dict(cfg=f.sharpness)),
        StageSpec(Motion, "map", dict(cfg=f.motion)),
        StageSpec(Fingerprint, "map", dict(cfg=cfg.dedup)),
        *([] if by_aesthetic else [gate]),  # duplicates: decided before any expensive stage
        # a model stage that is off starts no actors (its model would load for nothing)
        *([StageSpec(Aesthetic, "map_batches", dict(cfg=f.aesthetic, keep_embedding=aligned))] if f.aesthetic.enabled else []),
        *([gate] if by_aesthetic else []),
        *([StageSpec(Caption, "map_batches", dict(cfg=cfg.caption, grounding=cfg.grounding))]  # survivors only
          if cfg.caption else []),
        *([StageSpec(Alignment, "map_batches", dict(cfg=f.alignment, clip=f.aesthetic,
                                                          embedded=f.aesthetic.enabled))] if aligned else []),
        StageSpec(Extract, "map", dict(cfg=cfg.extract, s3=s3, out=out)),
    ]


# Stages without a model run as Ray tasks; each worker process builds such a stage once per run and
# reuses it. Key: (run token, stage index).
_built: dict[tuple[str, int], Stage] = {}


def _built_stage(key: tuple[str, int], stage: type[Stage], args: dict) -> Stage:
    if key not in _built:
        for old in [k for k in _built if k[0] != key[0]]:  # an earlier run's stages
            del _built[old]
        _built[key] = stage(**args)
    return _built[key]


def _map_task(row: dict, key: tuple[str, int], stage: type[Stage], args: dict) -> dict:
    return _built_stage(key, stage, args)(row)


def _flat_map_task(row: dict, key: tuple[str, int], stage: type[Stage], args: dict):
    yield from _built_stage(key, stage, args)(row)


def _apply(ds, spec: StageSpec, key: tuple[str, int]):
    """One stage onto the dataset: a model stage (map_batches) as an actor pool, any other as tasks
    (consecutive ones with equal resources fuse into one task per block: see TaskResources)."""
    import ray.data

    if spec.op == "gate":
        # One actor sees every row, in no particular order, and decides in unit order. It holds rows, which
        # a restart elsewhere would lose: it lives on the driver's node, whose loss ends the run anyway.
        return ds.map_batches(spec.stage, fn_constructor_kwargs=spec.args, compute=ray.data.ActorPoolStrategy(size=1),
                              batch_size=None, batch_format="numpy", **_on_this_node())
    res = spec.args["cfg"].resources
    kwargs = dict(num_cpus=res.num_cpus, **({"num_gpus": res.num_gpus} if res.num_gpus else {}))
    # A lost worker or node is survived within the run by Ray Data 2.60's own defaults, which is why no
    # retry option is passed (only deprecated **ray_remote_args could, removed in Ray 2.64; measured:
    # tests/test_multinode.py): tasks get max_retries=-1 (reruns after a lost worker/node, and rebuilds of
    # lost outputs from lineage; remote_fn.cached_remote_fn), pool actors max_restarts=-1 and
    # max_task_retries=-1 (a lost actor restarts elsewhere, its calls are resent; ActorPoolMapOperator.
    # _apply_default_remote_args). Only system failures are retried (retry_exceptions=[RaySystemError]);
    # a stage's own exception is not: DataContext retried_map_errors / actor_task_retry_on_errors stay off.
    if spec.op != "map_batches":
        fn = _map_task if spec.op == "map" else _flat_map_task
        return getattr(ds, spec.op)(fn, fn_kwargs=dict(key=key, stage=spec.stage, args=spec.args), **kwargs)
    pool = dict(min_size=res.actors, max_size=res.max_actors or res.actors)
    if res.calls_per_actor > 1:
        pool["max_concurrent_calls_per_actor"] = res.calls_per_actor
    return ds.map_batches(spec.stage, fn_constructor_kwargs=spec.args, compute=ray.data.ActorPoolStrategy(**pool),
                          batch_size=res.batch_size, batch_format="numpy", **kwargs)


def _on_this_node(actor=None):
    """Ray Data's options (or `actor`'s .options) that hold an actor with run state on the driver's node,
    with no CPU slot: a node's loss must not lose its state, and the driver's ends the run anyway. Ray
    Data takes the node as a label selector (its named parameter; a scheduling_strategy would go through
    **ray_remote_args, removed in Ray 2.64); a plain actor takes a hard node affinity."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    if actor is not None:
        return actor.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    return dict(num_cpus=0, label_selector={ray._raylet.RAY_NODE_ID_KEY: node})  # "ray.io/node-id"


def init_ray(cfg: CurateConfig, address: str | None) -> bool:
    """Start the embedded Ray, or join the cluster at `address`; True if this call did either (False:
    the caller, e.g. a test, had started or joined one, and keeps it)."""
    import ray

    address = address_of(cfg, address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        if address:
            context = ray.init(address=address, log_to_driver=False)
        else:
            # address="local": an embedded Ray of its own, never a cluster that happens to run here
            slots = cfg.ray.num_cpus or max(1, round((os.cpu_count() or 1) * cfg.ray.cpus_per_core))
            context = ray.init(address="local", num_cpus=slots, log_to_driver=False,
                               object_store_memory=cfg.ray.object_store_memory,
                               include_dashboard=cfg.ray.dashboard, dashboard_host="127.0.0.1")
        if cfg.ray.dashboard or address:
            url = getattr(context, "dashboard_url", None)
            log.info("Ray dashboard: %s", f"http://{url}" if url else "none (this Ray has no dashboard)")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.print_on_execution_start = False
    return started


def stop_ray() -> None:
    """`ray.shutdown()`, a second sooner. Ray stops its processes one by one, each given a second to exit
    after SIGTERM before a SIGKILL; its autoscaler monitor is stopped after the GCS, and its SIGTERM
    handler then tries to report to the GCS that is gone, so it always takes the whole second (1.0 of
    1.2 s, measured; `ray stop` orders this right, ray#30672, `ray.shutdown` does not). The monitor of
    the embedded Ray this process started has nothing to scale and nothing to save: SIGKILL it first,
    as Ray would a second later. A joined cluster's monitor is not this process's child: untouched."""
    import psutil
    import ray

    for child in psutil.Process().children():
        try:
            if any(part.endswith("autoscaler/_private/monitor.py") for part in child.cmdline()):
                child.kill()
                child.wait(timeout=2)
        except psutil.Error:
            pass  # gone already, or Ray's own shutdown deals with it
    ray.shutdown()


def _report_and_stop_ray(out: Store, stop_ray_after: bool) -> None:
    """Build the report (~0.05 s: SVG charts, bounded reads of the manifests), then stop the Ray this
    run started, if it did."""
    from curation.report import build_report

    try:
        build_report(out)
    finally:
        if stop_ray_after:
            stop_ray()


def _versions() -> dict:
    names = ["spacetime", "av", "scenedetect", "ray", "webdataset", "pyarrow", "torch"]
    return {n: metadata.version(n) for n in names}


def preflight(cfg: CurateConfig) -> None:
    """Resolve every model reference and every `auto` setting before any worker starts (builds tiny
    models if missing; fails early, naming the model, where real weights cannot be had)."""
    from curation.transnet import resolve_dtype
    from spacetime.models import preflight_hf_model, preflight_open_clip, resolve

    # Every `auto` is resolved here, once, so the run's fingerprint holds what the workers will use
    # (a resume that resolves differently is refused, naming the setting) and every node does the same.
    if cfg.analyze.transnet_dtype == "auto":
        cfg.analyze.transnet_dtype = resolve_dtype("auto", cfg.analyze.transnet_device)
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


def _unit_writer(run, units: list[list[str]], cfg: CurateConfig, done: set[str], check=None):
    """The driver's scheduler of unit writes, and the ShardWriter actors that do them (write.resources);
    `check` runs before each unit (the lease's check: a run that lost its output writes nothing more).
    The actors end with the run: when the returned UnitWriter, which holds their only handles, is gone."""
    import ray

    from curation.units import ShardWriter, UnitWriter

    res = cfg.write.resources
    # max_restarts / max_task_retries: a lost actor (its node gone) restarts and its calls are retried,
    # which a unit's idempotent write allows; a raised error is not retried. A cluster may lose several.
    actors = [ray.remote(ShardWriter).options(num_cpus=res.num_cpus, max_concurrency=res.calls_per_actor,
                                              max_restarts=-1, max_task_retries=5).remote()
              for _ in range(res.actors)]
    target, versions, store = int(cfg.write.shard_size_mb * 1024**2), _versions(), run.store

    def submit(n: int, entries: list):
        return actors[n % len(actors)].write.remote(store, n, entries, target, versions)

    return UnitWriter(run, units, submit, done, check)


def _run_stages(pending: list[tuple[str, int]], units: list, cfg: CurateConfig, out: Store, known: str | None,
                tracker, writer, wall_start: float, cores: float, console=None, retain: dict | None = None) -> None:
    """Stream the pending entries (uri, attempt) through the stages; completed sources are recorded
    (tracker) and their units written as soon as they are ready (writer). `retain`: a retried source
    -> the frame spans its earlier attempt settled (curation.retry)."""
    import ray.data
    from tqdm import tqdm

    retain = retain or {}
    items = [pack({"source": {"uri": u, "status": "pending"}, "order": k,
                   **({"retain": retain[u]} if u in retain else {})}) for k, (u, _) in enumerate(pending)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    token = f"{os.getpid()}-{time.time_ns()}"
    claims = _on_this_node(ray.remote(FirstClaims)).remote()  # its handle ends with this call: so does it
    for i, spec in enumerate(stages(cfg, out, known, units, pending, claims)):
        ds = _apply(ds, spec, (token, i))
    # on a terminal a live bar (tqdm disables itself elsewhere); off one, the same figures as a log line
    # every progress.log_every_s, from a timer thread (a long source may keep rows from coming for minutes)
    stop = threading.Event()
    bar = tqdm(total=len(pending), desc="sources", unit="src", disable=None, dynamic_ncols=True,
               file=console or sys.stderr)
    if cfg.progress.log_every_s and bar.disable:
        def heartbeat() -> None:
            while not stop.wait(cfg.progress.log_every_s):
                log.info("%s", progress_line(fates(tracker), len(pending), time.time() - wall_start, cores))
        threading.Thread(target=heartbeat, name="progress", daemon=True).start()
    # Blocks as they come: iter_rows() prefetches one block and holds each back until the next one
    # exists (measured: the first rows of a run waited for the next extract batch, seconds at the start).
    # The driver takes the meta column only: nothing else of a row is needed here.
    blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    try:
        for text in (t for block in blocks for t in block.column("meta").to_pylist()):
            meta = json.loads(text)
            completed = tracker.add(meta)
            if completed:
                uri = meta["source"]["uri"]
                writer.source_done(uri, tracker.attempt(uri))
            writer.poll()  # a completed unit's duplicates are decided here: the bar shows them at once
            if completed or meta["source"]["uri"] in tracker.left:
                bar.set_postfix_str(progress_line(fates(tracker), len(pending), time.time() - wall_start,
                                                  cores, short=True), refresh=False)
                bar.update(1)
    finally:
        stop.set()
        bar.close()


def address_of(cfg: CurateConfig, ray_address: str | None) -> str | None:
    """The cluster a run joins (None: an embedded Ray of its own)."""
    return ray_address or cfg.ray.address or os.environ.get("RAY_ADDRESS")


def _cores(cfg: CurateConfig, slots: float, embedded: bool) -> float:
    """The physical cores behind Ray's CPU slots, for the per-core-hour rates: Ray counts slots, and
    both the embedded Ray and the README's cluster nodes declare `ray.cpus_per_core` of them per core.
    The embedded Ray's are this machine's physical cores (not its hardware threads), at most one per slot."""
    if embedded:
        import psutil

        return float(min(psutil.cpu_count(logical=False) or os.cpu_count() or 1, slots))
    return slots / cfg.ray.cpus_per_core


def _write_ready_units(writer, stopped: BaseException | None) -> None:
    """Every unit whose sources are complete is written, also when the run ends early (`stopped`): the
    rerun then only processes the sources left."""
    try:
        writer.wait()
    except Exception as err:
        if stopped is None or not is_infrastructure(err):
            raise
        log.warning("units not written (the rerun writes them): %s", describe(err))


def incomplete(missing: list[str], total: int, left: dict[str, str], stopped: BaseException | None) -> RunIncomplete:
    """The error of a run that left `missing` sources undone: how many, and why (grouped)."""
    why = {u: left.get(u) or (f"the run stopped: {describe(stopped)}" if stopped else "did not complete")
           for u in missing}
    groups = Counter(why.values()).most_common()
    reasons = "; ".join(f"{n} x {text}" for n, text in groups[:3]) + (f"; {len(groups) - 3} other reasons"
                                                                      if len(groups) > 3 else "")
    return RunIncomplete(f"{len(missing)} of {total} sources left for the rerun ({reasons}). Nothing was published; "
                         "finished sources are kept: rerun the same command to complete the rest.", why)


def fates(tracker) -> Counter:
    """This invocation's counts so far (curation.completion.CompletionTracker): the fates the records
    hold, which the output keeps (duplicates are decided before a clip's record is written), with the
    near-duplicates apart from the other rejected clips."""
    counts = tracker.counts.copy()
    counts.update(rejected=-counts["duplicates"], left=len(tracker.left))
    return counts


def progress_line(counts, total: int, wall: float, cores: float, short: bool = False) -> str:
    """Sources done / total, clips kept / rejected / duplicates / failed (`fates`), video-hours per
    wall-hour and an ETA (the remaining sources at the mean time per source so far)."""
    from curation.publish import throughput

    done = counts["sources"] + counts["left"]
    rate = throughput(counts["video_seconds"], counts["clips"], wall, cores)["video_hours_per_wall_hour"]
    eta = wall / done * (total - done) if done else None
    eta_text = "?" if eta is None else (f"{eta / 60:.0f} min" if eta >= 120 else f"{eta:.0f} s")
    clips = (f"kept {counts['kept']}, rejected {counts['rejected']}, duplicates {counts['duplicates']}, "
             f"failed {counts['failed']}")
    if short:
        return f"{clips}; {rate:.2f} video-h/h; ETA {eta_text}"
    failed = f" ({counts['failed_sources']} failed)" if counts["failed_sources"] else ""
    left = f" ({counts['left']} left for the rerun)" if counts["left"] else ""
    return (f"{done}/{total} sources{failed}{left}; clips {clips}; {rate:.2f} video-h per wall-h; "
            f"ETA {eta_text}")


def run_curation(inputs: list[str], output: str, cfg: CurateConfig, ray_address: str | None = None,
                 ray_log: bool = False, retry_failed: bool = False) -> dict:
    """Curate `inputs` into `output` (resumable: rerunning the same command continues). One run per
    output at a time: a second one is refused (spacetime.lease.LeaseHeld names the holder).
    `retry_failed`: the new version also runs the last version's failures again (curation.retry).
    `ray_log`: Ray's own messages go to OUT/logs/ray.log instead of the console (curation.console)."""
    from curation.sources import list_inputs
    from spacetime.lease import Lease

    wall_start = time.time()
    try:
        out = Store(output, cfg.sources.s3)  # the inputs' S3 settings serve an s3:// output too
    except ValueError as err:
        raise UserError(f"--output: {err}") from None
    uris = list_inputs(inputs, cfg.sources)
    if not uris:
        raise UserError(f"--input {' '.join(map(str, inputs))}: no video or image there (files ending in "
                        f"{', '.join(cfg.sources.extensions)}); give folders, files or text files listing them, or set "
                        "sources.extensions")
    preflight(cfg)
    with Lease(out.uri, cfg.sources.s3) as lease:
        summary = _curate(uris, out, cfg, ray_address, lease, wall_start, ray_log, retry_failed)
    log.info("kept %d of %d clips in %d shards", summary["clips"]["kept"], summary["clips"]["total"],
             summary["shards"])
    return summary


@contextlib.contextmanager
def _ray_messages(out: Store, enabled: bool):
    """Ray's own messages to OUT/logs/ray.log while Ray runs (an s3:// output: a local file uploaded
    there at the end); yields the console stream for the progress bar."""
    if not enabled:
        yield sys.stderr
        return
    import tempfile

    from curation.console import ray_messages_to

    with tempfile.TemporaryDirectory(prefix="spacetime-logs-") as folder:
        path = (out.local / LOGS_DIR if out.local else Path(folder)) / "ray.log"
        log.info("Ray's own messages -> %s (--verbose: on the console)", out.uri_of(f"{LOGS_DIR}/ray.log"))
        try:
            with ray_messages_to(path) as console:
                yield console
        finally:
            if out.local is None and path.exists():
                out.write(f"{LOGS_DIR}/ray.log", path.read_bytes())


def _curate(uris: list[str], out: Store, cfg: CurateConfig, ray_address: str | None, lease, wall_start: float,
            ray_log: bool = False, retry_failed: bool = False) -> dict:
    import ray

    from curation.completion import CompletionTracker
    from curation.publish import finalize
    from curation.retry import plan_retries, settled_spans
    from curation.rundir import RunDir
    from curation.sources import source_key
    from curation.units import plan_units
    from curation.versions import VersionLog
    from spacetime.config import dump_config

    run = RunDir(out)
    # Resources and transport do not change results, so a rerun may use other ones; the rest must match.
    run.claim({"config": result_fingerprint(cfg), "spacetime": metadata.version("spacetime")})
    versions = VersionLog(run)
    current, earlier = versions.plan(uris, retry_failed)
    every = earlier + ([current] if current else [])
    entries = [e for v in every for e in v.entries()]  # (uri, attempt), in processing order: version, then URI
    attempts = {a for _, a in entries}

    def not_done(todo: list[tuple[str, int]]) -> list[tuple[str, int]]:  # a listing per attempt, not a request per source
        done = {(k, a) for a in attempts for k in run.done_keys(a)}
        return [(u, a) for u, a in todo if (source_key(u), a) not in done]

    pending = not_done(entries)
    units = [chunk for v in every for chunk in plan_units(v.entries(), cfg.write.unit_sources)]
    committed = run.committed_units()
    unwritten = [n for n in range(len(units)) if n not in committed]
    again = f" ({len(current.retried)} of them retried)" if current and current.retried else ""
    log.info("%d sources, %d already done, %d to process%s; %d of %d work units to write -> %s", len(entries),
             len(entries) - len(pending), len(pending), again, len(unwritten), len(units), out.uri)
    if current is None:
        log.info("no new input%s: %s stays at version %d", " and no failure to retry" if retry_failed else "",
                 out.uri, earlier[-1].version)
        return json.loads(out.read_bytes(contract.SUMMARY_PATH))
    out.write("config.yaml", dump_config(cfg))
    retries = plan_retries(units, current.version) if current.retried else {}
    tracker, cores, started = CompletionTracker(run, retries), 0.0, False
    if pending or unwritten:
        with _ray_messages(out, ray_log) as console:
            try:
                started = init_ray(cfg, ray_address)
            except Exception as err:  # e.g. a node too loaded to start Ray in time, an unreachable cluster
                raise RunIncomplete(f"Ray did not start ({describe(err).splitlines()[0]}); {len(pending)} sources "
                                    "left: rerun the same command", {u: "Ray did not start" for u, _ in pending}) from err
            slots = float(ray.cluster_resources().get("CPU", 0))
            cores = _cores(cfg, slots, embedded=not address_of(cfg, ray_address))
            writer = _unit_writer(run, units, cfg, set(entries) - set(pending), lease.check)
            writer.poll()  # units a killed run completed but did not commit
            stopped = None  # the infrastructure failure that ended the stages early, if one did
            if pending:
                known = contract.version_file(contract.version_dir(earlier[-1].version), contract.SOURCES_MANIFEST) \
                    if earlier else None
                # a retried source's row carries the frames its earlier attempt settled (curation.retry)
                todo = set(pending)
                retain = {u: settled_spans(run.record(u, r.prior_attempt)) for u, r in retries.items()
                          if (u, r.attempt) in todo}
                try:
                    _run_stages(pending, units, cfg, out, known, tracker, writer, wall_start, cores, console, retain)
                except Exception as err:
                    if not is_infrastructure(err):
                        raise  # a bug: its traceback (the sources not done are still left for a rerun)
                    stopped = err
            _write_ready_units(writer, stopped)
            missing = [u for u, _ in not_done(pending)]
            if missing:  # nothing is published: the same command completes them
                if started:
                    stop_ray()
                raise incomplete(missing, len(entries), tracker.left, stopped)
    lease.check()  # another run took the output over: publish nothing
    counts = fates(tracker) if pending else tracker.counts
    summary = finalize(run, units, wall_start, _versions(), cores, dict(counts), current.version, len(current.retried))
    versions.publish(current)
    _report_and_stop_ray(out, stop_ray_after=started)
    again = f", {len(current.retried)} retried" if current.retried else ""
    log.info("published version %d: %d new sources%s", current.version,
             len(current.sources) - len(current.retried), again)
    return summary
