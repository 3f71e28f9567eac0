"""curation.grounding: caption fields against the pipeline's measurements, on the scores the filters
write (camera pan/zoom in frame widths per second, the OCR's text area and reading, mean luma)."""

from __future__ import annotations

import numpy as np
import pytest

from curation.grounding import apply_policy, camera_motion, ground, lighting, on_screen_text, shots
from curation.settings import GroundingConfig

CFG = GroundingConfig()
STILL = {"camera_pan_x": 0.002, "camera_pan_y": -0.001, "camera_zoom": 0.0}
PAN_RIGHT = {"camera_pan_x": -0.2, "camera_pan_y": 0.004, "camera_zoom": 0.001}  # the scene moves left
TILT = {"camera_pan_x": 0.003, "camera_pan_y": 0.15, "camera_zoom": 0.0}


@pytest.mark.parametrize("claim, dense, scores, verdict", [
    ("static", "", PAN_RIGHT, "contradicts"),  # a "static" camera on a measured pan
    ("static", "", STILL, "agrees"),
    ("pan", "", STILL, "contradicts"),  # a pan claimed where the camera is still
    ("pan", "", PAN_RIGHT, "agrees"),
    ("pan", "", TILT, "contradicts"),  # a pan on a vertical-only movement
    ("tilt", "", TILT, "agrees"),
    ("pan", "The camera pans left across the street.", PAN_RIGHT, "contradicts"),  # "pan left" on a right pan
    ("pan", "The camera pans to the right across the street.", PAN_RIGHT, "agrees"),
    ("tracking", "", PAN_RIGHT, "unknown"),  # the flow cannot tell tracking from a pan
    ("pan", "", {}, "unknown"),  # no motion measured
])
def test_camera_motion(claim, dense, scores, verdict):
    check = camera_motion(claim, dense, scores, CFG)
    assert check["verdict"] == verdict and check["field"] == "camera_motion"
    if scores:
        assert f"pan_x {scores['camera_pan_x']:.3g}" in check["measured"]


def test_the_measured_pan_direction_is_the_motion_filters():
    """On real pixels: content moving right (what a camera panning LEFT sees) through the motion
    filter gives a positive camera_pan_x, which grounding reads as a left pan."""
    from curation.filters import motion
    from curation.settings import MotionConfig

    rng = np.random.default_rng(0)
    scene = (rng.random((120, 400, 3)) * 255).astype(np.uint8)
    frames = np.stack([scene[:, 100 - 8 * t: 260 - 8 * t] for t in range(6)])  # content shifts right 8 px/frame
    scores = motion(frames, [t / 25 for t in range(6)], MotionConfig())
    assert scores["camera_pan_x"] > CFG.moving_speed
    assert camera_motion("pan", "the camera pans left", scores, CFG)["verdict"] == "agrees"
    assert camera_motion("pan", "the camera pans right", scores, CFG)["verdict"] == "contradicts"


@pytest.mark.parametrize("claim, scores, ocr, verdict", [
    ("", {"text_area": 0.03}, "SALE 50% OFF", "contradicts"),  # none claimed where text persists
    ("", {"text_area": 0.0}, None, "agrees"),
    ("BREAKING NEWS", {"text_area": 0.0}, None, "contradicts"),  # text claimed where the OCR found none
    ("Breaking news tonight", {"text_area": 0.02}, "BREAKING NEWS", "agrees"),
    ("Welcome home", {"text_area": 0.02}, "BREAKING NEWS", "contradicts"),  # words that disagree
    ("BREAKING NEWS", {}, None, "unknown"),  # the OCR did not run
])
def test_on_screen_text(claim, scores, ocr, verdict):
    assert on_screen_text(claim, scores, ocr, CFG)["verdict"] == verdict


@pytest.mark.parametrize("claim, luma, verdict", [
    ("bright daylight", 35.0, "contradicts"), ("bright daylight", 150.0, "agrees"),
    ("dim, night-time street lights", 160.0, "contradicts"), ("dark interior", 30.0, "agrees"),
    ("soft, warm", 30.0, "unknown"), ("bright neon signs in a dark alley", 30.0, "unknown"),
])
def test_lighting(claim, luma, verdict):
    assert lighting(claim, {"luma_mean": luma}, CFG)["verdict"] == verdict


def test_policies_flag_by_default_and_reject_on_request():
    fields = {"camera_motion": "static", "on_screen_text": "", "lighting": "bright daylight"}
    scores = {**PAN_RIGHT, "text_area": 0.0, "luma_mean": 140.0}
    checks = ground(fields, "A street.", scores, None, CFG)
    assert [c["field"] for c in checks] == ["camera_motion", "on_screen_text", "lighting", "shots"]
    assert [c["verdict"] for c in checks] == ["contradicts", "agrees", "agrees", "agrees"]
    clip = {"status": "candidate", "reason": None}
    apply_policy(clip, checks, CFG)
    assert clip["status"] == "candidate" and clip["grounding"] == checks  # flagged, kept
    strict = GroundingConfig(policy={"camera_motion": "reject"})
    apply_policy(clip, checks, strict)
    assert clip["status"] == "rejected" and clip["reason"].startswith("grounding: camera_motion 'static' contradicts")
    with pytest.raises(ValueError):
        GroundingConfig(policy={"style": "reject"})  # a field no signal can check


def _sampled(path, every: int = 12, height: int = 224):
    """Frames as the analysis pass samples them (about 2 fps of a 25 fps video, analyze.sample_height rows high)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width = round(stream.width * height / stream.height / 2) * 2
        frames = [f.reformat(width=width, height=height, format="rgb24").to_ndarray()
                  for i, f in enumerate(container.decode(stream)) if i % every == 0]
        fps = float(stream.average_rate)  # inside: PyAV >= 18.1.1 refuses a closed container's stream
    return np.stack(frames), fps


def test_the_filters_own_measurements_contradict_false_claims(tmp_path):
    """The issue's cases on real measurements: the text filter (PP-OCR) on the subtitled sample and the
    motion filter (optical flow) on a static shot, then fixed caption fields: "no on-screen text" on
    the subtitles and "pan" on the static shot contradict; the true claims agree."""
    from curation.filters import Motion, Text
    from curation.settings import MotionConfig, TextConfig
    from spacetime.standins import testmedia as tm

    tm.make_subtitled(tmp_path / "subtitled.mp4", "bigbuckbunny.mp4")
    tm.make_static(tmp_path / "static.mp4", num_frames=50)
    measured = {}
    for name in ("subtitled", "static"):
        frames, fps = _sampled(tmp_path / f"{name}.mp4")
        clip = {"status": "candidate", "scores": {}, "fps": fps, "sampled_idx": list(range(0, 12 * len(frames), 12)),
                "width": frames.shape[2], "height": frames.shape[1]}
        Text(TextConfig()).score(clip, frames, TextConfig())
        Motion(MotionConfig()).score(clip, frames, MotionConfig())
        measured[name] = clip
    sub, static = measured["subtitled"], measured["static"]
    assert sub["scores"]["text_area"] > CFG.min_text_area and sub.get("ocr_text")
    assert on_screen_text("", sub["scores"], sub.get("ocr_text"), CFG)["verdict"] == "contradicts"
    assert on_screen_text(sub["ocr_text"], sub["scores"], sub["ocr_text"], CFG)["verdict"] == "agrees"
    assert camera_motion("pan", "", static["scores"], CFG)["verdict"] == "contradicts"
    assert camera_motion("static", "", static["scores"], CFG)["verdict"] == "agrees"


def test_facts_say_what_was_measured_for_each_contradicted_field():
    """The `recaption` policy's context: one plain line per contradicted field, from the measurements."""
    from curation.grounding import facts, wants_recaption

    scores = {**PAN_RIGHT, "text_area": 0.04, "luma_mean": 30.0}
    checks = ground({"camera_motion": "static", "on_screen_text": "", "lighting": "bright daylight"}, "A street.",
                    scores, "SALE TODAY", CFG)
    assert [c["verdict"] for c in checks] == ["contradicts"] * 3 + ["agrees"]
    assert facts(checks, scores, "SALE TODAY", CFG).splitlines() == [
        "- camera_motion: the camera pans right", '- on_screen_text: text stays on screen; it reads "SALE TODAY"',
        "- lighting: the picture is dark (mean luma 30 of 255)"]
    assert not wants_recaption(checks, CFG)  # flag by default
    assert wants_recaption(checks, GroundingConfig(policy={"lighting": "recaption"}))
    agreeing = ground({"camera_motion": "pan"}, "", scores, None, CFG)
    assert facts(agreeing, scores, None, CFG) == ""  # only contradicted fields are told


@pytest.mark.parametrize("dense, verdict", [
    ("A cyclist rides down a trail, then the scene cuts to a close-up of the wheel.", "contradicts"),
    ("A montage of city streets at dusk.", "contradicts"),
    ("Several shots show a kitchen.", "contradicts"),
    ("The camera switches to a different angle of the stage.", "contradicts"),
    ("A cyclist rides down a trail and turns at the bottom.", "agrees"),
    ("A barber cuts a man's hair.", "agrees"),  # "cuts" that is not an edit
])
def test_shots(dense, verdict):
    """Each clip is one shot (the split cuts at every transition found): a caption describing an edit
    contradicts the shot detector."""
    check = shots(dense)
    assert check["verdict"] == verdict and check["measured"] == "transitions 0"
