"""Stage base classes and the row format shared by every pipeline stage.

Rows are {"meta": JSON text, "sampled": npy bytes of the frames kept for filters and captioning}:
one stable Arrow schema through every stage. A stage is a small class built from ITS OWN config
section (plus what it truly shares, such as the S3 settings): `__init__` loads what it needs once
per worker process (a model stage's actor, or a task worker), `__call__` handles a row (or a batch,
for BatchStage). `cfg.resources` of that section tells Ray how to run it (curation.pipeline).
"""

from __future__ import annotations

import json
import time


# A clip or source whose work an infrastructure failure stopped (spacetime.faults): never a fate. The
# completion tracker leaves its source undone, for the rerun (curation.completion.CompletionTracker).
DEFERRED = "deferred"
# A clip of a retried source (`spacetime curate --retry-failed`) over frames an earlier attempt settled:
# that fate stands, so no stage works on it, and the merged record leaves it out (curation.retry).
RETAINED = "retained"


def fail(clip: dict, name: str, err: BaseException) -> None:
    """Stage `name` could not do its work on `clip`: the clip fails with the error as its reason if the
    error is the content's (the run goes on), or is deferred to the rerun if it is the infrastructure's
    (spacetime.faults.is_infrastructure)."""
    from spacetime.errors import describe
    from spacetime.faults import is_infrastructure

    if is_infrastructure(err):
        defer(clip, f"{name}: {describe(err)}")
    else:
        clip.update(status="failed", reason=f"{name} failed: {describe(err)}")


def defer(item: dict, why: str) -> None:
    """Leave a clip (or a source: `item` is its dict) undone: status `deferred`, `why` as the reason.
    Its source gets no completion record in this run; the rerun does it again."""
    item.update(status=DEFERRED, reason=why)


def left_for_rerun(meta: dict) -> str | None:
    """Why this row's source must be left for the rerun (a deferred source or clip), else None."""
    for item in (meta.get("source") or {}, meta.get("clip") or {}):
        if item.get("status") == DEFERRED:
            return item.get("reason") or "deferred"
    return None


def pack(meta: dict, sampled: bytes = b"") -> dict:
    return {"meta": json.dumps(meta), "sampled": sampled}


def unpack(row: dict) -> tuple[dict, bytes]:
    return json.loads(row["meta"]), row["sampled"]


class Stage:
    """Times itself into meta['timings'][name]; subclasses implement `__call__`."""

    name = "stage"

    def __init__(self, cfg):
        self.cfg = cfg

    def timed(self, meta: dict, started: float) -> dict:
        timings = meta.setdefault("timings", {})
        timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - started
        return meta


def add_batch_time(metas: list[dict], name: str, started: float) -> None:
    """A batch's wall time, shared out over the rows the stage worked on (`metas`): a row it passed
    through untouched (a rejected clip, a duplicate) gets none of it."""
    share = (time.perf_counter() - started) / max(1, len(metas))
    for m in metas:
        timings = m.setdefault("timings", {})
        timings[name] = timings.get(name, 0.0) + share


class BatchStage(Stage):
    """A stage that works on batches of rows (models: batch frames across clips). Subclasses
    implement `process(items)`, items = [(meta, sampled bytes)] of candidate clips (and of rejected
    ones when `only_candidates` is False, but never near-duplicates: the output discards them); other
    rows pass through untouched."""

    only_candidates = True  # False: also rows of clips already rejected (filters score every clip)

    def wanted(self, meta: dict) -> bool:
        clip = meta.get("clip")
        return bool(clip) and (clip["status"] == "candidate" or (
            not self.only_candidates and clip["status"] == "rejected" and not clip.get("duplicate_of")))

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        metas = [json.loads(m) for m in batch["meta"]]
        sampled = list(batch["sampled"])
        todo = [i for i, m in enumerate(metas) if self.wanted(m)]
        if todo:
            self.process([(metas[i], sampled[i]) for i in todo])
        add_batch_time([metas[i] for i in todo], self.name, t0)
        for meta in metas:
            self.tidy(meta)
        return {"meta": [json.dumps(m) for m in metas], "sampled": sampled}

    def process(self, items: list[tuple[dict, bytes]]) -> None:
        raise NotImplementedError

    def tidy(self, meta: dict) -> None:
        """Called on every row of a batch, wanted or not, before it goes on (default: nothing)."""
