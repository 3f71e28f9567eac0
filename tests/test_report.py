"""curation.report pieces that a curation fixture rarely exercises: caption QA failures listed with
their reasons, and cards that say why a clip has no thumbnail. (The whole page is checked in
headless Chromium on real runs: tests/test_curate.py, tests/test_filters.py.)"""

from __future__ import annotations

from curation.report import _captions, _card


def clip(clip_id: str, status: str, reason: str | None, caption: str | None = None) -> dict:
    return {"clip_id": clip_id, "source_uri": "/data/a.mp4", "start_frame": 0, "end_frame": 48, "status": status,
            "reason": reason, "caption": caption, "scores": {"aesthetic": 5.5}, "bucket": "16x9_360p_32f",
            "duration": 2.0, "width": 640, "height": 360}


def test_caption_qa_failures_are_listed_with_their_reasons(tmp_path):
    kept = [clip("k1", "kept", None, "a red kite over a grey beach at dusk"),
            clip("k2", "kept", None, "two dogs run along the wet sand")]
    failed = [clip("f1", "failed", "caption: QA: dense caption repeats itself (after 1 retry)")]
    body, plots = _captions(kept, failed, set(), tmp_path)
    assert "Caption QA failures (1)" in body and "dense caption repeats itself" in body and "f1" in body
    assert plots == ["plots/caption_words.png"] and (tmp_path / "plots/caption_words.png").exists()
    assert "beach (1)" in body  # common words
    body, _ = _captions([], failed, set(), tmp_path)
    assert "no captions" in body and "Caption QA failures (1)" in body


def test_a_card_without_thumbnail_says_why():
    short = _card(clip("s1", "rejected", "too_short: 0.4 s < split.min_duration=1.0"), set())
    assert "no thumbnail: rejected as too short" in short and "<img" not in short
    fields = {"short": "a kite", "subjects": ["kite", "beach"], "actions": [], "scene": "a beach at dusk",
              "camera_motion": None, "shot_type": None, "lighting": None, "style": None, "on_screen_text": None}
    kept = _card(dict(clip("k1", "kept", None, "a red kite"), caption_fields=fields), {"k1.jpg"}, {"k1.webp"})
    assert 'src="thumbs/k1.jpg"' in kept and 'src="previews/k1.webp"' in kept and "a red kite" in kept
    assert "<b>subjects</b>: kite, beach" in kept and "<b>scene</b>: a beach at dusk" in kept and "actions" not in kept
    assert '<p class="caption">a kite</p>' in kept  # the card line is the short caption
