"""The curation report: OUT/report/index.html, static files only (no server).

What was kept and why: the funnel (inputs -> clips -> kept, per stage, with hours), score histograms
with the thresholds drawn, distributions of duration, aspect ratio and resolution, clips and hours
per bucket, the captions (length distribution, most common words and phrases, a sample beside their
frames), contact sheets of kept clips (each card shows its caption; opening it shows a looping
preview of the clip's sampled frames, the whole caption and every score) and of rejected clips grouped by reason (a card says why it has no
thumbnail where none can exist), the error table, and the time of every stage. Written at the end
of every `spacetime curate`; `spacetime report OUT` rebuilds it.
"""

from __future__ import annotations

import html
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from spacetime import contract
from spacetime.io import atomic_write
from spacetime.store import Store

# score key -> (config section under filters, threshold key(s), higher is better)
THRESHOLDS = {
    "aesthetic": ("aesthetic", ["min_score"]),
    "sharpness": ("sharpness", ["min_sharpness"]),
    "motion": ("motion", ["min_motion"]),
    "shake": ("motion", ["max_shake"]),
    "luma_mean": ("exposure", ["min_luma", "max_luma"]),
    "luma_clipped": ("exposure", ["max_clipped"]),
    "border_area": ("borders", ["min_area"]),
    "text_area": ("text", ["max_area"]),
}
FUNNEL_ORDER = ["too_short", "borders", "text", "exposure", "sharpness", "motion", "aesthetic", "caption",
                "extract failed", "duplicate"]


def _reason_key(clip: dict) -> str:
    return (clip.get("reason") or "").split(":")[0] or clip["status"]


def _plot(path: Path, draw, left: float = 0.13) -> str:
    from matplotlib.figure import Figure  # not pyplot: no global figure registry, no GUI backend

    fig = Figure(figsize=(4.2, 2.8), dpi=100)
    ax = fig.subplots()
    fig.subplots_adjust(left=left, right=0.97, bottom=0.12, top=0.9)  # fixed: tight_layout took 30% of the report
    draw(ax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # a bare Figure draws with Agg
    return f"plots/{path.name}"


def _hist(values_by_label: dict[str, list[float]], title: str, lines: list[float] = ()):
    def draw(ax):
        data = [v for v in values_by_label.values() if v]
        bins = 20 if data else 1
        for label, values in values_by_label.items():
            if values:
                ax.hist(values, bins=bins, histtype="stepfilled", alpha=0.6, label=f"{label} ({len(values)})")
        for x in lines:
            ax.axvline(x, color="red", linestyle="--", linewidth=1.2, label=f"threshold {x:g}")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if data or lines:
            ax.legend(fontsize=6)
    return draw


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _no_thumbnail(clip: dict) -> str:
    """Why a clip's card has no picture."""
    if _reason_key(clip) == "too_short":
        return "no thumbnail: rejected as too short before any frame was sampled"
    if clip["status"] == "failed":
        return "no thumbnail: the clip failed before its frames were sampled"
    return "no thumbnail: no frame of this clip was sampled"


def _card(c: dict, thumbs: set[str], previews: set[str] = frozenset()) -> str:
    """One contact-sheet card: thumbnail (or why there is none), source and span, the caption; its
    <details> holds the whole caption and every score."""
    thumb = f"{c['clip_id']}.jpg"
    title = f"{Path(c['source_uri']).name} [{c['start_frame']}:{c['end_frame']})"
    notes = []
    if c.get("duplicate_of"):
        notes.append(f"near-duplicate of {c['duplicate_of']}")
    if c.get("ocr_text"):
        notes.append(f"text ({c['scores'].get('text_area', 0.0):.3f} of the frame): {c['ocr_text'][:60]}")
    if c["status"] != "kept" and c.get("reason"):
        notes.append(c["reason"][:120])
    picture = (f'<img src="thumbs/{thumb}" alt="{html.escape(title)}" loading="eager">' if thumb in thumbs
               else f'<div class="nothumb">{html.escape(_no_thumbnail(c))}</div>')
    caption = c.get("caption") or ""
    line = (c.get("caption_fields") or {}).get("short") or caption  # the short caption, else the dense one cut
    short = f'<p class="caption">{html.escape(line[:140])}{"…" if len(line) > 140 else ""}</p>' if line else ""
    scores = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in sorted(c["scores"].items()))
    preview = (f'<img class="preview" src="previews/{c["clip_id"]}.webp" alt="sampled frames, looping" '
               'loading="eager">' if f'{c["clip_id"]}.webp' in previews else "")
    details = (f'<details><summary>details</summary>{preview}<p class="clipid">{c["clip_id"]} · {c["bucket"] or "-"}'
               f' · {c["duration"]:.2f} s · {c["width"]}x{c["height"]}</p>'
               + (f'<p class="dense">{html.escape(caption)}</p>' if caption else "") + _fields(c.get("caption_fields"))
               + (f"<table>{scores}</table>" if scores else "") + "</details>")
    extra = "".join(f'<br><small class="note">{html.escape(n)}</small>' for n in notes)
    return (f'<figure data-clip="{c["clip_id"]}">{picture}<figcaption>{html.escape(title)}{extra}{short}{details}'
            "</figcaption></figure>")


def _fields(fields: dict | None) -> str:
    """The structured caption fields (short caption, subjects, actions, scene, camera, ...) as lines."""
    rows = []
    for name, value in (fields or {}).items():
        text = ", ".join(value) if isinstance(value, list) else value
        if text:
            rows.append(f'<br><b>{html.escape(name.replace("_", " "))}</b>: {html.escape(str(text))}')
    return f'<p class="fields">{"".join(rows)[4:]}</p>' if rows else ""


def _sheet(clips: list[dict], thumbs: set[str], limit: int, previews: set[str] = frozenset()) -> str:
    cells = [_card(c, thumbs, previews) for c in clips[:limit]]
    more = f"<p>… and {len(clips) - limit} more</p>" if len(clips) > limit else ""
    return f'<div class="sheet">{"".join(cells) or "<p>none</p>"}</div>{more}'


_STOP = set("a an the of and or in on at to with from by for is are was were be its it this that as into "
            "while over under near".split())


def _captions(kept: list[dict], failed_qa: list[dict], thumbs: set[str], report: Path) -> tuple[str, list[str]]:
    """The caption section (HTML) and its plot: length distribution, common words and phrases, the
    clips whose caption failed QA with the reasons, and a sample of captions beside their frames."""
    import re

    captions = [c for c in kept if c.get("caption")]
    qa = (f"<h3>Caption QA failures ({len(failed_qa)})</h3>"
          + (_table(["clip", "source", "reason"], [[c["clip_id"], f"{Path(c['source_uri']).name} "
                                                  f"[{c['start_frame']}:{c['end_frame']})", c["reason"]]
                                                 for c in failed_qa[:50]]) if failed_qa else "<p>none</p>"))
    if not captions:
        return "<p>no captions (curated with caption: null, or no clip kept)</p>" + (qa if failed_qa else ""), []
    words = [re.findall(r"[a-z']+", c["caption"].lower()) for c in captions]
    plot = _plot(report / "plots" / "caption_words.png", _hist({"kept": [len(w) for w in words]}, "words per caption"))
    common = Counter(w for ws in words for w in ws if w not in _STOP and len(w) > 2).most_common(20)
    phrases = Counter(" ".join(ws[i:i + 3]) for ws in words for i in range(len(ws) - 2)).most_common(10)
    rows = []
    for c in captions[:8]:
        thumb = f"{c['clip_id']}.jpg"
        picture = f'<img src="thumbs/{thumb}" width="160" alt="frame">' if thumb in thumbs else ""
        rows.append(f"<tr><td>{picture}</td><td>{html.escape(c['caption'])}</td></tr>")
    body = (f"<p>{len(captions)} of {len(kept)} kept clips captioned; words per caption: median "
            f"{sorted(len(w) for w in words)[len(words) // 2]}.</p>"
            f'<div class="plots"><img src="{plot}" alt="{plot}"></div>'
            f"<p>Most common words: {html.escape(', '.join(f'{w} ({n})' for w, n in common))}</p>"
            f"<p>Most common phrases: {html.escape(', '.join(f'{w} ({n})' for w, n in phrases))}</p>"
            f"{qa}<h3>A sample</h3>"
            f'<table class="captions">{"".join(rows)}</table>')
    return body, [plot]


def _stage_plot(stage_seconds: dict[str, float], report: Path) -> str:
    def draw(ax):
        names = list(stage_seconds)
        ax.barh(names, [stage_seconds[n] for n in names], color="#4a7")
        ax.invert_yaxis()
        ax.set_title("time per stage (s, summed over workers)", fontsize=9)
        ax.tick_params(labelsize=7)
    return _plot(report / "plots" / "stages.png", draw, left=0.2)  # room for the stage names


def build_report(out: str | Path | Store, sheet_limit: int = 48) -> str:
    """(Re)build OUT/report/index.html from the manifests, summary and resolved config; returns its
    URI. On an s3:// output the page and plots are made in a local folder, then uploaded."""
    store = out if isinstance(out, Store) else Store(out)
    if store.local is not None:
        return _build(store, store.local / contract.REPORT_DIR, sheet_limit)
    with tempfile.TemporaryDirectory(prefix="spacetime-report-") as folder:
        _build(store, Path(folder), sheet_limit)
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            store.write(f"{contract.REPORT_DIR}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return store.uri_of(f"{contract.REPORT_DIR}/index.html")


def _build(store: Store, report: Path, sheet_limit: int) -> str:
    def table(rel: str) -> list[dict]:
        return pq.read_table(store.path(rel), filesystem=store.fs).to_pylist()

    sources, clips = table(contract.SOURCES_MANIFEST), table(contract.CLIPS_MANIFEST)
    summary = json.loads(store.read_bytes(contract.SUMMARY_PATH))
    config = yaml.safe_load(store.read_bytes("config.yaml")) if store.exists("config.yaml") else {}
    thumbs = set(store.list(f"{contract.REPORT_DIR}/thumbs", ".jpg"))
    previews = set(store.list(f"{contract.REPORT_DIR}/previews", ".webp"))
    for c in clips:
        c["scores"] = contract.scores_of(c["scores"])
        c["duration"] = (c["end_time"] or 0) - (c["start_time"] or 0)
    kept = [c for c in clips if c["status"] == "kept"]
    hours = lambda cs: sum(c["duration"] for c in cs) / 3600  # noqa: E731

    # funnel: inputs -> clips -> after each stage that rejects -> kept
    by_reason = defaultdict(list)
    for c in clips:
        if c["status"] != "kept":
            by_reason[_reason_key(c)].append(c)
    ok_sources = [s for s in sources if s["status"] == "ok"]
    funnel = [["inputs", len(sources), f"{sum(s['duration'] or 0 for s in ok_sources) / 3600:.4f}"],
              ["readable sources", len(ok_sources), ""],
              ["candidate clips", len(clips), f"{hours(clips):.4f}"]]
    remaining = list(clips)
    for stage in FUNNEL_ORDER + sorted(set(by_reason) - set(FUNNEL_ORDER)):
        if by_reason.get(stage):
            remaining = [c for c in remaining if _reason_key(c) != stage or c["status"] == "kept"]
            funnel.append([f"after {stage} (-{len(by_reason[stage])})", len(remaining), f"{hours(remaining):.4f}"])
    funnel.append(["kept", len(kept), f"{hours(kept):.4f}"])

    plots = []
    filters_cfg = config.get("filters", {})
    for key in sorted({k for c in clips for k in c["scores"]}):
        values = {"kept": [c["scores"][key] for c in kept if key in c["scores"]],
                  "not kept": [c["scores"][key] for c in clips if c["status"] != "kept" and key in c["scores"]]}
        section, names = THRESHOLDS.get(key, (None, []))
        lines = [filters_cfg.get(section, {}).get(n) for n in names] if section else []
        plots.append(_plot(report / "plots" / f"score_{key}.png", _hist(values, key, [x for x in lines if x is not None])))
    plots.append(_plot(report / "plots" / "duration.png", _hist({"kept": [c["duration"] for c in kept]}, "duration (s)")))
    plots.append(_plot(report / "plots" / "aspect.png",
                       _hist({"kept": [c["width"] / c["height"] for c in kept if c["height"]]}, "aspect ratio (w/h)")))
    plots.append(_plot(report / "plots" / "resolution.png",
                       _hist({"kept": [min(c["width"], c["height"]) for c in kept]}, "short side (px)")))

    buckets = Counter(c["bucket"] for c in kept)
    bucket_rows = [[b, n, f"{hours([c for c in kept if c['bucket'] == b]):.4f}"] for b, n in sorted(buckets.items())]
    errors = [[s["uri"], s["error"]] for s in sources if s["status"] == "failed"]
    errors += [[f"{c['source_uri']} [{c['start_frame']}:{c['end_frame']})", c["reason"]] for c in clips if c["status"] == "failed"]
    rejected_sheets = "".join(
        f"<h3>{html.escape(reason)} ({len(cs)})</h3>{_sheet(cs, thumbs, sheet_limit // 2)}"
        for reason, cs in sorted(by_reason.items()) if reason != "failed")
    caption_section, _ = _captions(kept, by_reason.get("caption", []), thumbs, report)
    stage_seconds = dict(sorted(summary.get("stage_seconds", {}).items(), key=lambda kv: -kv[1]))
    stage_plot = _stage_plot(stage_seconds, report) if stage_seconds else None

    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spacetime curation report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
.plots img {{ margin: 4px; border: 1px solid #ddd; }}
.sheet {{ display: flex; flex-wrap: wrap; gap: 6px; }}
figure {{ margin: 0; width: 192px; font-size: 10px; }} figure img {{ width: 192px; }}
.nothumb {{ width: 188px; height: 100px; border: 1px dashed #bbb; color: #666; padding: 2px; }}
.preview {{ width: 100%; }} .caption {{ margin: 2px 0; color: #333; }} .dense {{ font-size: 11px; }} details table {{ font-size: 10px; }}
table.captions td {{ vertical-align: top; font-size: 12px; max-width: 800px; }}
</style></head><body>
<h1>spacetime curation report</h1>
<p>{summary["sources"]["total"]} inputs, {summary["clips"]["total"]} candidate clips, {summary["clips"]["kept"]} kept in
{summary["shards"]} shards; {summary["hours_in"]:.4f} h in, {summary["hours_out"]:.4f} h out.</p>
<h2>Funnel</h2>{_table(["stage", "clips", "hours"], funnel)}
<h2>Scores and distributions</h2><div class="plots">{"".join(f'<img src="{p}" alt="{p}">' for p in plots)}</div>
<h2>Buckets</h2>{_table(["bucket", "clips", "hours"], bucket_rows)}
<h2>Captions</h2>{caption_section}
<h2>Kept clips ({len(kept)})</h2>{_sheet(kept, thumbs, sheet_limit, previews)}
<h2>Rejected clips, by reason</h2>{rejected_sheets or "<p>none</p>"}
<h2>Errors ({len(errors)})</h2>{_table(["input", "error"], errors) if errors else "<p>none</p>"}
<h2>Stage times</h2>{f'<div class="plots"><img src="{stage_plot}" alt="{stage_plot}"></div>' if stage_plot else ""}
{_table(["stage", "seconds (summed over workers)", "share", "ms per candidate clip"],
        [[k, v, f"{v / (sum(stage_seconds.values()) or 1):.0%}", f"{1000 * v / max(1, len(clips)):.0f}"]
         for k, v in stage_seconds.items()])}
</body></html>
"""
    atomic_write(report / "index.html", page)
    return str(report / "index.html")
