"""People's decisions on the clips of a curation output: the data contract of `spacetime review`.

A decision is one row of REVIEW_SCHEMA, written as its own Parquet file under OUT/review/ (a folder
or an s3:// prefix), so that an append is one atomic write (spacetime.store) and reviewers never
overwrite each other:

    OUT/review/20261207T113005123456Z-3f2a9c1e.parquet   # clip_id, verdict, reviewer, time, dense, short, ...

verdict: `accept` (the clip is good), `reject` (it should not be in the dataset), or `edit` (the
dense and/or short caption, as the person corrected it). A clip's state is its latest accept/reject
and its latest edit (`current`). Readers:
- `labels`: {clip_id: bad} for `spacetime calibrate FILTER --labels OUT/review`;
- `gold_captions`: the edited captions, for `spacetime caption finetune --data OUT/review`.
"""

from __future__ import annotations

import io
import uuid
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from spacetime.config import S3Config
from spacetime.store import Store

VERDICTS = ("accept", "reject", "edit")
REVIEW_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("verdict", pa.string()),  # accept | reject | edit
    ("reviewer", pa.string()),
    ("time", pa.timestamp("us", tz="UTC")),
    ("dense", pa.string()),  # edit: the corrected dense caption (null: unchanged)
    ("short", pa.string()),  # edit: the corrected short caption (null: unchanged)
    ("status", pa.string()),  # the pipeline's verdict on the clip when reviewed: kept | rejected | failed
    ("reason", pa.string()),  # and its reason (rejected, failed)
    ("source", pa.string()),  # where the decision came from: page | label-studio
])


def review_store(path: str, s3: S3Config | None = None) -> Store:
    """The review folder `path` (OUT/review, local or s3://)."""
    return Store(path, s3)


def append(store: Store, clip_id: str, verdict: str, reviewer: str, *, dense: str | None = None,
           short: str | None = None, status: str | None = None, reason: str | None = None,
           source: str = "page", time: datetime | None = None) -> dict:
    """Record one decision (one new file; atomic). Returns the row written."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r}: one of {', '.join(VERDICTS)}")
    if not clip_id:
        raise ValueError("a decision needs a clip_id")
    if verdict == "edit" and dense is None and short is None:
        raise ValueError(f"{clip_id}: an edit needs a dense or a short caption")
    if verdict != "edit" and (dense is not None or short is not None):
        raise ValueError(f"{clip_id}: captions are edited by an `edit` decision, not by {verdict!r}")
    when = time or datetime.now(timezone.utc)
    row = dict(clip_id=clip_id, verdict=verdict, reviewer=reviewer, time=when, dense=dense, short=short,
               status=status, reason=reason, source=source)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=REVIEW_SCHEMA), buf)
    store.write(f"{when.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:8]}.parquet", buf.getvalue())
    return row


def read(store: Store) -> list[dict]:
    """Every decision, oldest first (file names sort by time)."""
    rows = []
    for name in store.list("", ".parquet"):
        try:
            table = store.read_table(name)
        except Exception as err:
            raise ValueError(f"{store.uri_of(name)}: not a review decision file ({err}); remove it") from None
        missing = set(REVIEW_SCHEMA.names) - set(table.column_names)
        if missing:
            raise ValueError(f"{store.uri_of(name)}: a decision file without {sorted(missing)}; remove it")
        rows.extend(table.select(REVIEW_SCHEMA.names).to_pylist())
    rows.sort(key=lambda r: r["time"])
    return rows


def current(rows: list[dict]) -> dict[str, dict]:
    """{clip_id: {verdict, reviewer, time, dense, short, edited_by, edited_at}}: each clip's latest
    accept/reject (verdict None if only edited) and its latest caption edit (dense/short None if none)."""
    state: dict[str, dict] = {}
    for r in rows:
        s = state.setdefault(r["clip_id"], dict(verdict=None, reviewer=None, time=None, dense=None, short=None,
                                                edited_by=None, edited_at=None))
        if r["verdict"] == "edit":
            s.update(dense=r["dense"] if r["dense"] is not None else s["dense"],
                     short=r["short"] if r["short"] is not None else s["short"], edited_by=r["reviewer"],
                     edited_at=r["time"])
        else:
            s.update(verdict=r["verdict"], reviewer=r["reviewer"], time=r["time"])
    return state


def labels(store: Store) -> dict[str, bool]:
    """{clip_id: bad}: True where a person rejected the clip, False where they accepted it."""
    return {cid: s["verdict"] == "reject" for cid, s in current(read(store)).items() if s["verdict"]}


def gold_captions(store: Store) -> dict[str, dict]:
    """{clip_id: {"dense": ..., "short": ...}} of every clip whose caption a person edited (a part
    left unedited is None) and did not reject."""
    return {cid: {"dense": s["dense"], "short": s["short"]} for cid, s in current(read(store)).items()
            if (s["dense"] or s["short"]) and s["verdict"] != "reject"}
