"""Completion records: result rows, arriving in any order, become one record per finished source.

The pipeline's write stage goes stages -> completion records -> units (curation.units) -> publish
(curation.publish). Workers stage each extracted clip as OUT/.work/clips/<clip_id>.mp4
(curation.rundir.staged_clip). When every row of a source has come back, the driver writes
OUT/.work/done/<source>.json: from then on a rerun skips that source. A source that an
infrastructure failure deferred gets no record: it is left for the rerun, which does it again. A
source run again by `--retry-failed` gets the record of its attempt, merged with its earlier one's
settled clips (curation.retry).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict

from curation.retry import Retry, merge
from curation.rundir import RunDir
from curation.stage import left_for_rerun

log = logging.getLogger(__name__)


def final_source(metas: list[dict]) -> dict:
    """A complete source's fields as its rows hold them: the final segment's row has the totals
    (num_frames, cuts) the analysis adds last."""
    return next((m["source"] for m in metas if m.get("final")), metas[0]["source"])


class Arrivals:
    """Which sources have all their rows: a source is complete when the rows of each of its segments,
    up to its final segment, have arrived (every row says how many rows its segment has). Used by the
    driver (CompletionTracker) and by the dedup gate (curation.duplicates.DedupGate)."""

    def __init__(self):
        # Sources still in flight only: a completed source leaves nothing behind here.
        self.seen: dict[str, Counter] = defaultdict(Counter)
        self.need: dict[str, dict[int, int]] = defaultdict(dict)
        self.final: dict[str, int] = {}

    def add(self, meta: dict) -> bool:
        """Count one row; True if it was its source's last (the source's state is then forgotten)."""
        uri, seg = meta["source"]["uri"], meta["seg_index"]
        self.seen[uri][seg] += 1
        self.need[uri][seg] = meta["rows_in_segment"]
        if meta.get("final"):
            self.final[uri] = seg
        last = self.final.get(uri)
        if last is None or any(self.seen[uri][i] != self.need[uri].get(i, -1) for i in range(last + 1)):
            return False
        for state in (self.seen, self.need, self.final):
            state.pop(uri, None)
        return True


def analyzed(source: dict) -> bool:
    """Whether this run decoded the source: an ok one, or a duplicate found after its analysis (by the
    dedup gate; one the probe found was never decoded). Its seconds count in the run's throughput."""
    return source["status"] == "ok" or (source["status"] == "duplicate" and source.get("num_frames") is not None)


class CompletionTracker:
    """Collects result rows in any order; a source is complete when the rows of each of its
    segments, up to its final segment, have all arrived. A source with a deferred row (an
    infrastructure failure: curation.stage.defer) gets no completion record: it is left in `left`
    (URI -> why) for the rerun, which processes it again from the start."""

    def __init__(self, run: RunDir, retries: dict[str, Retry] | None = None):
        """`retries`: the sources this run processes again (curation.retry.plan_retries)."""
        self.run, self.retries = run, retries or {}
        # Rows of sources still in flight only: a completed source leaves nothing behind here.
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.arrivals = Arrivals()
        self.counts: Counter = Counter()  # sources, clips, kept, video_seconds of completed sources
        self.left: dict[str, str] = {}  # sources left for the rerun, and why

    def add(self, meta: dict) -> bool:
        """Record one row; returns True (and writes the completion record) if its source is done."""
        uri = meta["source"]["uri"]
        self.rows[uri].append(meta)
        return self.arrivals.add(meta) and self._complete(uri)

    def _complete(self, uri: str) -> bool:
        rows = self.rows.pop(uri)
        why = next(filter(None, map(left_for_rerun, rows)), None)
        if why is not None:  # not the source's fate: no record, so the rerun does it again
            self.left[uri] = why
            log.warning("%s: left for the rerun: %s", uri, why)
            return False
        source = final_source(rows)
        failed = next((r["source"] for r in rows if r["source"]["status"] == "failed"), None)
        if failed is not None:  # a stage may fail a source on any of its segments, not only the final one
            source = dict(source, status="failed", error=failed.get("error"))
        clips = sorted((r["clip"] for r in rows if r.get("clip")), key=lambda c: c["start_frame"])
        timings, discarded = Counter(), Counter()
        for r in rows:
            timings.update(r.get("timings", {}))
            if source["status"] == "duplicate" or (r.get("clip") or {}).get("duplicate_of"):
                discarded.update(r.get("timings", {}))  # seconds spent on what the output discards
        source = dict(source, num_clips=len(clips), num_kept=sum(c["status"] == "kept" for c in clips))
        record = {"source": source, "clips": clips, "timings": dict(timings), "discarded_timings": dict(discarded)}
        retry = self.retries.get(uri)
        if retry is not None:  # the earlier attempt's settled clips join the new attempt's
            record = merge(self.run.record(uri, retry.prior_attempt), self.run.unit(retry.prior_unit), record)
            source, clips = record["source"], [c for c in record["clips"] if not c.get("retained")]
        self.run.store.write(self.run.done_path(uri, self.attempt(uri)), json.dumps(record, sort_keys=True))
        if source["status"] == "failed":  # genuine errors reach the console, naming the source
            log.error("%s: failed: %s", uri, source.get("error"))
        failed = [c for c in clips if c["status"] == "failed"]
        if failed:
            log.error("%s: %d clip(s) failed, first [%s:%s): %s", uri, len(failed), failed[0]["start_frame"],
                      failed[0]["end_frame"], failed[0].get("reason"))
        self.counts.update(sources=1, clips=len(clips), kept=sum(c["status"] == "kept" for c in clips),
                           rejected=sum(c["status"] == "rejected" for c in clips),
                           duplicates=sum(bool(c.get("duplicate_of")) for c in clips),
                           failed=sum(c["status"] == "failed" for c in clips),
                           failed_sources=int(source["status"] == "failed"), retried=int(retry is not None),
                           video_seconds=(source.get("duration") or 0) if analyzed(source) else 0)
        return True

    def attempt(self, uri: str) -> int:
        """The attempt this run makes at `uri`: 0, or the version that retries it."""
        retry = self.retries.get(uri)
        return retry.attempt if retry else 0
