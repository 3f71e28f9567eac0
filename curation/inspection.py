"""`spacetime inspect OUT`: a terminal summary of a curation output, and a few clips with their captions.

    spacetime inspect out                      # sources, clips by status and reason, hours, buckets, captions
    spacetime inspect s3://bucket/out --samples 5 --seed 1

Reads only the published version's metadata (latest.json -> its index, manifests and summary, or
the stable paths of an output written before versions): no tar is opened, so it is as fast on S3
as on disk. `--samples N` draws N kept clips (seeded) and prints their captions and typed scores.
"""

from __future__ import annotations

import random
import re
import statistics
from collections import Counter

import pyarrow.parquet as pq

from spacetime import contract
from spacetime.errors import MissingInput
from spacetime.store import Store


def _table(store: Store, rel: str) -> list[dict]:
    path = contract.published_file(store, rel)
    if not store.exists(path):
        raise MissingInput(f"{store.uri_of(path)}: missing; is {store.uri} the --output of `spacetime curate`?")
    return pq.read_table(store.path(path), filesystem=store.fs).to_pylist()


def _words(text: str | None) -> int:
    return len(re.findall(r"\w+", text or ""))


def summarize(out: str) -> dict:
    """The figures `inspect` prints, as a dict (tests read it)."""
    store = Store(out)
    sources, clips = _table(store, contract.SOURCES_MANIFEST), _table(store, contract.CLIPS_MANIFEST)
    index = _table(store, contract.INDEX_PATH)
    kept = [c for c in clips if c["status"] == "kept"]
    captions = [c["caption"] for c in kept if c["caption"]]
    words = [_words(c) for c in captions]
    version = None
    if store.exists(contract.LATEST_PATH):
        import json

        version = json.loads(store.read_bytes(contract.LATEST_PATH))["version"]
    return {
        "output": store.uri, "version": version,
        "sources": dict(Counter(s["status"] for s in sources)), "sources_total": len(sources),
        "source_hours": sum(s["duration"] or 0 for s in sources if s["status"] == "ok") / 3600,
        "clips": dict(Counter(c["status"] for c in clips)), "clips_total": len(clips),
        "reasons": dict(Counter((c["reason"] or "").split(":")[0] for c in clips if c["status"] != "kept")),
        "kept_hours": sum(r["duration"] or 0 for r in index) / 3600,
        "buckets": dict(sorted(Counter(r["bucket"] for r in index).items())),
        "captioned": len(captions),
        "caption_words": {"mean": statistics.fmean(words), "median": statistics.median(words),
                          "min": min(words), "max": max(words)} if words else None,
        "kept": kept,
    }


def sample_clips(kept: list[dict], n: int, seed: int) -> list[dict]:
    """n kept clips drawn with `seed` (in clip-id order first, so the draw does not depend on row order)."""
    ordered = sorted(kept, key=lambda c: c["clip_id"])
    return random.Random(seed).sample(ordered, min(n, len(ordered)))


def render(summary: dict, samples: list[dict]) -> str:
    s = summary
    lines = [f"{s['output']}" + (f"  (version {s['version']})" if s["version"] else "")]
    lines.append(f"sources  {s['sources_total']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["sources"].items()))
                 + f"; {s['source_hours'] * 60:.1f} min of video")
    lines.append(f"clips    {s['clips_total']}: " + ", ".join(f"{k} {v}" for k, v in sorted(s["clips"].items()))
                 + f"; kept {s['kept_hours'] * 60:.1f} min")
    if s["reasons"]:
        lines.append("  not kept: " + ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda x: -x[1])))
    lines.append("buckets  " + ", ".join(f"{k} {v}" for k, v in s["buckets"].items()))
    if s["caption_words"]:
        w = s["caption_words"]
        lines.append(f"captions {s['captioned']} of {s['clips'].get('kept', 0)} kept clips; words per dense caption: "
                     f"mean {w['mean']:.0f}, median {w['median']:.0f}, {w['min']}-{w['max']}")
    else:
        lines.append("captions none (curated with caption: null, or no clip kept)")
    for c in samples:
        scores = contract.scores_of(c["scores"])
        lines += ["", f"clip {c['clip_id']}  {c['bucket']}  {(c['end_time'] or 0) - (c['start_time'] or 0):.2f} s  "
                      f"{c['width']}x{c['height']}  from {c['source_uri']}",
                  "  scores: " + ", ".join(f"{k} {v:.3g}" for k, v in scores.items()),
                  f"  caption: {c['caption'] or '(none)'}"]
        short = (c.get("caption_fields") or {}).get("short")
        if short:
            lines.append(f"  short: {short}")
    return "\n".join(lines)


def inspect(out: str, samples: int = 0, seed: int = 0) -> str:
    summary = summarize(out)
    return render(summary, sample_clips(summary["kept"], samples, seed) if samples else [])
