"""Duplicate decisions: made by the dedup gate, in processing order (dataset version, then sorted
URI), BEFORE the expensive stages (aesthetic, caption, extract), so no work goes to a clip the output
discards. Why and how the gate orders them: curation.dedup, "Ordering the decisions".

A source whose content (its coded pictures: `dedup_key`) equals that of a source before it (an
earlier dataset version, or a smaller URI) is a `duplicate` and adds no clip (`mark_duplicate`); a candidate clip close to one that
survived an earlier unit, or to a better one of its own unit, is rejected as a near-duplicate
(`NearDuplicates`, on curation.dedup's fingerprints and index). `DedupGate` is the pipeline stage that
decides both, a unit at a time, and records each unit's decisions (OUT/.work/dedup/<unit>.json) before
any of its rows goes on, so a rerun applies the same decisions. The unit writer and publish apply what
the records hold (`apply_near_duplicates`, `mark_duplicate` for outputs made before the gate).
"""

from __future__ import annotations

import json
import time

from curation.stage import DEFERRED, left_for_rerun


def dedup_key(source: dict) -> str | None:
    """What makes two sources duplicates: the digest of their coded pictures where the probe took it
    (probe.stream_digest: a remux is a duplicate), else the digest of their bytes."""
    return source.get("stream_digest") or source.get("digest")


def registers(source: dict) -> bool:
    """A source whose digest later sources with the same bytes are duplicates of: every source that
    was probed (it has a digest) and is not a duplicate itself, whatever its later fate. The same
    bytes fare the same, so a copy of a source that failed its analysis would fail it too: it is a
    duplicate, not decoded again. (A deferred source has no record: the rerun decides it.)"""
    return bool(dedup_key(source)) and source["status"] not in ("duplicate", DEFERRED)


def mark_duplicate(record: dict, first: dict[str, str]) -> None:
    """Mark the completion record of a source whose content digest equals an earlier one's as status
    `duplicate` with `duplicate_of` the original's URI. `first`: digest -> first URI, filled in
    processing order (dataset version, then sorted URI), so the original does not depend on which
    source finished first. Its clips (the same ids: ids are content-addressed) are dropped, so no key
    appears twice."""
    source = record["source"]
    if source["status"] == "duplicate":  # the probe found it in an earlier version: name the original
        source["duplicate_of"] = (source.get("duplicate_of") or first.get(dedup_key(source))
                                  or first[source["digest"]])
        return
    if not registers(source):
        return
    original = first.setdefault(dedup_key(source), source["uri"])
    if source["status"] != "ok":  # failed after its probe: the first of its bytes all the same
        return
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

    def decide(self, clips: list[dict]) -> tuple[dict[str, str], dict[str, list]]:
        """(clip_id -> the clip_id it duplicates, the survivors by kind: [clip_id, hashes, score]) for
        one unit's clips that may be kept (the gate's candidates; `legacy_candidates` for a unit
        decided before the gate); the survivors join the index. A retried source's clips that an
        earlier attempt kept (curation.retry) were decided, and indexed, in their own unit."""
        import numpy as np

        if self.indexes is None:
            return {}, {}
        near: dict[str, str] = {}
        survivors: dict[str, list] = {}
        for kind, index in self.indexes.items():
            batch = [(c["clip_id"], np.array(c["fingerprint"], np.uint64), self._score(c)) for c in clips
                     if c.get("fingerprint") and not c.get("retained") and (c["num_frames"] == 1) == (kind == "image")]
            decided = index.dedup(batch)
            near.update(decided)
            survivors[kind] = [[i, [int(h) for h in hashes], score]
                               for i, hashes, score in sorted(batch, key=lambda b: b[0]) if i not in decided]
        return near, survivors

    def replay(self, survivors: dict[str, list]) -> None:
        """Index a decided unit's survivors again (a rerun, or a later version, reading its decisions)."""
        import numpy as np

        if self.indexes is None:
            return
        for kind, rows in survivors.items():
            for clip_id, hashes, score in rows:
                if clip_id not in self.indexes[kind]:  # a retried clip is a survivor of two units
                    self.indexes[kind].add(clip_id, np.array(hashes, np.uint64), score)


def apply_near_duplicates(records: list[dict], near: dict[str, str]) -> None:
    """Reject the clips `near` names, each naming the clip kept in its place."""
    for c in (c for r in records for c in r["clips"] if c["clip_id"] in near):
        c.update(status="rejected", duplicate_of=near[c["clip_id"]],
                 reason=f"duplicate: near-duplicate of clip {near[c['clip_id']]} (dedup.min_similarity)")


def legacy_candidates(records: list[dict]) -> list[dict]:
    """The clips a unit decided at write time (before the gate existed) competed with: its kept ones."""
    return [c for r in records for c in r["clips"] if c["status"] == "kept"]


class DedupGate:
    """The pipeline stage that decides duplicates in processing order, before the expensive stages.

    One actor (Ray Data map_batches, an actor pool of one) sees every row after the fingerprint (after
    the aesthetic score when `dedup.keep` is that score). It holds a unit's rows until every source of
    that unit has all its rows here and every earlier unit is decided; then it decides the unit
    (`decide_unit`), records the decisions under OUT/.work/dedup/, and lets the unit's rows go on:
    - the rows of a duplicate source lose their clip (no stage after this one works on it);
    - a near-duplicate clip is rejected naming the clip kept in its place, and its frames are dropped
      (no score, caption, thumbnail, preview or extraction);
    - every other row goes on unchanged.
    A unit already decided (its decisions recorded by an earlier invocation) is not decided again: its
    recorded decisions are applied. So the decisions do not depend on timing, worker counts, kills or
    reruns: only on the units and their candidates (curation.dedup, "Ordering the decisions").
    """

    name = "dedup"

    def __init__(self, cfg, units: list[list], pending: list, store):
        """`units`: every unit of the output so far (curation.units.plan_units: (uri, attempt) entries);
        `pending`: the entries this invocation processes (their rows come through here)."""
        from curation.completion import Arrivals
        from curation.rundir import RunDir

        self.cfg, self.run, self.units = cfg, RunDir(store), [[tuple(e) for e in u] for u in units]
        self.entry_of = {uri: (uri, attempt) for uri, attempt in pending}
        self.pending = set(self.entry_of.values())
        self.arrivals, self.rows, self.arrived = Arrivals(), {}, set()
        self.next, self.first, self.near = 0, {}, NearDuplicates(cfg)
        self.decided: set[int] = self.run.decided_units()
        self.late: list = []  # (unit, entry): deferred from a recorded unit's decisions, decided here

    def __call__(self, batch: dict):
        t0 = time.perf_counter()
        for text, sampled in zip(batch["meta"], batch["sampled"]):
            meta = json.loads(text)
            entry = self.entry_of[meta["source"]["uri"]]
            self.rows.setdefault(entry, []).append((meta, sampled))
            if self.arrivals.add(meta):
                self.arrived.add(entry)
        out = self._advance()
        if out:
            share = (time.perf_counter() - t0) / len(out)
            for meta, _ in out:
                timings = meta.setdefault("timings", {})
                timings[self.name] = timings.get(self.name, 0.0) + share
            yield {"meta": [json.dumps(m) for m, _ in out], "sampled": [s for _, s in out]}

    def _advance(self) -> list[tuple[dict, bytes]]:
        """Decide every unit that can be, in order; the rows they release."""
        out: list[tuple[dict, bytes]] = []
        while self.next < len(self.units):
            n, entries = self.next, self.units[self.next]
            todo = [e for e in entries if e in self.pending]
            if not all(e in self.arrived for e in todo):
                break
            if n in self.decided:  # recorded: replayed, not decided again
                decisions = self.run.dedup(n)
                self._add(decisions, replay=True)
                late = [e for e in todo if list(e) in decisions["missing"]]
                self.late += [(n, e) for e in late]
                todo = [e for e in todo if e not in late]
            else:
                out += self._decide_late()
                decisions = self._decide(n, entries, todo)
            for e in todo:
                out += self._release(e, decisions)
            self.arrived.difference_update(todo)
            self.next += 1
        if self.next == len(self.units):
            out += self._decide_late()
        return out

    def _decide(self, n: int, entries: list, todo: list) -> dict:
        """Unit n's decisions, made now and recorded. A source an infrastructure fault deferred is left
        out of them, as `missing` (its rows go on: the tracker leaves it for the rerun)."""
        deferred = {e for e in todo if self._deferred(e)}
        done = [e for e in entries if e not in self.pending]
        records = {e: self.run.record(*e) for e in done}  # none, unless made before the gate
        fresh = [e for e in todo if e not in deferred]
        sources = [records[e]["source"] if e in records else self._source(e) for e in entries
                   if e not in deferred]
        decisions = self.decide_unit(sources, legacy_candidates(list(records.values())) + self._candidates(fresh))
        decisions.update(unit=n, missing=sorted(list(e) for e in deferred))
        self._add(decisions)
        if todo:
            self.run.store.write(self.run.dedup_path(n), json.dumps(decisions, sort_keys=True))
        return decisions

    def _decide_late(self) -> list[tuple[dict, bytes]]:
        """The sources a fault deferred from their unit's decisions in an earlier invocation, decided
        once every recorded unit is replayed: against all of them (a copy of such a source that went on
        in its place stays the original; none of its clips is withdrawn). Their units' records grow."""
        out: list[tuple[dict, bytes]] = []
        late = [(n, e) for n, e in self.late if not self._deferred(e)]
        for n in sorted({n for n, _ in late}):
            entries = [e for m, e in late if m == n]
            extra = self.decide_unit([self._source(e) for e in entries], self._candidates(entries))
            self._add(extra)
            decisions = merge_decisions(self.run.dedup(n), extra, entries)
            self.run.store.write(self.run.dedup_path(n), json.dumps(decisions, sort_keys=True))
            for e in entries:
                out += self._release(e, decisions)
        for _, e in self.late:  # deferred again: on for the tracker, undecided
            out += self._release(e, None)
        self.late = []
        return out

    def _release(self, entry, decisions: dict | None) -> list[tuple[dict, bytes]]:
        """The entry's rows, leaving the gate: each row's source with the analysis' count of damaged
        packets, which only the final row had (every row is here: curation.extract trusts a copy of
        the source's packets without decoding it only when that count is 0), and the unit's decisions
        applied if it was decided."""
        from curation.completion import final_source

        rows = self.rows.pop(entry, [])
        damaged = final_source([m for m, _ in rows]).get("decode_errors") if rows else None
        for meta, _ in rows:
            meta["source"]["decode_errors"] = damaged
        return [apply_decisions(m, s, decisions) for m, s in rows] if decisions is not None else rows

    def _deferred(self, entry) -> bool:
        return any(left_for_rerun(m) for m, _ in self.rows.get(entry, []))

    def _source(self, entry) -> dict:
        from curation.completion import final_source

        return final_source([m for m, _ in self.rows.get(entry, [])])

    def _candidates(self, entries: list) -> list[dict]:
        return [m["clip"] for e in entries for m, _ in self.rows.get(e, [])
                if m.get("clip") and m["clip"]["status"] == "candidate"]

    def _add(self, decisions: dict, replay: bool = False) -> None:
        """Decisions made (their survivors are indexed already) or replayed join the gate's state."""
        for digest, uri in decisions["first"].items():
            self.first.setdefault(digest, uri)
        if replay:
            self.near.replay(decisions["survivors"])

    def decide_unit(self, sources: list[dict], candidates: list[dict]) -> dict:
        """The decisions of one unit: its duplicate sources (uri -> original), the digests it adds to
        `first`, its near-duplicate clips (clip_id -> the kept one) and the survivors it indexes."""
        first, duplicates = dict(self.first), {}
        for source in sources:
            record = {"source": dict(source), "clips": []}
            mark_duplicate(record, first)
            if record["source"]["status"] == "duplicate":  # the probe's claim may name a later original
                duplicates[source["uri"]] = first.get(dedup_key(source), record["source"]["duplicate_of"])
        near, survivors = self.near.decide([c for c in candidates if c["source_uri"] not in duplicates])
        added = {d: u for d, u in first.items() if d not in self.first}
        return {"duplicates": duplicates, "first": added, "near": near, "survivors": survivors, "missing": []}


def merge_decisions(decisions: dict, extra: dict, late: list) -> dict:
    """A unit's recorded decisions with those of its sources decided late (`extra`) added."""
    survivors = {k: decisions["survivors"].get(k, []) + extra["survivors"].get(k, [])
                 for k in set(decisions["survivors"]) | set(extra["survivors"])}
    return dict(decisions, duplicates={**decisions["duplicates"], **extra["duplicates"]},
                first={**decisions["first"], **extra["first"]}, near={**decisions["near"], **extra["near"]},
                survivors=survivors, missing=[m for m in decisions["missing"] if tuple(m) not in late])


def apply_decisions(meta: dict, sampled: bytes, decisions: dict) -> tuple[dict, bytes]:
    """One row after its unit's decisions: a duplicate source's row without its clip, a near-duplicate
    clip rejected without its frames, any other row as it was."""
    uri = meta["source"]["uri"]
    original = decisions["duplicates"].get(uri)
    if original is not None:
        meta["source"].update(status="duplicate", duplicate_of=original)
        meta["clip"] = None
        return meta, b""
    clip = meta.get("clip")
    if clip and clip["clip_id"] in decisions["near"] and clip["status"] == "candidate":
        apply_near_duplicates([{"clips": [clip]}], decisions["near"])
        return meta, b""
    return meta, sampled


class FirstClaims:
    """A Ray actor (one per run, on the driver's node): the first source, in processing order, of each
    content digest probed so far. The probe claims each digest it computes; a source whose bytes an
    EARLIER source (by processing order) has claimed is certainly a duplicate (`registers`: whatever
    that source's later fate), so the probe marks it and nothing decodes it. A source probed before an
    earlier copy of it is left to the gate, which decides in order: the claims only save work, the
    gate's decisions stand either way (and name the first of the copies)."""

    def __init__(self):
        self.first: dict[str, tuple[int, str]] = {}

    def claim(self, digest: str, order: int, uri: str) -> str | None:
        """The URI of an earlier source (by `order`) with this digest, else None (and the claim is held)."""
        held = self.first.get(digest)
        if held is not None and held[0] < order:
            return held[1]
        self.first[digest] = (order, uri)
        return None
