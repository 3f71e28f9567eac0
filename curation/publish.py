"""Publishing a dataset version: the index, manifests and summary (metadata only), from the records.

The pipeline's write stage goes stages -> completion records (curation.completion) -> units
(curation.units) -> publish. When every unit is committed, `finalize` writes the index, manifests and
summary from the records: no video byte is copied after the last source completes. Every file is
published whole (spacetime.store: temp name + rename locally, one upload on S3); where a version's
files go and in which order readers see them: curation.versions.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from curation.duplicates import apply_near_duplicates, mark_duplicate
from curation.rundir import STAGING_DIR, RunDir
from spacetime import contract

# Rows per Parquet row group of the published index and manifests (finalize buffers at most one).
MANIFEST_ROW_GROUP = 16384


class RowGroups:
    """A ParquetWriter fed a unit at a time that writes row groups of `rows` rows (the last one
    shorter), holding at most one group's rows. One group per unit gave the manifests of 1600 sources
    400 groups of ~7 rows: the footer outweighed the data, and reading them took 129 MiB (61 MiB for
    25 groups); see tests/test_publish.py."""

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


def finalize(run: RunDir, units: list[list[tuple[str, int]]], wall_start: float, versions: dict,
             cores: float = 0.0, processed: dict | None = None, version: int = 1, retried: int = 0) -> dict:
    """Publish dataset version `version`: index, manifests and summary from the commit records of
    `units` (every unit so far, in processing order: version, then URI; entries (uri, attempt):
    curation.units.plan_units) and the completion records of their sources. A source retried by a
    later version (curation.retry; `retried` of them by this one) is listed as its latest attempt
    has it: the earlier attempts' rows are left out, their units' index rows (their shards) stay.
    Metadata only (the shards are written), streamed a unit at a time so the driver's memory does not
    grow with the dataset. Written under versions/vNNNNNN/, then the pointer
    latest.json, then copied to the stable paths (see curation.versions). `processed`: the tracker's
    counts of what THIS invocation processed (its throughput); `cores`: the CPUs Ray had."""
    store, folder = run.store, contract.version_dir(version)
    files = {contract.INDEX_PATH: contract.INDEX_SCHEMA, contract.SOURCES_MANIFEST: contract.SOURCES_SCHEMA,
             contract.CLIPS_MANIFEST: contract.CLIPS_SCHEMA}
    totals, first = _Totals(), {}
    latest: dict[str, int] = {}  # a retried source -> its latest attempt (0 for every other source)
    for unit in units:
        for uri, attempt in unit:
            if attempt:
                latest[uri] = max(attempt, latest.get(uri, 0))
    with contextlib.ExitStack() as stack:
        writers = {rel: RowGroups(pq.ParquetWriter(stack.enter_context(store.writing(contract.version_file(folder, rel))),
                                                   schema)) for rel, schema in files.items()}
        for writer in writers.values():
            stack.callback(writer.close)  # runs before each file's rename (ExitStack unwinds in reverse)
        for n, entries in enumerate(units):
            committed = run.unit(n)
            records = [run.record(u, a) for u, a in entries]
            for r in records:  # every attempt, in order: the same decisions as the unit writer's
                mark_duplicate(r, first)
            apply_near_duplicates(records, committed.get("near_duplicates", {}))
            live = [r for (u, a), r in zip(entries, records) if latest.get(u, 0) == a]
            shard_of = {row["clip_id"]: row["shard"] for row in committed["index"]}
            clips = [dict(c, shard=c.get("shard") or shard_of.get(c["clip_id"]),
                          scores=contract.score_columns(c.get("scores"))) for r in live for c in r["clips"]]
            rows = {contract.INDEX_PATH: committed["index"], contract.SOURCES_MANIFEST: [r["source"] for r in live],
                    contract.CLIPS_MANIFEST: clips}
            for rel, schema in files.items():
                writers[rel].add(contract.table(rows[rel], schema))
            totals.add(live, committed, records)
    summary = totals.summary(time.time() - wall_start, versions)
    processed = processed or {}
    summary.update(version=version, retried_sources=retried, cores=cores,
                   processed_this_invocation=dict(processed), throughput=throughput(
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
        self.buckets, self.timings, self.discarded = Counter(), Counter(), Counter()
        self.hours_in = self.hours_out = 0.0
        self.shards = 0

    def add(self, live: list[dict], committed: dict, attempts: list[dict]) -> None:
        """`live`: the unit's records that count (each source's latest attempt); `attempts`: all of
        them (the seconds spent)."""
        self.shards += len(committed["shards"])
        for r in attempts:
            self.timings.update(r.get("timings", {}))
            self.discarded.update(r.get("discarded_timings", {}))
        for r in live:
            source = r["source"]
            self.sources[source["status"]] += 1
            self.hours_in += (source.get("duration") or 0) / 3600 if source["status"] == "ok" else 0
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
            # of those, the seconds spent on duplicate sources and near-duplicate clips (curation.duplicates)
            "discarded_stage_seconds": {k: round(v, 3) for k, v in sorted(self.discarded.items())},
            "wall_seconds_this_invocation": round(wall, 3),
            "versions": versions,
        }


def throughput(video_seconds: float, clips: int, wall: float, cores: float) -> dict:
    """Rates of a run: video-hours per wall-hour and per core-hour (wall x the cores Ray had), clips/s."""
    wall = max(wall, 1e-9)
    return {"video_hours_per_wall_hour": round(video_seconds / wall, 3),
            "video_hours_per_core_hour": round(video_seconds / (wall * cores), 3) if cores else None,
            "clips_per_second": round(clips / wall, 3)}
