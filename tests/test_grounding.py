"""curation.grounding: caption fields against the pipeline's measurements, on the scores the filters
write (camera pan/zoom in frame widths per second, the OCR's text area and reading, mean luma)."""

from __future__ import annotations

import numpy as np
import pytest

from curation.grounding import apply_policy, camera_motion, ground, lighting, on_screen_text
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
    assert [c["field"] for c in checks] == ["camera_motion", "on_screen_text", "lighting"]
    assert [c["verdict"] for c in checks] == ["contradicts", "agrees", "agrees"]
    clip = {"status": "candidate", "reason": None}
    apply_policy(clip, checks, CFG)
    assert clip["status"] == "candidate" and clip["grounding"] == checks  # flagged, kept
    strict = GroundingConfig(policy={"camera_motion": "reject"})
    apply_policy(clip, checks, strict)
    assert clip["status"] == "rejected" and clip["reason"].startswith("grounding: camera_motion 'static' contradicts")
    with pytest.raises(ValueError):
        GroundingConfig(policy={"style": "reject"})  # a field no signal can check
