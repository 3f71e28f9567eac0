"""curation.report pieces that a curation fixture rarely exercises: caption QA failures listed with
their reasons, cards that say why a clip has no thumbnail, and the bounded digest of the manifests
(samples, first clips, first errors, exact counts). (The whole page is checked in headless Chromium
on real runs: tests/test_curate.py, tests/test_filters.py.)"""

from __future__ import annotations

from curation.report import ERROR_ROWS, _captions, _card, _Digest, _Sample, _sheet


def clip(clip_id: str, status: str, reason: str | None, caption: str | None = None) -> dict:
    return {"clip_id": clip_id, "source_uri": "/data/a.mp4", "start_frame": 0, "end_frame": 48, "status": status,
            "reason": reason, "caption": caption, "scores": {"aesthetic": 5.5}, "bucket": "16x9_360p_32f",
            "start_time": 0.0, "end_time": 2.0, "duration": 2.0, "width": 640, "height": 360}


def digest(clips: list[dict], sheet_limit: int = 48) -> _Digest:
    d = _Digest(sheet_limit)
    for c in clips:
        d.add_clip(c)
    return d


def test_caption_qa_failures_are_listed_with_their_reasons(tmp_path):
    kept = [clip("k1", "kept", None, "a red kite over a grey beach at dusk"),
            clip("k2", "kept", None, "two dogs run along the wet sand")]
    failed = [clip("f1", "failed", "caption: QA: dense caption repeats itself (after 1 retry)")]
    body, plots = _captions(digest(kept + failed), set(), tmp_path)
    assert "Caption QA failures (1)" in body and "dense caption repeats itself" in body and "f1" in body
    assert plots == ["plots/caption_words.svg"] and (tmp_path / "plots/caption_words.svg").exists()
    assert "beach (1)" in body and "2 of 2 kept clips captioned" in body  # common words, counts
    body, _ = _captions(digest(failed), set(), tmp_path)
    assert "no captions" in body and "Caption QA failures (1)" in body


def test_a_sample_keeps_at_most_its_cap_uniformly_and_the_same_each_time():
    samples = [_Sample(cap=100) for _ in range(2)]
    for s in samples:
        for v in range(10_000):
            s.add(v)
    a, b = samples
    assert a.seen == 10_000 and len(a.values) == 100 and a.sampled and a.values == b.values
    assert len(set(a.values)) == 100 and 3000 < sum(a.values) / 100 < 7000  # spread over the whole range
    small = _Sample(cap=100)
    for v in range(7):
        small.add(v)
    assert small.values == list(range(7)) and not small.sampled


def test_the_digest_counts_every_clip_but_holds_only_what_the_page_shows():
    """Counts (funnel, errors) are exact; the sheets hold their first clips and the error table its
    first ERROR_ROWS errors: the report's memory does not grow with the manifests."""
    clips = ([clip(f"k{i}", "kept", None) for i in range(100)]
             + [clip(f"s{i}", "rejected", "sharpness: blurry") for i in range(30)]
             + [clip(f"x{i}", "failed", "extract failed: RuntimeError: boom") for i in range(ERROR_ROWS + 50)])
    d = digest(clips, sheet_limit=10)
    assert (d.total, d.kept, d.dropped["sharpness"], d.dropped["extract failed"]) == (380, 100, 30, ERROR_ROWS + 50)
    assert d.error_count == ERROR_ROWS + 50 and len(d.errors) == ERROR_ROWS
    assert len(d.kept_sheet) == 10 and len(d.sheets["sharpness"]) == 5
    funnel = d.funnel()
    assert funnel[2] == ["candidate clips", 380, f"{380 * 2 / 3600:.4f}"] and funnel[-1][:2] == ["kept", 100]
    assert [row[1] for row in funnel[3:-1]] == [350, 100]  # after sharpness, after extract failed
    page = _sheet(d.kept_sheet, d.kept, set())
    assert page.count("<figure") == 10 and "… and 90 more" in page


def test_a_card_without_thumbnail_says_why():
    short = _card(clip("s1", "rejected", "too_short: 0.4 s < split.min_duration=1.0"), set())
    assert "no thumbnail: rejected as too short" in short and "<img" not in short
    fields = {"short": "a kite", "subjects": ["kite", "beach"], "actions": [], "scene": "a beach at dusk",
              "camera_motion": None, "shot_type": None, "lighting": None, "style": None, "on_screen_text": None}
    kept = _card(dict(clip("k1", "kept", None, "a red kite"), caption_fields=fields), {"k1.jpg"}, {"k1.webp"})
    assert 'src="thumbs/k1.jpg"' in kept and 'src="previews/k1.webp"' in kept and "a red kite" in kept
    assert "<b>subjects</b>: kite, beach" in kept and "<b>scene</b>: a beach at dusk" in kept and "actions" not in kept
    assert '<p class="caption">a kite</p>' in kept  # the card line is the short caption


def test_the_grounding_section_gives_the_contradiction_rate_per_field_with_examples():
    def checked(clip_id, camera, lighting):
        c = clip(clip_id, "kept", None, "a street")
        c["grounding"] = [
            {"field": "camera_motion", "claim": "static", "measured": "pan_x 0.2, pan_y 0, zoom 0", "verdict": camera},
            {"field": "lighting", "claim": "bright daylight", "measured": "luma_mean 35", "verdict": lighting}]
        return c

    clips = [checked("a", "contradicts", "unknown"), checked("b", "agrees", "unknown"),
             checked("c", "agrees", "contradicts"), checked("d", "agrees", "agrees"), clip("e", "kept", None)]
    d = digest(clips)
    assert d.grounding["camera_motion"] == {"contradicts": 1, "agrees": 3}
    body = d.grounding_section({"a.jpg"})
    assert "<td>camera_motion</td><td>4</td><td>3</td><td>1</td><td>0</td><td>25.0%</td>" in body
    assert "<td>lighting</td><td>4</td><td>1</td><td>1</td><td>2</td><td>50.0%</td>" in body
    assert 'data-clip="a"' in body and 'src="thumbs/a.jpg"' in body  # the example beside its frame
    assert "camera_motion &#x27;static&#x27; vs measured pan_x 0.2" in body
    assert {"a", "c"} <= {c["clip_id"] for c in d.shown()}  # their thumbnails are looked up
    assert "no caption was checked" in digest([clip("e", "kept", None)]).grounding_section(set())
