"""Label Studio round trip for teams that review there (`spacetime review OUT export|import`).

    spacetime review OUT export --to tasks.json [--media-url http://127.0.0.1:8765] [--status kept]
        -> tasks.json (Label Studio tasks: the clip's video URL, its captions as pre-annotations)
           tasks.xml  (the labeling config to paste into the project: video, accept/reject, captions)
    spacetime review OUT import export.json      # Label Studio's JSON export of that project
        -> each annotation's accept/reject and edited captions appended to OUT/review/ (spacetime.review),
           once: importing the same file again adds nothing.

Videos: the tasks point at `--media-url`/media/<clip_id>.mp4, which `spacetime review OUT` serves;
Label Studio must be able to reach that address (or rewrite the URLs to your own media server).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

LABEL_CONFIG = """<View>
  <Header value="$clip_id ($status) $reason"/>
  <Video name="video" value="$video"/>
  <Choices name="verdict" toName="video" choice="single-radio" showInline="true">
    <Choice value="accept"/>
    <Choice value="reject"/>
  </Choices>
  <Header value="dense caption"/>
  <TextArea name="dense" toName="video" editable="true" maxSubmissions="1" rows="5"/>
  <Header value="short caption"/>
  <TextArea name="short" toName="video" editable="true" maxSubmissions="1" rows="1"/>
</View>
"""
MODEL_VERSION = "spacetime-curate"


def _textarea(name: str, text: str) -> dict:
    return {"from_name": name, "to_name": "video", "type": "textarea", "value": {"text": [text]}}


def export_tasks(state, media_url: str, clips: list[dict]) -> list[dict]:
    """Label Studio tasks of `clips` (curation.review.Review entries); the captions (as people last
    edited them, else the pipeline's) are the pre-annotations a reviewer corrects."""
    tasks = []
    for n, entry in enumerate(clips, 1):
        clip = state.view(entry)
        decision = clip["decision"] or {}
        dense = decision.get("dense") or clip.get("caption") or ""
        short = decision.get("short") or (clip.get("caption_fields") or {}).get("short") or ""
        media = clip["media"]
        data = {"clip_id": clip["clip_id"], "status": clip["status"], "reason": clip.get("reason") or "",
                "flags": ", ".join(clip["flags"]), "source_uri": clip["source_uri"], "dense": dense, "short": short,
                "video": media_url.rstrip("/") + media["video"] if media["video"] else "",
                "image": media_url.rstrip("/") + (media["preview"] or media["thumb"]) if (media["preview"] or media["thumb"]) else ""}
        tasks.append({"id": n, "data": data,
                      "predictions": [{"model_version": MODEL_VERSION,
                                       "result": [_textarea("dense", dense), _textarea("short", short)]}]})
    return tasks


def export(state, to: Path, media_url: str, clips: list[dict]) -> dict:
    """Write the tasks JSON and the labeling config beside it (`to` with suffix .xml)."""
    tasks = export_tasks(state, media_url, clips)
    to = Path(to)
    to.write_text(json.dumps(tasks, indent=1, ensure_ascii=False))
    to.with_suffix(".xml").write_text(LABEL_CONFIG)
    return {"tasks": len(tasks), "file": str(to), "label_config": str(to.with_suffix(".xml"))}


def _when(annotation: dict) -> datetime:
    text = annotation.get("updated_at") or annotation.get("created_at")
    if not text:
        return datetime.now(timezone.utc)
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _who(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return f"label-studio:{who}"


def decisions_of(task: dict, where: str) -> list[dict]:
    """The decisions in one exported task's annotations (cancelled ones skipped): accept/reject from
    the `verdict` choice, an edit where a caption differs from the one the task showed."""
    data = task.get("data") or {}
    clip_id = data.get("clip_id")
    if not clip_id:
        raise ValueError(f"{where}: task {task.get('id')} has no data.clip_id (not a spacetime export)")
    out = []
    for annotation in task.get("annotations") or []:
        if annotation.get("was_cancelled"):
            continue
        base = dict(clip_id=clip_id, reviewer=_who(annotation), time=_when(annotation))
        texts = {}
        for item in annotation.get("result") or []:
            value = item.get("value") or {}
            if item.get("from_name") == "verdict" and value.get("choices"):
                verdict = value["choices"][0]
                if verdict not in ("accept", "reject"):
                    raise ValueError(f"{where}: task {task.get('id')}: verdict {verdict!r} is not accept or reject")
                out.append(dict(base, verdict=verdict, dense=None, short=None))
            elif item.get("from_name") in ("dense", "short") and value.get("text"):
                texts[item["from_name"]] = "\n".join(value["text"]).strip()
        edited = {k: v for k, v in texts.items() if v and v != (data.get(k) or "").strip()}
        if edited:
            out.append(dict(base, verdict="edit", dense=edited.get("dense"), short=edited.get("short")))
    return out


def import_annotations(state, path: Path) -> dict:
    """Append the decisions of a Label Studio JSON export to the output's review folder; those already
    there (same clip, reviewer, time, verdict and captions) are not added again."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a Label Studio JSON export ({err})") from None
    if not isinstance(tasks, list):
        raise ValueError(f"{path}: expected a JSON list of tasks (Label Studio's JSON export)")
    found = [d for task in tasks for d in decisions_of(task, str(path))]
    unknown = sorted({d["clip_id"] for d in found} - set(state.by_id))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} clips are not in {state.store.uri} (first: {unknown[0]}); "
                         "was it exported from another output?")
    key = lambda r: (r["clip_id"], r["reviewer"], r["time"], r["verdict"], r["dense"], r["short"])  # noqa: E731
    seen = {key(r) for r in state.rows}
    added = 0
    for d in found:
        if key(d) in seen:
            continue
        state.record(d["clip_id"], d["verdict"], d["reviewer"], d["dense"], d["short"], source="label-studio",
                     time=d["time"])
        seen.add(key(d))
        added += 1
    return {"tasks": len(tasks), "decisions": len(found), "added": added, "already_there": len(found) - added}
