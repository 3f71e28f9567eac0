"""The curation report: OUT/report/index.html, static files only (no server).

What was kept and why: the funnel (inputs -> clips -> kept, per stage, with hours), score histograms
with the thresholds drawn, distributions of duration, aspect ratio and resolution, clips and hours
per bucket, the captions (length distribution, most common words and phrases, a sample beside their
frames), contact sheets of kept clips (each card shows its caption; opening it shows a looping
preview of the clip's sampled frames, the whole caption and every score) and of rejected clips grouped by reason (a card says why it has no
thumbnail where none can exist), the error table, and the time of every stage. Written at the end
of every `spacetime curate`; `spacetime report OUT` rebuilds it.

The manifests are read a batch of rows at a time into bounded state (`_Digest`): counts and hours are
exact; the histograms and the caption word counts use a uniform sample of at most `SAMPLE` values
(said on the page where it applies); the sheets show the first clips of each kind and the error table
the first `ERROR_ROWS` errors, with the totals. So the driver's memory does not grow with the dataset.
"""

from __future__ import annotations

import html
import json
import random
import re
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from curation import charts
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
    "picture_area": ("borders", ["min_area"]),
    "text_area": ("text", ["max_area"]),
}
SAMPLE = 20000  # values per histogram series (and captions for the word counts): a uniform sample beyond
ERROR_ROWS = 200  # errors listed on the page; the manifests hold every one
BATCH_ROWS = 4096  # manifest rows read at a time
FUNNEL_ORDER = ["too_short", "borders", "text", "exposure", "sharpness", "motion", "aesthetic", "caption",
                "extract failed", "duplicate"]


def _reason_key(clip: dict) -> str:
    return (clip.get("reason") or "").split(":")[0] or clip["status"]


def _write_plot(report: Path, name: str, svg: str) -> str:
    """Write one chart under report/plots; returns its path relative to the page."""
    atomic_write(report / "plots" / name, svg)
    return f"plots/{name}"


class _Sample:
    """At most `cap` of the values added, a uniform sample of them all (reservoir sampling, seeded: the
    same manifest gives the same page); `seen` counts every value."""

    def __init__(self, cap: int = SAMPLE):
        self.cap, self.seen, self.values = cap, 0, []
        self._rng = random.Random(0)

    def add(self, value) -> None:
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.cap:
                self.values[j] = value

    @property
    def sampled(self) -> bool:
        return self.seen > len(self.values)


def _hist(samples: dict[str, _Sample], title: str, lines: list[float] = ()) -> str:
    """A histogram of each series (legend: its label and how many values it had); its title says where
    the series are a sample."""
    cap = max((s.cap for s in samples.values() if s.sampled), default=None)
    return charts.histogram({label: (s.values, s.seen) for label, s in samples.items()},
                            f"{title} (a sample of {cap} per series)" if cap else title, list(lines))


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
    for check in c.get("grounding") or []:
        if check["verdict"] == "contradicts":
            notes.append(f"{check['field']} {check['claim']!r} vs measured {check['measured']}"[:160])
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


def _sheet(clips: list[dict], total: int, thumbs: set[str], previews: set[str] = frozenset()) -> str:
    """Cards of `clips`, the first of `total` such clips."""
    cells = [_card(c, thumbs, previews) for c in clips]
    more = f"<p>… and {total - len(clips)} more</p>" if total > len(clips) else ""
    return f'<div class="sheet">{"".join(cells) or "<p>none</p>"}</div>{more}'


_STOP = set("a an the of and or in on at to with from by for is are was were be its it this that as into "
            "while over under near".split())


def _captions(d: _Digest, thumbs: set[str], report: Path) -> tuple[str, list[str]]:
    """The caption section (HTML) and its plot: words per caption, the most common words and phrases
    (over a uniform sample of at most SAMPLE captions), the clips whose caption failed QA with the
    reasons, and the first captions beside their frames."""
    failed = d.dropped.get("caption", 0)
    qa = (f"<h3>Caption QA failures ({failed})</h3>"
          + (_table(["clip", "source", "reason"], [[c["clip_id"], f"{Path(c['source_uri']).name} "
                                                  f"[{c['start_frame']}:{c['end_frame']})", c["reason"]]
                                                 for c in d.failed_qa]) if failed else "<p>none</p>"))
    if not d.captioned:
        return "<p>no captions (curated with caption: null, or no clip kept)</p>" + (qa if failed else ""), []
    plot = _write_plot(report, "caption_words.svg", _hist({"kept": d.caption_words}, "words per caption"))
    words = [_words(text) for text in d.captions.values]
    common = Counter(w for ws in words for w in ws if w not in _STOP and len(w) > 2).most_common(20)
    phrases = Counter(" ".join(ws[i:i + 3]) for ws in words for i in range(len(ws) - 2)).most_common(10)
    rows = []
    for c in d.caption_rows:
        thumb = f"{c['clip_id']}.jpg"
        picture = f'<img src="thumbs/{thumb}" width="160" alt="frame">' if thumb in thumbs else ""
        rows.append(f"<tr><td>{picture}</td><td>{html.escape(c['caption'])}</td></tr>")
    lengths = sorted(d.caption_words.values)
    over = f" (counted over a uniform sample of {len(words)} captions)" if d.captions.sampled else ""
    body = (f"<p>{d.captioned} of {d.kept} kept clips captioned; words per caption: median "
            f"{lengths[len(lengths) // 2]}.</p>"
            f'<div class="plots"><img src="{plot}" alt="{plot}"></div>'
            f"<p>Most common words{over}: {html.escape(', '.join(f'{w} ({n})' for w, n in common))}</p>"
            f"<p>Most common phrases{over}: {html.escape(', '.join(f'{w} ({n})' for w, n in phrases))}</p>"
            f"{qa}<h3>A sample</h3>"
            f'<table class="captions">{"".join(rows)}</table>')
    return body, [plot]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


class _Digest:
    """What the page shows of the manifests, gathered a row at a time into state that does not grow
    with them: exact counts and hours (funnel, buckets, errors), samples for the histograms, the first
    clips of each contact sheet, the first errors."""

    def __init__(self, sheet_limit: int):
        self.limit = sheet_limit
        self.sources = self.readable = 0
        self.source_hours = 0.0
        self.total = self.kept = 0
        self.hours = self.kept_hours = 0.0
        self.dropped: Counter = Counter()  # clips not kept, by reason key
        self.dropped_hours: Counter = Counter()
        self.buckets: Counter = Counter()
        self.bucket_hours: Counter = Counter()
        self.scores: dict[str, dict[str, _Sample]] = defaultdict(lambda: {"kept": _Sample(), "not kept": _Sample()})
        self.shape = {"duration": _Sample(), "aspect": _Sample(), "short side": _Sample()}  # of kept clips
        self.kept_sheet: list[dict] = []
        self.sheets: dict[str, list[dict]] = defaultdict(list)  # reason key -> its first clips
        self.errors: list[list[str]] = []
        self.error_count = 0
        self.captioned = 0
        self.captions, self.caption_words = _Sample(), _Sample()
        self.caption_rows: list[dict] = []
        self.failed_qa: list[dict] = []
        self.grounding: dict[str, Counter] = defaultdict(Counter)  # field -> verdict counts (curation.grounding)
        self.contradictions: dict[str, list[dict]] = defaultdict(list)  # field -> its first contradicted clips

    def _error(self, where: str, what: str) -> None:
        self.error_count += 1
        if len(self.errors) < ERROR_ROWS:
            self.errors.append([where, what])

    def add_source(self, s: dict) -> None:
        self.sources += 1
        if s["status"] == "ok":
            self.readable += 1
            self.source_hours += (s["duration"] or 0) / 3600
        elif s["status"] == "failed":
            self._error(s["uri"], s["error"])

    def add_clip(self, c: dict) -> None:
        c["scores"] = contract.scores_of(c["scores"])
        for check in c.get("grounding") or []:
            self.grounding[check["field"]][check["verdict"]] += 1
            if check["verdict"] == "contradicts" and len(self.contradictions[check["field"]]) < 4:
                self.contradictions[check["field"]].append(c)
        c["duration"] = (c["end_time"] or 0) - (c["start_time"] or 0)
        hours = c["duration"] / 3600
        self.total += 1
        self.hours += hours
        kept = c["status"] == "kept"
        for key, value in c["scores"].items():
            self.scores[key]["kept" if kept else "not kept"].add(value)
        if kept:
            self.kept += 1
            self.kept_hours += hours
            self.buckets[c["bucket"]] += 1
            self.bucket_hours[c["bucket"]] += hours
            self.shape["duration"].add(c["duration"])
            if c["height"]:
                self.shape["aspect"].add(c["width"] / c["height"])
            self.shape["short side"].add(min(c["width"], c["height"]))
            if len(self.kept_sheet) < self.limit:
                self.kept_sheet.append(c)
            if c.get("caption"):
                self.captioned += 1
                self.captions.add(c["caption"])
                self.caption_words.add(len(_words(c["caption"])))
                if len(self.caption_rows) < 8:
                    self.caption_rows.append(c)
            return
        reason = _reason_key(c)
        self.dropped[reason] += 1
        self.dropped_hours[reason] += hours
        if reason != "failed" and len(self.sheets[reason]) < self.limit // 2:
            self.sheets[reason].append(c)
        if reason == "caption" and len(self.failed_qa) < 50:
            self.failed_qa.append(c)
        if c["status"] == "failed":
            self._error(f"{c['source_uri']} [{c['start_frame']}:{c['end_frame']})", c["reason"])

    def funnel(self) -> list[list]:
        """inputs -> clips -> after each stage that rejects -> kept, with hours."""
        rows = [["inputs", self.sources, f"{self.source_hours:.4f}"], ["readable sources", self.readable, ""],
                ["candidate clips", self.total, f"{self.hours:.4f}"]]
        left, hours = self.total, self.hours
        for stage in FUNNEL_ORDER + sorted(set(self.dropped) - set(FUNNEL_ORDER)):
            if self.dropped.get(stage):
                left -= self.dropped[stage]
                hours = max(0.0, hours - self.dropped_hours[stage])
                rows.append([f"after {stage} (-{self.dropped[stage]})", left, f"{hours:.4f}"])
        rows.append(["kept", self.kept, f"{self.kept_hours:.4f}"])
        return rows

    def shown(self) -> list[dict]:
        """Every clip the page shows a card or a frame of."""
        return (self.kept_sheet + [c for cs in self.sheets.values() for c in cs] + self.caption_rows
                + [c for cs in self.contradictions.values() for c in cs])

    def grounding_section(self, thumbs: set[str]) -> str:
        """Per checked field: the verdicts and the contradiction rate (of the clips the measurements
        could decide), then the first contradicted clips, each card with its frame and the check."""
        if not self.grounding:
            return "<p>no caption was checked (captions off, or grounding.enabled false)</p>"
        rows = []
        for field in sorted(self.grounding):
            n = self.grounding[field]
            decided = n["agrees"] + n["contradicts"]
            rows.append([field, sum(n.values()), n["agrees"], n["contradicts"], n["unknown"],
                         f"{n['contradicts'] / decided:.1%}" if decided else "-"])
        examples = "".join(f"<h3>{html.escape(field)}: contradicted</h3>{_sheet(clips, self.grounding[field]['contradicts'], thumbs)}"
                           for field, clips in sorted(self.contradictions.items()))
        return (_table(["field", "checked", "agrees", "contradicts", "unknown", "contradiction rate"], rows)
                + examples)


def _stage_plot(stage_seconds: dict[str, float], report: Path) -> str:
    return _write_plot(report, "stages.svg", charts.bars(stage_seconds, "time per stage (s, summed over workers)"))


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


def _rows(store: Store, rel: str, columns: list[str] | None = None):
    """The rows of a published Parquet file as dicts, BATCH_ROWS at a time."""
    with pq.ParquetFile(store.path(rel), filesystem=store.fs) as f:
        for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()


def _existing(store: Store, rels: list[str]) -> set[str]:
    """Which of `rels` exist: a lookup per file the page shows (bounded), not a listing of all of them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16 if store.is_s3 else 1) as pool:  # S3: one request each
        return {rel for rel, found in zip(rels, pool.map(store.exists, rels)) if found}


def _build(store: Store, report: Path, sheet_limit: int) -> str:
    d = _Digest(sheet_limit)
    for row in _rows(store, contract.SOURCES_MANIFEST, ["uri", "status", "error", "duration"]):
        d.add_source(row)
    for row in _rows(store, contract.CLIPS_MANIFEST):
        d.add_clip(row)
    summary = json.loads(store.read_bytes(contract.SUMMARY_PATH))
    config = yaml.safe_load(store.read_bytes("config.yaml")) if store.exists("config.yaml") else {}
    shown = {c["clip_id"] for c in d.shown()}
    thumbs = {Path(rel).name for rel in _existing(store, [f"{contract.REPORT_DIR}/thumbs/{i}.jpg" for i in sorted(shown)])}
    previews = {Path(rel).name for rel in _existing(
        store, [f"{contract.REPORT_DIR}/previews/{c['clip_id']}.webp" for c in d.kept_sheet])}

    plots = []
    filters_cfg = config.get("filters", {})
    for key in sorted(d.scores):
        section, names = THRESHOLDS.get(key, (None, []))
        lines = [filters_cfg.get(section, {}).get(n) for n in names] if section else []
        plots.append(_write_plot(report, f"score_{key}.svg",
                                 _hist(d.scores[key], key, [x for x in lines if x is not None])))
    plots.append(_write_plot(report, "duration.svg", _hist({"kept": d.shape["duration"]}, "duration (s)")))
    plots.append(_write_plot(report, "aspect.svg", _hist({"kept": d.shape["aspect"]}, "aspect ratio (w/h)")))
    plots.append(_write_plot(report, "resolution.svg", _hist({"kept": d.shape["short side"]}, "short side (px)")))

    bucket_rows = [[b, n, f"{d.bucket_hours[b]:.4f}"] for b, n in sorted(d.buckets.items())]
    rejected_sheets = "".join(
        f"<h3>{html.escape(reason)} ({d.dropped[reason]})</h3>{_sheet(d.sheets[reason], d.dropped[reason], thumbs)}"
        for reason in sorted(d.dropped) if reason != "failed")
    caption_section, _ = _captions(d, thumbs, report)
    stage_seconds = dict(sorted(summary.get("stage_seconds", {}).items(), key=lambda kv: -kv[1]))
    stage_plot = _stage_plot(stage_seconds, report) if stage_seconds else None
    errors = _table(["input", "error"], d.errors) if d.errors else "<p>none</p>"
    if d.error_count > len(d.errors):
        errors += (f"<p>… and {d.error_count - len(d.errors)} more: every one is in the manifests "
                   f"({contract.SOURCES_MANIFEST}, {contract.CLIPS_MANIFEST}: status failed)</p>")

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
<h2>Funnel</h2>{_table(["stage", "clips", "hours"], d.funnel())}
<h2>Scores and distributions</h2><div class="plots">{"".join(f'<img src="{p}" alt="{p}">' for p in plots)}</div>
<h2>Buckets</h2>{_table(["bucket", "clips", "hours"], bucket_rows)}
<h2>Captions</h2>{caption_section}
<h2>Caption grounding</h2><p>Each checkable caption field against what the pipeline measured
(curation.grounding): camera motion against the optical flow, on-screen text against the OCR, lighting
against the mean luma, the shots a dense caption describes against the shot detector (one per clip).</p>{d.grounding_section(thumbs)}
<h2>Kept clips ({d.kept})</h2>{_sheet(d.kept_sheet, d.kept, thumbs, previews)}
<h2>Rejected clips, by reason</h2>{rejected_sheets or "<p>none</p>"}
<h2>Errors ({d.error_count})</h2>{errors}
<h2>Stage times</h2>{f'<div class="plots"><img src="{stage_plot}" alt="{stage_plot}"></div>' if stage_plot else ""}
{_table(["stage", "seconds (summed over workers)", "share", "ms per candidate clip"],
        [[k, v, f"{v / (sum(stage_seconds.values()) or 1):.0%}", f"{1000 * v / max(1, d.total):.0f}"]
         for k, v in stage_seconds.items()])}
</body></html>
"""
    atomic_write(report / "index.html", page)
    return str(report / "index.html")
