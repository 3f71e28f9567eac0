"""curation.split on what the analysis pass really yields for real footage."""

from __future__ import annotations

from curation.analyze import analyze
from curation.probe import probe
from curation.split import split_segment, window_frames
from spacetime.config import load_config
from curation.settings import CurateConfig
from spacetime.standins import testmedia as tm
from tests.helpers import CONFIGS


def _clips(path, **split):
    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", [f"split.{k}={v}" for k, v in split.items()])
    source = probe(str(path), cfg.probe, cfg.sources.s3)
    segments = list(analyze(source, cfg.analyze, cfg.sources.s3, window_frames(cfg.split.max_duration, source["fps"])))
    return [(c["start_frame"], c["end_frame"]) for seg in segments
            for c in split_segment(source, seg, cfg.split, cfg.analyze.max_sampled_per_clip)]


def test_hard_cuts_on_source_keyframes_are_not_trimmed():
    """bikes.mp4's encoder put a keyframe on the first frame of every shot (its cuts: 30, 76, 137,
    187, 242): clips then span whole shots; without the rule, one frame is dropped on each side."""
    cuts = list(tm.REAL_FOOTAGE_CUTS["bikes.mp4"])
    bounds = [0] + cuts + [250]
    assert _clips(tm.real_footage("bikes.mp4")) == list(zip(bounds, bounds[1:]))
    trimmed = [(a + (a > 0), b - (b < 250)) for a, b in zip(bounds, bounds[1:])]
    assert _clips(tm.real_footage("bikes.mp4"), keyframe_cuts=False) == trimmed


def test_cuts_without_a_keyframe_keep_their_trim(tmp_path):
    path = tmp_path / "one_gop.mp4"  # a keyframe on frame 0 only
    gt = tm.make_multishot(path, options={"g": "1000", "sc_threshold": "0"})
    clips = _clips(path)
    assert clips == _clips(path, keyframe_cuts=False)
    starts, ends = {a for a, _ in clips}, {b for _, b in clips}
    assert all(c + 1 in starts and c - 1 in ends for c in gt.hard_cuts), (clips, gt.cuts)


def test_a_dissolve_near_the_end_of_a_file_is_reported(tmp_path):
    """The dissolve detector confirms a transition ~30 frames after it; one closer to the end of the
    file is flushed at the end of the pass, not dropped (content, and the classic half of combined)."""
    from curation.settings import AnalyzeConfig
    from spacetime.config import S3Config

    gt = tm.make_multishot(tmp_path / "late.mp4", [tm.Segment("bikes.mp4", 140, 45), tm.Segment(
        "carphone_pristine.mp4", 0, 45), tm.Segment("bigbuckbunny.mp4", 20, 20)], dissolve_after=1)
    source = probe(str(gt.path), CurateConfig().probe, S3Config())
    segments = list(analyze(source, AnalyzeConfig(detector="content"), S3Config(), 250))
    (dissolve,) = gt.dissolves
    found = [tuple(c) for c in segments[-1]["cuts"]]
    assert (gt.hard_cuts[0], gt.hard_cuts[0] + 1) in found
    assert any(a < dissolve[1] + 2 and b > dissolve[0] - 2 and b - a > 1 for a, b in found), (found, gt.cuts)


def test_a_flash_is_no_cut_and_a_fade_through_black_is_one_transition(tmp_path):
    """Without the corrections the classic pass cuts at the flash and splits the fade in three (fade
    out, a cut where the picture comes back, fade in); with them: one transition, no cut."""
    from curation.settings import AnalyzeConfig
    from spacetime.config import S3Config

    gt = tm.make_flash_and_fade(tmp_path / "flash_fade.mp4")
    source = probe(str(gt.path), CurateConfig().probe, S3Config())

    def cuts(**cfg):
        return [tuple(c) for c in list(analyze(source, AnalyzeConfig(**cfg), S3Config(), 250))[-1]["cuts"]]

    raw = cuts(clean_transitions=False)
    assert any(gt.notes["flash"][0] <= a <= gt.notes["flash"][1] for a, _ in raw), raw  # the flash fires
    assert len([c for c in raw if c[0] >= 78]) > 1, raw  # the fade comes out in pieces
    (fade,) = gt.cuts
    (found,) = cuts()
    assert abs(found[0] - fade[0]) <= 2 and abs(found[1] - fade[1]) <= 2, (found, fade)
