"""`spacetime caption --input DATASET --output DIR`: recaption an existing curation output.

Reads DATASET/shards/index.parquet and the shards (spacetime.contract), captions every indexed clip
from its own mp4 (N frames evenly spaced, decoded at the pixel budget), and writes a dataset with
the same layout:

    DIR/shards/<bucket>/<name>.tar     same shard paths, same sample order; the record
                                       (<key>.json, spacetime.record.ClipRecord) gets the new
                                       `caption`; <key>.txt the new dense caption. A clip whose caption failed (after one
                                       retry) is left out of the shards, like in `spacetime curate`.
    DIR/shards/index.parquet           the input's rows for the samples written
    DIR/manifest/captions.parquet      one row per input clip: ok | failed, reason, caption, provenance
    DIR/caption_summary.json           counts of this output, and of this invocation

Idempotent and resumable by clip id: each clip's verdict is recorded in DIR/.work/captions/<clip_id>.json
(temp name + rename) as soon as it is known. A rerun asks the engine only for the clips without a
successful record (never captioned, or failed, e.g. while the endpoint was down), then rewrites the
shards, index and manifest from the records (deterministic bytes). DIR refuses a rerun with another
input or caption config (resources excepted).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq

from captioner.config import CaptionConfig
from captioner.core import CaptionResult, Captioner, ClipTask
from captioner.frames import from_mp4
from spacetime import contract
from spacetime.contract import CAPTION_SUMMARY, CAPTIONS_MANIFEST, CAPTIONS_SCHEMA, read_record, read_shard
from spacetime.errors import MissingInput, UserError, describe
from spacetime.io import atomic_write, write_parquet
from spacetime.record import Caption

log = logging.getLogger(__name__)

RECORDS_DIR = f"{contract.WORK_DIR}/captions"
FINGERPRINT = f"{contract.WORK_DIR}/caption_run.json"


class _Records:
    """Per-clip verdicts under DIR/.work/captions (the resumable state)."""

    def __init__(self, out: Path):
        self.dir = out / RECORDS_DIR

    def path(self, clip_id: str) -> Path:
        return self.dir / f"{clip_id}.json"

    def load(self, clip_id: str) -> dict | None:
        try:
            return json.loads(self.path(clip_id).read_text())
        except FileNotFoundError:
            return None

    def save(self, result: CaptionResult, shard: str) -> dict:
        record = {"clip_id": result.clip_id, "shard": shard, "status": "ok" if result.ok else "failed",
                  "reason": None if result.ok else f"caption: {result.reason}", "attempts": result.attempts,
                  "caption": result.caption, "fields": result.fields, "provenance": result.provenance}
        atomic_write(self.path(result.clip_id), json.dumps(record, sort_keys=True).encode())
        return record


def _claim(out: Path, input_dir: Path, cfg: CaptionConfig) -> None:
    fingerprint = {"input": str(input_dir), "caption": cfg.model_dump(mode="json", exclude={"resources"})}
    path = out / FINGERPRINT
    if path.exists():
        old = json.loads(path.read_text())
        if old != fingerprint:
            before, now = old.get("caption", {}), fingerprint["caption"]
            changed = (["input"] if old.get("input") != fingerprint["input"] else []) + \
                [f"caption.{k}" for k in sorted(now) if before.get(k) != now[k]]
            what = ", ".join(changed)
            raise UserError(f"{out} holds a recaption with a different {what}; rerunning resumes only the same "
                               "command. Use a new --output, or delete this one to start over.")
    atomic_write(path, json.dumps(fingerprint, sort_keys=True, indent=1).encode())


def run_recaption(input_dir: str | Path, output_dir: str | Path, cfg: CaptionConfig,
                  progress: Callable[[dict], None] | None = None, captioner: Captioner | None = None) -> dict:
    """Recaption the dataset at `input_dir` into `output_dir` (see the module docstring).

    `progress(record)` is called after each clip's verdict is recorded; `captioner` reuses a loaded
    engine (built from the same `cfg`; default: load one for this call). Returns the summary:
    {"clips", "ok", "failed", "this_run": {"requested", "ok", "failed", "seconds", "output_tokens"},
     "shards"}."""
    t0 = time.perf_counter()
    input_dir, out = Path(input_dir).resolve(), Path(output_dir).resolve()
    index_path = input_dir / contract.INDEX_PATH
    if not index_path.exists():
        raise MissingInput(f"{input_dir}: no {contract.INDEX_PATH}; expected the --output of `spacetime curate`")
    index = pq.read_table(index_path).to_pylist()
    _claim(out, input_dir, cfg)
    records = _Records(out)
    done = {row["clip_id"]: r for row in index if (r := records.load(row["clip_id"])) is not None}
    pending = [row for row in index if done.get(row["clip_id"], {}).get("status") != "ok"]
    log.info("%d clips, %d captioned already, %d to caption -> %s", len(index), len(index) - len(pending),
             len(pending), out)
    this_run = {"requested": len(pending), "ok": 0, "failed": 0, "output_tokens": 0}
    if pending:
        own = captioner is None
        captioner = captioner or Captioner(cfg)
        for r in done.values():  # duplicates are checked against the whole output, across reruns
            if r["status"] == "ok":
                captioner.duplicates.add(r["clip_id"], r["caption"])
        tokens_before = captioner.stats["output_tokens"]
        try:
            for record in _caption_pending(captioner, input_dir, pending, records, cfg):
                done[record["clip_id"]] = record
                this_run[record["status"]] += 1
                if progress is not None:
                    progress(record)
        finally:
            this_run["output_tokens"] = captioner.stats["output_tokens"] - tokens_before
            if own:
                captioner.close()
    summary = _finalize(input_dir, out, index, done)
    summary["this_run"] = dict(this_run, seconds=round(time.perf_counter() - t0, 3))
    atomic_write(out / CAPTION_SUMMARY, json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def _caption_pending(captioner: Captioner, input_dir: Path, pending: list[dict], records: _Records,
                     cfg: CaptionConfig) -> Iterator[dict]:
    """Decode and caption the pending clips shard by shard, in chunks; the next chunk is decoded
    while the engine works on the current one. Yields each saved record."""
    chunk_size = max(1, cfg.resources.batch_size)
    by_shard: dict[str, set[str]] = defaultdict(set)
    for row in pending:
        by_shard[row["shard"]].add(row["clip_id"])

    def chunks() -> Iterator[list[tuple[str, str, ClipTask | str]]]:
        chunk: list[tuple[str, str, ClipTask | str]] = []
        for shard in sorted(by_shard):
            for sample in read_shard(input_dir / shard):
                clip_id = sample["__key__"]
                if clip_id not in by_shard[shard]:
                    continue
                try:
                    record = read_record(sample, where=str(input_dir / shard))
                    task: ClipTask | str = ClipTask(clip_id, from_mp4(sample[contract.VIDEO_EXT], cfg.frames, cfg.max_pixels,
                                                                      (record.skip_frames, record.num_frames)))
                except Exception as err:  # an undecodable clip is a caption failure, not a crash
                    task = f"frames unusable: {describe(err)}"
                chunk.append((shard, clip_id, task))
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    in_flight = None  # (chunk, future)
    for chunk in chunks():
        tasks = [t for _, _, t in chunk if isinstance(t, ClipTask)]
        future = captioner.runner.submit(captioner._caption_all(tasks))
        if in_flight is not None:
            yield from _save(records, *in_flight)
        in_flight = (chunk, future)
    if in_flight is not None:
        yield from _save(records, *in_flight)


def _save(records: _Records, chunk: list, future) -> Iterator[dict]:
    results = future.result()
    for shard, clip_id, task in chunk:
        result = results[clip_id] if isinstance(task, ClipTask) else CaptionResult(clip_id, ok=False, reason=task)
        yield records.save(result, shard)


def _finalize(input_dir: Path, out: Path, index: list[dict], done: dict[str, dict]) -> dict:
    """Shards, index and captions manifest from the records (every output rewritten, same bytes
    for the same records)."""
    ok = {cid for cid, r in done.items() if r["status"] == "ok"}
    written = []
    for shard in sorted({row["shard"] for row in index}):
        samples = []
        for sample in read_shard(input_dir / shard):
            record = done.get(sample["__key__"])
            if record is None or record["status"] != "ok":
                continue
            clip = read_record(sample, where=str(input_dir / shard))
            fields = {k: v for k, v in (record["fields"] or {}).items() if k != "dense"}
            clip.caption = Caption(**fields, dense=record["caption"], provenance=record["provenance"] or {})
            clip.grounding = []  # the checks were of the old caption (curation.grounding runs in `curate` only)
            clip.scores = {k: v for k, v in clip.scores.items() if k not in contract.CAPTION_SCORES}  # so were these
            samples.append((sample[contract.VIDEO_EXT], clip))
        if samples:
            contract.write_shard(out / shard, samples)
        elif (out / shard).exists():
            (out / shard).unlink()
        written.extend(clip.clip_id for _, clip in samples)
    rows = [dict(row, has_caption=True) for row in index if row["clip_id"] in ok]
    write_parquet(out / contract.INDEX_PATH, contract.table(rows, contract.INDEX_SCHEMA))
    manifest = []
    for row in index:
        r = done.get(row["clip_id"])
        manifest.append({"clip_id": row["clip_id"], "shard": row["shard"],
                         "status": r["status"] if r else "pending", "reason": r["reason"] if r else None,
                         "attempts": r["attempts"] if r else 0, "caption": r["caption"] if r else None,
                         "short": (r.get("fields") or {}).get("short") if r else None,
                         "provenance": json.dumps(r["provenance"], sort_keys=True) if r and r["provenance"] else None})
    write_parquet(out / CAPTIONS_MANIFEST, contract.table(manifest, CAPTIONS_SCHEMA))
    return {"clips": len(index), "ok": len(ok), "failed": sum(r["status"] == "failed" for r in done.values()),
            "shards": len({row["shard"] for row in rows}), "samples_written": len(written)}

