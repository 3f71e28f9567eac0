"""Stage 6, write: per-source completion records, then shards, index, manifests and summary.

Exactly once. Workers stage each extracted clip as OUT/.work/clips/<clip_id>.mp4 (temp name +
rename). When every row of a source has come back, the driver writes OUT/.work/done/<source>.json:
from then on a rerun skips that source. When all sources are done, shards are assembled from the
records alone in a fixed order (bucket, source order, start frame) with fixed tar metadata, so a
killed-and-rerun job writes the same bytes as an uninterrupted one. Every output is written to a
temporary name and renamed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

from curation.sources import source_key
from spacetime import contract
from spacetime.errors import UserError
from spacetime.io import atomic_write, write_parquet
from spacetime.record import Caption, ClipRecord, SourceRef, Span


class RunDirError(UserError, RuntimeError):
    """An output directory that cannot be used for this run; the message says why and what to do."""


class RunDir:
    """Paths and resumable state of one output directory."""

    def __init__(self, out: Path):
        self.out = out
        self.work = out / contract.WORK_DIR
        self.staging = self.work / "clips"
        self.done = self.work / "done"
        self.fingerprint = self.work / "run.json"

    def done_path(self, uri: str) -> Path:
        return self.done / f"{source_key(uri)}.json"

    def is_done(self, uri: str) -> bool:
        return self.done_path(uri).exists()

    def claim(self, fingerprint: dict) -> None:
        """Start or resume a run; refuse an output made with other inputs or config."""
        if self.fingerprint.exists():
            old = json.loads(self.fingerprint.read_text())
            if old != fingerprint:
                changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                raise RunDirError(
                    f"{self.out} holds a run with different {', '.join(changed)}; rerunning resumes only "
                    "the same command. Use a new --output, or delete this one to start over.")
        elif (self.out / contract.SUMMARY_PATH).exists():
            raise RunDirError(f"{self.out}: finished output without run state; use a new --output")
        atomic_write(self.fingerprint, json.dumps(fingerprint, sort_keys=True, indent=1).encode())


class CompletionTracker:
    """Collects result rows in any order; a source is complete when the rows of each of its
    segments, up to its final segment, have all arrived."""

    def __init__(self, run: RunDir):
        self.run = run
        # Rows of sources still in flight only: a completed source leaves nothing behind here.
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.seen: dict[str, Counter] = defaultdict(Counter)
        self.need: dict[str, dict[int, int]] = defaultdict(dict)
        self.final: dict[str, int] = {}
        self.counts: Counter = Counter()  # sources, clips, kept, video_seconds of completed sources

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
        self._complete(uri)
        return True

    def _complete(self, uri: str) -> None:
        rows = self.rows.pop(uri)
        for state in (self.seen, self.need, self.final):
            state.pop(uri, None)
        source = next((r["source"] for r in rows if r.get("final")), rows[0]["source"])
        clips = sorted((r["clip"] for r in rows if r.get("clip")), key=lambda c: c["start_frame"])
        timings: Counter = Counter()
        for r in rows:
            timings.update(r.get("timings", {}))
        source = dict(source, num_clips=len(clips), num_kept=sum(c["status"] == "kept" for c in clips))
        record = {"source": source, "clips": clips, "timings": dict(timings)}
        atomic_write(self.run.done_path(uri), json.dumps(record, sort_keys=True).encode())
        self.counts.update(sources=1, clips=len(clips), kept=source["num_kept"],
                           video_seconds=(source.get("duration") or 0) if source["status"] == "ok" else 0)


def _pack_shards(kept: list[dict], target_bytes: int) -> dict[str, list[dict]]:
    """Deterministic assignment of kept clips to shard paths: per bucket, in the given order,
    a new shard whenever adding a clip would pass the target size."""
    by_bucket: dict[str, list[dict]] = defaultdict(list)
    for clip in kept:
        by_bucket[clip["bucket"]].append(clip)
    layout: dict[str, list[dict]] = {}
    for bucket in sorted(by_bucket):
        number, size = 0, 0
        for clip in by_bucket[bucket]:
            if size and size + clip["bytes"] > target_bytes:
                number, size = number + 1, 0
            layout.setdefault(contract.shard_path(bucket, number), []).append(clip)
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
        sampled_idx=clip.get("sampled_idx") or [], scores=clip.get("scores") or {}, caption=caption,
        provenance=versions)


def mark_duplicates(records: list[dict]) -> None:
    """A source whose content digest equals an earlier one's (in `records` order: sorted URIs, so the
    original does not depend on which finished first) becomes status `duplicate` with `duplicate_of`
    the original's URI; its clips (the same clip ids: ids are content-addressed) are dropped, so no
    key appears twice in the dataset."""
    first: dict[str, str] = {}
    for r in records:
        source = r["source"]
        if source["status"] != "ok":
            continue
        original = first.setdefault(source["digest"], source["uri"])
        if original != source["uri"]:
            source.update(status="duplicate", duplicate_of=original, num_clips=0, num_kept=0)
            r["clips"] = []


def throughput(video_seconds: float, clips: int, wall: float, cores: float) -> dict:
    """Rates of a run: video-hours per wall-hour and per core-hour (wall x the cores Ray had), clips/s."""
    wall = max(wall, 1e-9)
    return {"video_hours_per_wall_hour": round(video_seconds / wall, 3),
            "video_hours_per_core_hour": round(video_seconds / (wall * cores), 3) if cores else None,
            "clips_per_second": round(clips / wall, 3)}


def finalize(run: RunDir, uris: list[str], target_mb: float, wall_start: float, versions: dict,
             cores: float = 0.0, processed: dict | None = None) -> dict:
    """Assemble shards, index, manifests and summary from the completion records of `uris`.
    `processed`: the tracker's counts of what THIS invocation processed (its throughput); `cores`:
    the CPUs Ray had."""
    records = [json.loads(run.done_path(u).read_text()) for u in uris]
    mark_duplicates(records)
    sources = [r["source"] for r in records]
    clips = [c for r in records for c in r["clips"]]
    kept = [c for c in clips if c["status"] == "kept"]
    by_source = {s["uri"]: s for s in sources}
    layout = _pack_shards(kept, int(target_mb * 1024**2))
    index = []
    for rel, members in layout.items():
        path = run.out / rel
        if not path.exists():  # shards are complete under their final name, or absent
            contract.write_shard(path, [(Path(c["path"]).read_bytes(), clip_record(c, by_source[c["source_uri"]], versions))
                                        for c in members])
        for c in members:
            c["shard"] = rel
            index.append(dict(shard=rel, key=c["clip_id"], clip_id=c["clip_id"], source_uri=c["source_uri"],
                              width=c["width"], height=c["height"], num_frames=c["num_frames"], fps=c["fps"],
                              duration=c["end_time"] - c["start_time"], bucket=c["bucket"],
                              has_caption=bool(c.get("caption"))))
    for c in clips:
        c["scores_json"] = json.dumps(c.get("scores") or {}, sort_keys=True)
    write_parquet(run.out / contract.INDEX_PATH, contract.table(index, contract.INDEX_SCHEMA))
    write_parquet(run.out / contract.SOURCES_MANIFEST, contract.table(sources, contract.SOURCES_SCHEMA))
    write_parquet(run.out / contract.CLIPS_MANIFEST, contract.table(
        [dict(c, scores=c["scores_json"]) for c in clips], contract.CLIPS_SCHEMA))
    summary = _summary(records, clips, kept, len(layout), time.time() - wall_start, versions)
    processed = processed or {}
    summary.update(cores=cores, processed_this_invocation=dict(processed), throughput=throughput(
        processed.get("video_seconds", 0.0), processed.get("clips", 0), time.time() - wall_start, cores))
    atomic_write(run.out / contract.SUMMARY_PATH, json.dumps(summary, indent=1, sort_keys=True).encode())
    shutil.rmtree(run.staging, ignore_errors=True)  # everything staged now lives in the shards
    return summary


def _summary(records, clips, kept, num_shards, wall, versions) -> dict:
    sources = [r["source"] for r in records]
    ok = [s for s in sources if s["status"] == "ok"]
    hours_in = sum(s.get("duration") or 0 for s in ok) / 3600
    hours_out = sum(c["end_time"] - c["start_time"] for c in kept) / 3600
    timings: Counter = Counter()
    for r in records:
        timings.update(r.get("timings", {}))
    reasons = Counter((c.get("reason") or "").split(":")[0] for c in clips if c["status"] != "kept")
    return {
        "sources": {"total": len(sources), "ok": len(ok), "failed": sum(s["status"] == "failed" for s in sources),
                    "duplicate": sum(s["status"] == "duplicate" for s in sources)},
        "clips": {"total": len(clips), "kept": len(kept),
                  "rejected": sum(c["status"] == "rejected" for c in clips),
                  "failed": sum(c["status"] == "failed" for c in clips), "reasons": dict(reasons)},
        "shards": num_shards,
        "buckets": dict(Counter(c["bucket"] for c in kept)),
        "hours_in": hours_in, "hours_out": hours_out,
        "stage_seconds": {k: round(v, 3) for k, v in sorted(timings.items())},
        "wall_seconds_this_invocation": round(wall, 3),
        "versions": versions,
    }
