"""Stage 6, write: per-source completion records, shards per work unit while the job runs, then
index, manifests and summary (metadata only).

Everything goes through the output's spacetime.store.Store (a local folder or s3://bucket/prefix), so
no node needs a folder shared with the others. Exactly once, streaming:
- Workers stage each extracted clip as OUT/.work/clips/<clip_id>.mp4 (published whole). When every
  row of a source has come back, the driver writes OUT/.work/done/<source>.json: from then on a rerun
  skips that source.
- Work units are the sorted inputs cut into runs of `write.unit_sources`: a pure function of the
  input list, so a rerun finds the same units. As soon as a unit's sources (and every earlier
  unit's) are complete, a ShardWriter actor writes the unit's shards from its records and staged
  clips, in a fixed order (bucket, source order, start frame) with fixed tar metadata, commits the unit
  with OUT/.work/units/<unit>.json (its index rows) and drops its staged clips. A shard depends
  only on its unit's sources, so a killed-and-rerun job writes the same bytes as an uninterrupted one.
- Units are committed in order because of duplicates: a source whose content digest equals a source
  before it (an earlier dataset version, or a smaller URI) is a `duplicate` and adds no clip, and
  that is known for certain only once every source before it has been probed.
- When every unit is committed, `finalize` writes the index, manifests and summary from the
  records: no video byte is copied after the last source completes.
Every file is published whole (spacetime.store: temp name + rename locally, one upload on S3).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter, defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from curation.sources import source_key
from curation.stage import left_for_rerun
from spacetime import contract
from spacetime.config import differences
from spacetime.errors import UserError
from spacetime.record import Caption, ClipRecord, SourceRef, Span
from spacetime.store import Store

log = logging.getLogger(__name__)

# The run's state under OUT/.work (contract.WORK_DIR): staged clips, completion records, unit commits.
# Rows per Parquet row group of the published index and manifests (finalize buffers at most one).
MANIFEST_ROW_GROUP = 16384
STAGING_DIR = f"{contract.WORK_DIR}/clips"
DONE_DIR = f"{contract.WORK_DIR}/done"
UNITS_DIR = f"{contract.WORK_DIR}/units"
RUN_PATH = f"{contract.WORK_DIR}/run.json"


def staged_clip(clip_id: str) -> str:
    """Where the extract stage stages a clip until its unit is written."""
    return f"{STAGING_DIR}/{clip_id}.mp4"


class RunDirError(UserError, RuntimeError):
    """An output directory that cannot be used for this run; the message says why and what to do."""


class RunDir:
    """Paths and resumable state of one output (a spacetime.store.Store: local folder or s3://)."""

    def __init__(self, store: Store):
        self.store = store
        self.out = store.uri  # for messages

    def done_path(self, uri: str) -> str:
        return f"{DONE_DIR}/{source_key(uri)}.json"

    def is_done(self, uri: str) -> bool:
        return self.store.exists(self.done_path(uri))

    def done_keys(self) -> set[str]:
        """The source keys (curation.sources.source_key) with a completion record: one listing."""
        return {name[:-len(".json")] for name in self.store.list(DONE_DIR, ".json")}

    def record(self, uri: str) -> dict:
        return json.loads(self.store.read_bytes(self.done_path(uri)))

    def unit_path(self, unit: int) -> str:
        return f"{UNITS_DIR}/{unit:06d}.json"

    def is_unit_done(self, unit: int) -> bool:
        return self.store.exists(self.unit_path(unit))

    def committed_units(self) -> set[int]:
        return {int(name[:-len(".json")]) for name in self.store.list(UNITS_DIR, ".json")}

    def unit(self, unit: int) -> dict:
        return json.loads(self.store.read_bytes(self.unit_path(unit)))

    def claim(self, fingerprint: dict) -> None:
        """Start or resume a run; refuse an output made with another config (inputs may grow: see
        curation.versions)."""
        if self.store.exists(RUN_PATH):
            old = json.loads(self.store.read_bytes(RUN_PATH))
            if old != fingerprint:
                changed = differences(old, fingerprint)
                more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
                raise RunDirError(
                    f"{self.out} holds a dataset made with other settings: {'; '.join(changed[:5])}{more}. A rerun "
                    "may add inputs, or change resources and transport, but not results. Use a new --output, or "
                    "delete this one to start over.")
        elif self.store.exists(contract.SUMMARY_PATH):
            raise RunDirError(f"{self.out}: finished output without run state; use a new --output")
        self.store.write(RUN_PATH, json.dumps(fingerprint, sort_keys=True, indent=1))


class CompletionTracker:
    """Collects result rows in any order; a source is complete when the rows of each of its
    segments, up to its final segment, have all arrived. A source with a deferred row (an
    infrastructure failure: curation.stage.defer) gets no completion record: it is left in `left`
    (URI -> why) for the rerun, which processes it again from the start."""

    def __init__(self, run: RunDir):
        self.run = run
        # Rows of sources still in flight only: a completed source leaves nothing behind here.
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.seen: dict[str, Counter] = defaultdict(Counter)
        self.need: dict[str, dict[int, int]] = defaultdict(dict)
        self.final: dict[str, int] = {}
        self.counts: Counter = Counter()  # sources, clips, kept, video_seconds of completed sources
        self.left: dict[str, str] = {}  # sources left for the rerun, and why

    def add(self, meta: dict) -> bool:
        """Record one row; returns True (and writes the completion record) if its source is done."""
        uri = meta["source"]["uri"]
        seg = meta["seg_index"]
        self.rows[uri].append(meta)
        self.seen[uri][seg] += 1
        self.need[uri][seg] = meta["rows_in_segment"]
        if meta.get("final"):
            self.final[uri] = seg
        last = self.final.get(uri)
        if last is None or any(self.seen[uri][i] != self.need[uri].get(i, -1) for i in range(last + 1)):
            return False
        return self._complete(uri)

    def _complete(self, uri: str) -> bool:
        rows = self.rows.pop(uri)
        for state in (self.seen, self.need, self.final):
            state.pop(uri, None)
        why = next(filter(None, map(left_for_rerun, rows)), None)
        if why is not None:  # not the source's fate: no record, so the rerun does it again
            self.left[uri] = why
            log.warning("%s: left for the rerun: %s", uri, why)
            return False
        source = next((r["source"] for r in rows if r.get("final")), rows[0]["source"])
        failed = next((r["source"] for r in rows if r["source"]["status"] == "failed"), None)
        if failed is not None:  # a stage may fail a source on any of its segments, not only the final one
            source = dict(source, status="failed", error=failed.get("error"))
        clips = sorted((r["clip"] for r in rows if r.get("clip")), key=lambda c: c["start_frame"])
        timings: Counter = Counter()
        for r in rows:
            timings.update(r.get("timings", {}))
        source = dict(source, num_clips=len(clips), num_kept=sum(c["status"] == "kept" for c in clips))
        record = {"source": source, "clips": clips, "timings": dict(timings)}
        self.run.store.write(self.run.done_path(uri), json.dumps(record, sort_keys=True))
        if source["status"] == "failed":  # genuine errors reach the console, naming the source
            log.error("%s: failed: %s", uri, source.get("error"))
        failed = [c for c in clips if c["status"] == "failed"]
        if failed:
            log.error("%s: %d clip(s) failed, first [%s:%s): %s", uri, len(failed), failed[0]["start_frame"],
                      failed[0]["end_frame"], failed[0].get("reason"))
        self.counts.update(sources=1, clips=len(clips), kept=source["num_kept"],
                           rejected=sum(c["status"] == "rejected" for c in clips),
                           failed=sum(c["status"] == "failed" for c in clips),
                           failed_sources=int(source["status"] == "failed"),
                           video_seconds=(source.get("duration") or 0) if source["status"] == "ok" else 0)
        return True


def _pack_shards(kept: list[dict], target_bytes: int, unit: int) -> dict[str, list[dict]]:
    """Deterministic assignment of a unit's kept clips to shard paths: per bucket, in the given
    order, a new shard whenever adding a clip would pass the target size."""
    by_bucket: dict[str, list[dict]] = defaultdict(list)
    for clip in kept:
        by_bucket[clip["bucket"]].append(clip)
    layout: dict[str, list[dict]] = {}
    for bucket in sorted(by_bucket):
        number, size = 0, 0
        for clip in by_bucket[bucket]:
            if size and size + clip["bytes"] > target_bytes:
                number, size = number + 1, 0
            layout.setdefault(contract.shard_path(bucket, number, unit), []).append(clip)
            size += clip["bytes"]
    return layout


def clip_record(clip: dict, source: dict, versions: dict) -> ClipRecord:
    """The <key>.json of a kept clip (spacetime.record), field by field from the pipeline's clip."""
    caption = None
    if clip.get("caption"):
        fields = clip.get("caption_fields") or {}
        caption = Caption(**{k: v for k, v in fields.items() if k != "dense"}, dense=clip["caption"],
                          provenance=clip.get("caption_provenance") or {})
    return ClipRecord(
        clip_id=clip["clip_id"],
        source=SourceRef(uri=source["uri"], digest=source["digest"], digest_kind=source["digest_kind"]),
        span=Span(start_frame=clip["start_frame"], end_frame=clip["end_frame"], start_time=clip["start_time"],
                  end_time=clip["end_time"], start_pts=clip.get("start_pts"), end_pts=clip.get("end_pts")),
        fps=clip["fps"], width=clip["width"], height=clip["height"], num_frames=clip["num_frames"],
        duration=clip["end_time"] - clip["start_time"], rotation=clip.get("rotation") or 0,
        crop=clip.get("crop"), bucket=clip["bucket"], extract_mode=clip.get("extract_mode"),
        skip_frames=clip.get("skip_frames") or 0,
        sampled_idx=clip.get("sampled_idx") or [], scores=clip.get("scores") or {},
        ocr_text=clip.get("ocr_text"), caption=caption,
        provenance=versions)


def mark_duplicate(record: dict, first: dict[str, str]) -> None:
    """Mark the completion record of a source whose content digest equals an earlier one's as status
    `duplicate` with `duplicate_of` the original's URI. `first`: digest -> first URI, filled in
    processing order (dataset version, then sorted URI), so the original does not depend on which
    source finished first. Its clips (the same ids: ids are content-addressed) are dropped, so no key
    appears twice."""
    source = record["source"]
    if source["status"] == "duplicate":  # the probe found it in an earlier version: name the original
        source["duplicate_of"] = source.get("duplicate_of") or first[source["digest"]]
        return
    if source["status"] != "ok":
        return
    original = first.setdefault(source["digest"], source["uri"])
    if original != source["uri"]:
        source.update(status="duplicate", duplicate_of=original, num_clips=0, num_kept=0)
        record["clips"] = []


class NearDuplicates:
    """Near-duplicate clips (curation.dedup), decided a unit at a time in processing order, like
    `mark_duplicate`: a unit's kept clips are grouped (the best by `dedup.keep` stays) and matched
    against the index of every earlier unit's surviving clips, so the decision for a unit depends
    only on it and the units before it (deterministic, streaming, and the same on a rerun, which
    rebuilds the index from the completion records). Across dataset versions the same holds: an
    incremental run walks the earlier versions' units first. Images (1-frame clips) are compared with
    images only: a still is not a duplicate of the video it was taken from."""

    def __init__(self, cfg):
        from curation.dedup import NearDupIndex

        self.cfg = cfg
        self.indexes = {kind: NearDupIndex(cfg.max_distance, cfg.min_similarity, cfg.bands, cfg.min_band_hits)
                        for kind in ("video", "image")} if cfg and cfg.enabled else None

    def _score(self, clip: dict) -> float:
        if self.cfg.keep == "resolution":  # pixels first; duration (< 1e4 s) only breaks ties
            return clip["width"] * clip["height"] + min(clip["end_time"] - clip["start_time"], 9999.0) / 1e4
        if self.cfg.keep == "duration":
            return clip["end_time"] - clip["start_time"]
        return float(clip.get("scores", {}).get(self.cfg.keep, float("nan")))

    def decide(self, records: list[dict]) -> dict[str, str]:
        """clip_id -> the clip_id it duplicates, for the kept clips of one unit's records (after
        `mark_duplicate`); the survivors join the index."""
        import numpy as np

        if self.indexes is None:
            return {}
        near: dict[str, str] = {}
        for kind, index in self.indexes.items():
            clips = [(c["clip_id"], np.array(c["fingerprint"], np.uint64), self._score(c))
                     for r in records for c in r["clips"] if c["status"] == "kept" and c.get("fingerprint")
                     and (c["num_frames"] == 1) == (kind == "image")]
            near.update(index.dedup(clips))
        return near


def apply_near_duplicates(records: list[dict], near: dict[str, str]) -> None:
    """Reject the clips `near` names, each naming the clip kept in its place."""
    for c in (c for r in records for c in r["clips"] if c["clip_id"] in near):
        c.update(status="rejected", duplicate_of=near[c["clip_id"]],
                 reason=f"duplicate: near-duplicate of clip {near[c['clip_id']]} (dedup.min_similarity)")


# ----------------------------------------------------------------------------------- work units
def plan_units(uris: list[str], size: int) -> list[list[str]]:
    """The sorted inputs cut into runs of `size` sources: the same list always gives the same units."""
    return [uris[i:i + size] for i in range(0, len(uris), size)]


class ShardWriter:
    """A Ray actor that writes units (`write_unit`) for the whole run. It is started with the run, so its
    imports (webdataset pulls in torch: ~1.5 s) are done before the first unit is ready, and no task of
    the pipeline can take its process: a write task waited up to 2.8 s for a free worker process while
    the stages kept every worker busy (measured, #12). Idempotent writes make a lost actor's units safe
    to retry on its restart (max_restarts / max_task_retries, set by the driver)."""

    def __init__(self):
        import webdataset  # noqa: F401

    def write(self, *args) -> dict:
        return write_unit(*args)


def write_unit(store: Store, unit: int, uris: list[str], first: dict[str, str], near: dict[str, str],
               target_bytes: int, versions: dict) -> dict:
    """Write the shards of one unit and commit it (in a ShardWriter, on any node: it reads and writes
    the output store only).

    `first`: digest -> first URI for every digest seen in EARLIER units (duplicates are decided with
    it); `near`: the unit's near-duplicate clips (NearDuplicates.decide), kept in the commit. Writes
    each shard atomically, then OUT/.work/units/<unit>.json with the unit's index rows, then removes
    the unit's staged clips. Idempotent (a retried call finds the commit). Returns
    {"unit", "shards", "samples"}."""
    run = RunDir(store)
    if run.is_unit_done(unit):  # a retried call whose first attempt committed: nothing left to do
        done = run.unit(unit)
        return {"unit": unit, "shards": len(done["shards"]), "samples": len(done["index"])}
    first = dict(first)
    records = [run.record(u) for u in uris]
    for r in records:
        mark_duplicate(r, first)
    apply_near_duplicates(records, near)
    kept = [c for r in records for c in r["clips"] if c["status"] == "kept"]
    by_source = {r["source"]["uri"]: r["source"] for r in records}
    index = []
    layout = _pack_shards(kept, target_bytes, unit)
    for rel, members in layout.items():
        with store.writing(rel) as tmp:
            contract.write_shard(tmp, [(store.read_bytes(staged_clip(c["clip_id"])),
                                        clip_record(c, by_source[c["source_uri"]], versions)) for c in members])
        index += [index_row(c, rel) for c in members]
    store.write(run.unit_path(unit), json.dumps({"unit": unit, "sources": uris, "shards": sorted(layout),
                                                 "index": index, "near_duplicates": near}, sort_keys=True))
    # Not a duplicate source's clips: they share ids, hence staged files, with the original's, which
    # another unit's task may still be reading. Near-duplicates' staged clips are left too:
    # finalize removes whatever staging is left, in one listing.
    for c in (c for r in records for c in r["clips"] if c["status"] == "kept"):
        store.delete(staged_clip(c["clip_id"]))
    return {"unit": unit, "shards": len(layout), "samples": len(index)}


def index_row(clip: dict, shard: str) -> dict:
    return dict(shard=shard, key=clip["clip_id"], clip_id=clip["clip_id"], source_uri=clip["source_uri"],
                width=clip["width"], height=clip["height"], num_frames=clip["num_frames"], fps=clip["fps"],
                duration=clip["end_time"] - clip["start_time"], bucket=clip["bucket"],
                has_caption=bool(clip.get("caption")))


def _count_kept(records: list[dict]) -> int:
    return sum(c["status"] == "kept" for r in records for c in r["clips"])


class UnitWriter:
    """Driver side of the units: submits each unit's write, in unit order, once its sources and
    every earlier unit's are complete; keeps the digest -> first URI map of the submitted units.

        writer = UnitWriter(run, units, submit, done, near)  # submit(unit, uris, first, near) -> ObjectRef
        writer.source_done(uri)                  # as the tracker completes sources
        writer.poll()                            # submits what became ready, reaps finished writes
        writer.wait()                            # at the end: every unit committed
    """

    def __init__(self, run: RunDir, units: list[list[str]], submit, done: set[str], near: NearDuplicates,
                 check=None):
        """`done`: the sources completed before this invocation; `near`: near-duplicate decisions;
        `check`: called before each unit, raises to stop the run (the output's Lease.check)."""
        self.run, self.units, self.submit, self.near, self.check = run, units, submit, near, check
        self.next = 0  # the first unit not yet submitted
        self.first: dict[str, str] = {}  # grows with the distinct sources: what dedup must remember
        self.complete, self.before = set(done), set(done)
        # Clips that passed the filters (the tracker counted them kept) but are duplicates: of a source
        # with the same content, or near-duplicates of a clip kept earlier. This invocation's sources only.
        self.duplicates = 0
        self.in_flight: dict = {}  # ObjectRef -> unit

    def source_done(self, uri: str) -> None:
        self.complete.add(uri)

    def poll(self) -> None:
        import ray

        while self.next < len(self.units) and all(u in self.complete for u in self.units[self.next]):
            if self.check is not None:
                self.check()  # a run that lost its output's lease writes no more units
            uris = self.units[self.next]
            first = dict(self.first)  # the writer re-marks its unit's duplicates from the earlier units' digests
            records = [self.run.record(u) for u in uris]
            fresh = [r for r in records if r["source"]["uri"] not in self.before]
            passed = _count_kept(fresh)
            for r in records:
                mark_duplicate(r, self.first)
            near = self.near.decide(records)  # every unit, committed or not: the index needs them all
            self.duplicates += passed - _count_kept(fresh) + sum(c["clip_id"] in near for r in fresh for c in r["clips"])
            if not self.run.is_unit_done(self.next):
                self.in_flight[self.submit(self.next, uris, first, near)] = self.next
            self.complete.difference_update(uris)
            self.next += 1
        if self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0)
            for ref in ready:
                self._reap(ref)

    def _reap(self, ref) -> None:
        import ray

        unit = self.in_flight.pop(ref)
        result = ray.get(ref)  # a failed write raises here, naming the task's error
        log.debug("unit %d committed: %d shards, %d samples", unit, result["shards"], result["samples"])

    def wait(self) -> None:
        import ray

        self.poll()
        while self.in_flight:
            ref = ray.wait(list(self.in_flight), num_returns=1)[0][0]
            self._reap(ref)


def throughput(video_seconds: float, clips: int, wall: float, cores: float) -> dict:
    """Rates of a run: video-hours per wall-hour and per core-hour (wall x the cores Ray had), clips/s."""
    wall = max(wall, 1e-9)
    return {"video_hours_per_wall_hour": round(video_seconds / wall, 3),
            "video_hours_per_core_hour": round(video_seconds / (wall * cores), 3) if cores else None,
            "clips_per_second": round(clips / wall, 3)}


class RowGroups:
    """A ParquetWriter fed a unit at a time that writes row groups of `rows` rows (the last one
    shorter), holding at most one group's rows. One group per unit gave the manifests of 1600 sources
    400 groups of ~7 rows: the footer outweighed the data, and reading them took 129 MiB (61 MiB for
    25 groups); see tests/test_write.py."""

    def __init__(self, writer: pq.ParquetWriter, rows: int = MANIFEST_ROW_GROUP):
        self.writer, self.rows = writer, rows
        self.pending: list[pa.Table] = []
        self.count = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.count += table.num_rows
        if self.count >= self.rows:
            joined = pa.concat_tables(self.pending)
            full = joined.num_rows // self.rows * self.rows
            self.writer.write_table(joined.slice(0, full), row_group_size=self.rows)
            rest = joined.slice(full)
            self.pending, self.count = [rest], rest.num_rows

    def close(self) -> None:
        if self.count:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.rows)
        self.pending, self.count = [], 0
        self.writer.close()


def finalize(run: RunDir, units: list[list[str]], wall_start: float, versions: dict, cores: float = 0.0,
             processed: dict | None = None, version: int = 1) -> dict:
    """Publish dataset version `version`: index, manifests and summary from the commit records of
    `units` (every unit so far, in processing order: version, then URI) and the completion records of
    their sources. Metadata only (the shards are written), streamed a unit at a time so the driver's
    memory does not grow with the dataset. Written under versions/vNNNNNN/, then the pointer
    latest.json, then copied to the stable paths (see curation.versions). `processed`: the tracker's
    counts of what THIS invocation processed (its throughput); `cores`: the CPUs Ray had."""
    store, folder = run.store, contract.version_dir(version)
    files = {contract.INDEX_PATH: contract.INDEX_SCHEMA, contract.SOURCES_MANIFEST: contract.SOURCES_SCHEMA,
             contract.CLIPS_MANIFEST: contract.CLIPS_SCHEMA}
    totals, first = _Totals(), {}
    with contextlib.ExitStack() as stack:
        writers = {rel: RowGroups(pq.ParquetWriter(stack.enter_context(store.writing(contract.version_file(folder, rel))),
                                                   schema)) for rel, schema in files.items()}
        for writer in writers.values():
            stack.callback(writer.close)  # runs before each file's rename (ExitStack unwinds in reverse)
        for n, uris in enumerate(units):
            committed = run.unit(n)
            records = [run.record(u) for u in uris]
            for r in records:
                mark_duplicate(r, first)
            apply_near_duplicates(records, committed.get("near_duplicates", {}))
            shard_of = {row["clip_id"]: row["shard"] for row in committed["index"]}
            clips = [dict(c, shard=shard_of.get(c["clip_id"]), scores=contract.score_columns(c.get("scores")))
                     for r in records for c in r["clips"]]
            rows = {contract.INDEX_PATH: committed["index"], contract.SOURCES_MANIFEST: [r["source"] for r in records],
                    contract.CLIPS_MANIFEST: clips}
            for rel, schema in files.items():
                writers[rel].add(contract.table(rows[rel], schema))
            totals.add(records, committed)
    summary = totals.summary(time.time() - wall_start, versions)
    processed = processed or {}
    summary.update(version=version, cores=cores, processed_this_invocation=dict(processed), throughput=throughput(
        processed.get("video_seconds", 0.0), processed.get("clips", 0), time.time() - wall_start, cores))
    summary_text = json.dumps(summary, indent=1, sort_keys=True)
    store.write(f"{folder}/{contract.SUMMARY_PATH}", summary_text)
    store.write(contract.LATEST_PATH, json.dumps({"version": version, "path": folder}))
    for rel in files:
        store.copy(contract.version_file(folder, rel), rel)
    store.write(contract.SUMMARY_PATH, summary_text)
    store.delete_dir(STAGING_DIR)  # leftovers only (e.g. a duplicate extracted after its unit)
    return summary


class _Totals:
    """The summary's counts, accumulated a unit at a time."""

    def __init__(self):
        self.sources, self.clips, self.reasons = Counter(), Counter(), Counter()
        self.buckets, self.timings = Counter(), Counter()
        self.hours_in = self.hours_out = 0.0
        self.shards = 0

    def add(self, records: list[dict], committed: dict) -> None:
        self.shards += len(committed["shards"])
        for r in records:
            source = r["source"]
            self.sources[source["status"]] += 1
            self.hours_in += (source.get("duration") or 0) / 3600 if source["status"] == "ok" else 0
            self.timings.update(r.get("timings", {}))
            for c in r["clips"]:
                self.clips[c["status"]] += 1
                if c["status"] == "kept":
                    self.buckets[c["bucket"]] += 1
                    self.hours_out += (c["end_time"] - c["start_time"]) / 3600
                else:
                    self.reasons[(c.get("reason") or "").split(":")[0]] += 1

    def summary(self, wall: float, versions: dict) -> dict:
        return {
            "sources": {"total": sum(self.sources.values()), "ok": self.sources["ok"], "failed": self.sources["failed"],
                        "duplicate": self.sources["duplicate"]},
            "clips": {"total": sum(self.clips.values()), "kept": self.clips["kept"], "rejected": self.clips["rejected"],
                      "failed": self.clips["failed"], "reasons": dict(self.reasons)},
            "shards": self.shards,
            "buckets": dict(self.buckets),
            "hours_in": self.hours_in, "hours_out": self.hours_out,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            "wall_seconds_this_invocation": round(wall, 3),
            "versions": versions,
        }
