"""Stage base classes and the row format shared by every pipeline stage.

Rows are {"meta": JSON text, "sampled": npy bytes of the frames kept for filters and captioning}:
one stable Arrow schema through every stage. A stage is a small class: `__init__` loads what it needs
once per actor, `__call__` handles a row (or a batch, for BatchStage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from curation.settings import CurateConfig


def pack(meta: dict, sampled: bytes = b"") -> dict:
    return {"meta": json.dumps(meta), "sampled": sampled}


def unpack(row: dict) -> tuple[dict, bytes]:
    return json.loads(row["meta"]), row["sampled"]


def _error(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


class Stage:
    """Times itself into meta['timings'][name]; subclasses implement `process`."""

    name = "stage"

    def __init__(self, cfg: CurateConfig, out: str):
        self.cfg, self.out = cfg, Path(out)

    def timed(self, meta: dict, started: float) -> dict:
        timings = meta.setdefault("timings", {})
        timings[self.name] = timings.get(self.name, 0.0) + time.perf_counter() - started
        return meta


class BatchStage(Stage):
    """A stage that works on batches of rows (models: batch frames across clips). Subclasses
    implement `process(items)`, items = [(meta, sampled bytes)] of candidate clips (and of rejected
    ones when `only_candidates` is False); other rows pass through untouched."""

    only_candidates = True  # False: also rows of clips already rejected (filters score every clip)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        metas = [json.loads(m) for m in batch["meta"]]
        sampled = list(batch["sampled"])
        todo = [i for i, m in enumerate(metas) if m.get("clip") and (
            m["clip"]["status"] == "candidate" or (not self.only_candidates and m["clip"]["status"] == "rejected"))]
        if todo:
            self.process([(metas[i], sampled[i]) for i in todo])
        share = (time.perf_counter() - t0) / max(1, len(metas))
        for m in metas:  # the batch's time, shared out per row
            m.setdefault("timings", {})[self.name] = m.get("timings", {}).get(self.name, 0.0) + share
        return {"meta": [json.dumps(m) for m in metas], "sampled": sampled}

    def process(self, items: list[tuple[dict, bytes]]) -> None:
        raise NotImplementedError
