"""The duplicate decisions made at write time, in processing order (dataset version, then sorted URI).

The pipeline's write stage goes stages -> completion records (curation.completion) -> units
(curation.units) -> publish (curation.publish); the unit writer and publish both apply these
decisions to the completion records, so the shards and the manifests agree. A source whose content
digest equals a source before it (an earlier dataset version, or a smaller URI) is a `duplicate` and
adds no clip (`mark_duplicate`); a kept clip close to one kept in an earlier unit is rejected as a
near-duplicate (`NearDuplicates`, on curation.dedup's fingerprints and index). Both are known for
certain only once every source before it has been probed: that is why units are committed in order.
"""

from __future__ import annotations


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
        `mark_duplicate`); the survivors join the index. A retried source's clips that an earlier
        attempt kept (curation.retry) were decided, and indexed, in their own unit."""
        import numpy as np

        if self.indexes is None:
            return {}
        near: dict[str, str] = {}
        for kind, index in self.indexes.items():
            clips = [(c["clip_id"], np.array(c["fingerprint"], np.uint64), self._score(c))
                     for r in records for c in r["clips"]
                     if c["status"] == "kept" and c.get("fingerprint") and not c.get("retained")
                     and (c["num_frames"] == 1) == (kind == "image")]
            near.update(index.dedup(clips))
        return near


def apply_near_duplicates(records: list[dict], near: dict[str, str]) -> None:
    """Reject the clips `near` names, each naming the clip kept in its place."""
    for c in (c for r in records for c in r["clips"] if c["clip_id"] in near):
        c.update(status="rejected", duplicate_of=near[c["clip_id"]],
                 reason=f"duplicate: near-duplicate of clip {near[c['clip_id']]} (dedup.min_similarity)")
