"""Work units: the output's shards, written while the run goes on, a unit at a time.

The pipeline's write stage goes stages -> completion records (curation.completion) -> units ->
publish (curation.publish). Exactly once, streaming:
- Work units are the sorted inputs cut into runs of `write.unit_sources`: a pure function of the
  input list, so a rerun finds the same units. As soon as a unit's sources (and every earlier
  unit's) are complete, a ShardWriter actor writes the unit's shards from its records and staged
  clips, in a fixed order (bucket, source order, start frame) with fixed tar metadata, commits the unit
  with OUT/.work/units/<unit>.json (its index rows) and drops its staged clips. A shard depends
  only on its unit's sources, so a killed-and-rerun job writes the same bytes as an uninterrupted one.
- Duplicates are decided before the expensive stages, a unit at a time in processing order
  (curation.duplicates.DedupGate): the records a unit is written from hold its decisions.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

from curation.rundir import RunDir, staged_clip
from spacetime import contract
from spacetime.record import Caption, ClipRecord, SourceRef, Span
from spacetime.store import Store

log = logging.getLogger(__name__)


def plan_units(entries: list, size: int) -> list[list]:
    """The sorted inputs cut into runs of `size` sources: the same list always gives the same units.
    An entry is a source's (uri, attempt): attempt 0 the first time, N when version N retries it
    (curation.retry)."""
    return [entries[i:i + size] for i in range(0, len(entries), size)]


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
        ocr_text=clip.get("ocr_text"), caption=caption, grounding=clip.get("grounding") or [],
        provenance=versions)


def index_row(clip: dict, shard: str) -> dict:
    return dict(shard=shard, key=clip["clip_id"], clip_id=clip["clip_id"], source_uri=clip["source_uri"],
                width=clip["width"], height=clip["height"], num_frames=clip["num_frames"], fps=clip["fps"],
                duration=clip["end_time"] - clip["start_time"], bucket=clip["bucket"],
                has_caption=bool(clip.get("caption")))


def new_kept(records: list[dict]) -> list[dict]:
    """The kept clips the records' unit writes: all but those an earlier attempt kept (curation.retry)."""
    return [c for r in records for c in r["clips"] if c["status"] == "kept" and not c.get("retained")]


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


def write_unit(store: Store, unit: int, entries: list[tuple[str, int]], target_bytes: int, versions: dict) -> dict:
    """Write the shards of one unit and commit it (in a ShardWriter, on any node: it reads and writes
    the output store only).

    `entries`: the unit's sources, (uri, attempt) each (plan_units). Their records hold the duplicate
    decisions (curation.duplicates.DedupGate): the unit's kept clips are what it writes. Writes each
    shard atomically, then OUT/.work/units/<unit>.json with the unit's index rows (and its
    near-duplicates, for the record), then removes the unit's staged clips. Idempotent (a retried
    call finds the commit). Returns {"unit", "shards", "samples"}."""
    run = RunDir(store)
    if run.is_unit_done(unit):  # a retried call whose first attempt committed: nothing left to do
        done = run.unit(unit)
        return {"unit": unit, "shards": len(done["shards"]), "samples": len(done["index"])}
    records = [run.record(u, a) for u, a in entries]
    near = {c["clip_id"]: c["duplicate_of"] for r in records for c in r["clips"]
            if c.get("duplicate_of") and not c.get("retained")}
    kept = new_kept(records)  # a retried source's earlier kept clips are in their shards already
    by_source = {r["source"]["uri"]: r["source"] for r in records}
    index = []
    layout = _pack_shards(kept, target_bytes, unit)
    for rel, members in layout.items():
        with store.writing(rel) as tmp:
            contract.write_shard(tmp, [(store.read_bytes(staged_clip(c["clip_id"])),
                                        clip_record(c, by_source[c["source_uri"]], versions)) for c in members])
        index += [index_row(c, rel) for c in members]
    store.write(run.unit_path(unit), json.dumps({"unit": unit, "sources": [u for u, _ in entries], "shards": sorted(layout),
                                                 "index": index, "near_duplicates": near}, sort_keys=True))
    # Only the kept clips were staged (the gate decided duplicates before extraction); finalize removes
    # whatever staging is left (e.g. a clip extracted by a run killed before its record), in one listing.
    for c in kept:
        store.delete(staged_clip(c["clip_id"]))
    return {"unit": unit, "shards": len(layout), "samples": len(index)}


class UnitWriter:
    """Driver side of the units: submits each unit's write, in unit order, once its sources and
    every earlier unit's are complete.

        writer = UnitWriter(run, units, submit, done)  # submit(unit, entries) -> ObjectRef
        writer.source_done(uri, attempt)         # as the tracker completes sources
        writer.poll()                            # submits what became ready, reaps finished writes
        writer.wait()                            # at the end: every unit committed
    """

    def __init__(self, run: RunDir, units: list[list[str]], submit, done: set[str], check=None):
        """`units`: plan_units' lists of (uri, attempt); `done`: the entries completed before this
        invocation; `check`: called before each unit, raises to stop the run (the output's Lease.check)."""
        self.run, self.units, self.submit, self.check = run, units, submit, check
        self.next = 0  # the first unit not yet submitted
        self.complete = set(done)
        self.committed = run.committed_units()
        self.in_flight: dict = {}  # ObjectRef -> unit

    def source_done(self, uri: str, attempt: int = 0) -> None:
        self.complete.add((uri, attempt))

    def poll(self) -> None:
        import ray

        while self.next < len(self.units) and all(u in self.complete for u in self.units[self.next]):
            if self.check is not None:
                self.check()  # a run that lost its output's lease writes no more units
            entries = self.units[self.next]
            if self.next not in self.committed:
                self.in_flight[self.submit(self.next, entries)] = self.next
            self.complete.difference_update(entries)
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
