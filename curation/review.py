"""`spacetime review OUT`: a local page for people to go through a curation output's clips.

    spacetime review OUT [--port 8765] [--reviewer NAME]     # then open http://127.0.0.1:8765

A FastAPI app served by uvicorn on 127.0.0.1 (both come with vLLM). It reads the output's clips
manifest (kept, rejected and failed clips, with captions, grounding checks and scores), the report's
thumbnails and previews, and the kept clips themselves from their shards, local or s3://. A person
filters clips (status, flagged check, rejection reason, bucket), watches each, accepts or rejects
it with a key, and edits its dense or short caption in place. Every decision is appended to
OUT/review/ at once, one Parquet file each (spacetime.review), so nothing is lost on a reload or a
crash, and several people can review one output. The decisions feed:
- `spacetime calibrate FILTER --labels OUT/review`: accept/reject as labels of the filter's threshold;
- `spacetime caption finetune --data OUT/review`: the edited captions as gold (clip, caption) pairs.

The page's JSON API (what the page itself calls; also for scripts):
    GET  /api/clips?status=&flag=&reason=&bucket=&decided=&offset=&limit=   {total, clips, facets}: entries
    GET  /api/clips/{clip_id}                                          the whole row, media URLs, decision
    POST /api/decisions {clip_id, verdict: accept|reject|edit, dense?, short?}
    GET  /media/{clip_id}.mp4   /thumbs/{clip_id}.jpg   /previews/{clip_id}.webp
"""

from __future__ import annotations

import getpass
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Literal


from spacetime import contract, review
from spacetime.config import S3Config, StrictModel
from spacetime.errors import MissingInput
from spacetime.store import Store

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("review_page.html")
STATUSES = ("kept", "rejected", "failed")


class Decision(StrictModel):
    """The body of POST /api/decisions (unknown keys refused)."""

    clip_id: str
    verdict: Literal["accept", "reject", "edit"]
    dense: str | None = None
    short: str | None = None


def reason_key(reason: str | None) -> str:
    """The filter or stage a reason names (`motion: static: ...` -> `motion`)."""
    return (reason or "").split(":", 1)[0].strip()


def _clip_view(row: dict) -> dict:
    """A manifest row as the page shows it: measured scores only, the fields a check contradicts."""
    view = {k: row.get(k) for k in ("clip_id", "source_uri", "status", "reason", "duplicate_of", "bucket", "width",
                                    "height", "num_frames", "fps", "start_time", "end_time", "ocr_text", "caption",
                                    "caption_fields", "grounding", "shard", "extract_mode")}
    view["scores"] = contract.scores_of(row.get("scores"))
    view["grounding"] = row.get("grounding") or []
    view["flags"] = sorted({g["field"] for g in view["grounding"] if g["verdict"] == "contradicts"})
    view["reason_key"] = reason_key(row.get("reason"))
    return view


class Review:
    """The clips of one output and its decisions (the app's state; thread-safe). The manifest stays an
    Arrow table; each clip has a small entry (id, status, reason, bucket, flags) for listing and
    filtering, and its full row is made only when a clip is opened."""

    def __init__(self, out: str, reviewer: str, s3: S3Config | None = None):
        self.store = Store(out, s3)
        if not self.store.exists(contract.CLIPS_MANIFEST):
            raise MissingInput(f"{self.store.uri_of(contract.CLIPS_MANIFEST)}: no clips manifest; "
                               "is this a `spacetime curate` output?")
        self.decisions = review.review_store(self.store.uri_of(contract.REVIEW_DIR), s3)
        self.reviewer = reviewer
        self.table = self.store.read_table(contract.CLIPS_MANIFEST)
        cols = {name: self.table.column(name).to_pylist()
                for name in ("clip_id", "status", "reason", "bucket", "shard", "grounding")}
        self.clips = [{"clip_id": cid, "status": status, "reason": reason, "reason_key": reason_key(reason),
                       "bucket": bucket, "shard": shard, "row": i,
                       "flags": sorted({g["field"] for g in checks or [] if g["verdict"] == "contradicts"})}
                      for i, (cid, status, reason, bucket, shard, checks) in enumerate(zip(*cols.values()))]
        self.by_id = {c["clip_id"]: c for c in self.clips}
        self.report = set(self.store.list(f"{contract.REPORT_DIR}/thumbs", ".jpg")) | {
            f"p/{n}" for n in self.store.list(f"{contract.REPORT_DIR}/previews", ".webp")}
        self.reader = contract.ShardReader(s3)
        self.lock = threading.Lock()
        self.rows = review.read(self.decisions)
        self.state = review.current(self.rows)

    def media(self, clip: dict) -> dict:
        cid = clip["clip_id"]
        return {"video": f"/media/{cid}.mp4" if clip["status"] == "kept" and clip.get("shard") else None,
                "preview": f"/previews/{cid}.webp" if f"p/{cid}.webp" in self.report else None,
                "thumb": f"/thumbs/{cid}.jpg" if f"{cid}.jpg" in self.report else None}

    def decision(self, clip_id: str) -> dict | None:
        state = self.state.get(clip_id)
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in state.items()} if state else None

    def entry(self, clip: dict) -> dict:
        """A clip as the list shows it: its entry and the decision on it."""
        return {**{k: v for k, v in clip.items() if k != "row"}, "decision": self.decision(clip["clip_id"])}

    def view(self, clip: dict) -> dict:
        """A clip opened: the whole manifest row, media URLs and the decision on it."""
        row = _clip_view(self.table.slice(clip["row"], 1).to_pylist()[0])
        return {**row, "media": self.media(clip), "decision": self.decision(clip["clip_id"])}

    def select(self, status: str = "", flag: str = "", reason: str = "", bucket: str = "",
               decided: str = "") -> list[dict]:
        """Clips matching every filter given: status (kept | rejected | failed | flagged), a contradicted
        field (`any` for any), a reason key, a bucket, decided (accept | reject | edit | none)."""
        out = []
        for c in self.clips:
            if status == "flagged" and not c["flags"] or status not in ("", "flagged") and c["status"] != status:
                continue
            if flag and (not c["flags"] if flag == "any" else flag not in c["flags"]):
                continue
            if reason and c["reason_key"] != reason or bucket and c["bucket"] != bucket:
                continue
            if decided:
                s = self.state.get(c["clip_id"]) or {}
                mine = "edit" if decided == "edit" and (s.get("dense") or s.get("short")) else s.get("verdict")
                if (mine or "none") != decided:
                    continue
            out.append(c)
        return out

    def facets(self) -> dict:
        return {"status": dict(Counter(c["status"] for c in self.clips)),
                "flag": dict(Counter(f for c in self.clips for f in c["flags"])),
                "reason": dict(Counter(c["reason_key"] for c in self.clips if c["reason_key"])),
                "bucket": dict(Counter(c["bucket"] for c in self.clips if c["bucket"]))}

    def record(self, clip_id: str, verdict: str, reviewer: str, dense: str | None = None, short: str | None = None,
               source: str = "page", time=None) -> dict:
        """Append one decision (spacetime.review) and update the clips' state; returns the row."""
        clip = self.by_id.get(clip_id)
        if clip is None:
            raise KeyError(clip_id)
        with self.lock:
            row = review.append(self.decisions, clip_id, verdict, reviewer, dense=dense, short=short,
                                status=clip["status"], reason=clip["reason"], source=source, time=time)
            self.rows.append(row)
            self.state = review.current(self.rows)
        return row

    def decide(self, clip_id: str, verdict: str, dense: str | None = None, short: str | None = None) -> dict:
        """A decision of this page's reviewer; returns the clip's view."""
        self.record(clip_id, verdict, self.reviewer, dense, short)
        return self.view(self.by_id[clip_id])

    def video(self, clip_id: str) -> bytes:
        clip = self.by_id[clip_id]
        if clip["status"] != "kept" or not clip.get("shard"):
            raise KeyError(clip_id)
        with self.lock:  # one reader: its open files seek
            return self.reader.read(self.store.uri_of(clip["shard"]), clip_id)[contract.VIDEO_EXT]


def build_app(out: str, reviewer: str | None = None, s3: S3Config | None = None):
    """The FastAPI app of output `out` (a folder or s3://bucket/prefix)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, Response
    state = Review(out, reviewer or getpass.getuser(), s3)
    app = FastAPI(title="spacetime review", docs_url="/api/docs", redoc_url=None)
    app.state.review = state

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text().replace("{{OUT}}", state.store.uri).replace("{{REVIEWER}}", state.reviewer)

    @app.get("/api/clips")
    def clips(status: str = "", flag: str = "", reason: str = "", bucket: str = "", decided: str = "",
              offset: int = 0, limit: int = 500) -> dict:
        """A page of the matching clips' entries (GET /api/clips/{clip_id} opens one)."""
        chosen = state.select(status, flag, reason, bucket, decided)
        return {"total": len(chosen), "offset": offset, "clips": [state.entry(c) for c in chosen[offset:offset + limit]],
                "facets": state.facets(), "reviewer": state.reviewer, "out": state.store.uri}

    @app.get("/api/clips/{clip_id}")
    def one(clip_id: str) -> dict:
        if clip_id not in state.by_id:
            raise HTTPException(404, f"no clip {clip_id} in {state.store.uri}")
        return state.view(state.by_id[clip_id])

    @app.post("/api/decisions")
    def decide(d: Decision) -> dict:
        try:
            return state.decide(d.clip_id, d.verdict, d.dense, d.short)
        except KeyError:
            raise HTTPException(404, f"no clip {d.clip_id} in {state.store.uri}") from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    def _file(rel: str, media_type: str) -> Response:
        try:
            return Response(state.store.read_bytes(rel), media_type=media_type)
        except FileNotFoundError:
            raise HTTPException(404, f"{rel}: not in {state.store.uri}") from None

    @app.get("/thumbs/{clip_id}.jpg")
    def thumb(clip_id: str) -> Response:
        return _file(f"{contract.REPORT_DIR}/thumbs/{Path(clip_id).name}.jpg", "image/jpeg")

    @app.get("/previews/{clip_id}.webp")
    def preview(clip_id: str) -> Response:
        return _file(f"{contract.REPORT_DIR}/previews/{Path(clip_id).name}.webp", "image/webp")

    @app.get("/media/{clip_id}.mp4")
    def video(clip_id: str) -> Response:
        try:
            return Response(state.video(clip_id), media_type="video/mp4")
        except KeyError:
            raise HTTPException(404, f"clip {clip_id}: no video (only kept clips are in the shards)") from None

    return app


def serve(out: str, port: int = 8765, reviewer: str | None = None, s3: S3Config | None = None,
          host: str = "127.0.0.1") -> None:
    """Serve the review page until interrupted."""
    import uvicorn

    app = build_app(out, reviewer, s3)
    state: Review = app.state.review
    print(f"reviewing {len(state.clips)} clips of {state.store.uri} as {state.reviewer!r}; decisions go to "
          f"{state.decisions.uri}\n  open http://{host}:{port}  (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
