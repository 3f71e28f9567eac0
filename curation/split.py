"""Stage 4, split: segments from the analysis pass -> clip candidates.

A clip runs between transitions, minus `split.trim_frames` next to each transition (none next to a hard
cut that falls on a source keyframe, `split.keyframe_cuts`: the encoder placed that keyframe on the
scene change, which confirms the cut, and a clip that starts on a keyframe and ends before one can be
copied without re-encoding); a segment longer
than `split.max_duration` is cut into equal windows no longer than it; a clip shorter than
`split.min_duration` stays in the manifest as rejected (`too_short`). Images (1-frame sources) are
one 1-frame clip. Times come from PTS, so they are right on variable-frame-rate files.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from curation.settings import SplitConfig
from spacetime.contract import clip_id
from spacetime.frames import decode_frames, encode_frames


def window_frames(max_duration: float, fps: float) -> int:
    """Frames in a window of `max_duration` seconds (split.max_duration): the longest clip, and the
    longest stretch the analysis pass holds before flushing a segment."""
    return max(1, int(max_duration * fps))


def _times(seg: dict, time_base: Fraction, first_pts: int | None):
    """Seconds from the source start of frame i of the segment (by PTS)."""
    base = first_pts if first_pts is not None else 0
    return lambda i: float((seg["pts"][i - seg["start_frame"]] - base) * time_base)


def _trim(transition: list[int] | None, cut_on_keyframe: bool, cfg: SplitConfig) -> int:
    """Frames dropped on one side of a segment next to `transition` ([first, end) frames)."""
    if not transition:
        return 0
    hard = transition[1] - transition[0] == 1
    return 0 if hard and cut_on_keyframe and cfg.keyframe_cuts else cfg.trim_frames


def split_segment(source: dict, seg: dict, cfg: SplitConfig, max_sampled: int) -> list[dict]:
    """Clip candidates (dicts) of one segment; `status` is `candidate` or `rejected`. Each keeps at
    most `max_sampled` of the segment's sampled frames (analyze.max_sampled_per_clip)."""
    fps = source["fps"]
    time_base = Fraction(source["time_base"])
    start = seg["start_frame"] + _trim(seg["start_transition"], seg["start_frame"] in seg["keyframes"], cfg)
    end = seg["end_frame"] - _trim(seg["end_transition"], seg.get("end_on_keyframe", False), cfg)
    if end <= start:
        return []
    max_frames = window_frames(cfg.max_duration, fps)
    pieces = math.ceil((end - start) / max_frames)
    bounds = [start + round(k * (end - start) / pieces) for k in range(pieces + 1)]
    time_of = _times(seg, time_base, seg.get("first_pts"))
    frames = decode_frames(seg["sampled"]) if seg["sampled"] else np.zeros((0,))
    clips = []
    for a, b in zip(bounds, bounds[1:]):
        n = b - a
        start_time = time_of(a)
        end_pts = seg["pts"][b - seg["start_frame"]] if b - seg["start_frame"] < len(seg["pts"]) else seg["end_pts"]
        last_time = time_of(b - 1)
        end_time = float((end_pts - (seg.get("first_pts") or 0)) * time_base) if end_pts is not None else last_time + 1 / fps
        duration = end_time - start_time
        too_short = duration < cfg.min_duration and not source.get("is_image")
        picked = [k for k, i in enumerate(seg["sampled_idx"]) if a <= i < b]
        if len(picked) > max_sampled:
            picked = [picked[round(j)] for j in np.linspace(0, len(picked) - 1, max_sampled)]
        lo, hi = a - seg["start_frame"], b - seg["start_frame"]
        clips.append(dict(
            clip_id=clip_id(source["digest"], a, b), source_uri=source["uri"],
            start_frame=a, end_frame=b, num_frames=n, start_time=start_time, end_time=end_time,
            start_pts=seg["pts"][lo], end_pts=end_pts, fps=fps,
            width=source["width"], height=source["height"], rotation=source["rotation"],
            status="rejected" if too_short else "candidate",
            reason=f"too_short: {duration:.2f}s < split.min_duration={cfg.min_duration}s" if too_short else None,
            scores={}, signals={"diff": seg["diff"][lo:hi], "luma": seg["luma"][lo:hi]},
            sampled_idx=[seg["sampled_idx"][k] for k in picked],
            sampled=encode_frames([frames[k] for k in picked]) if picked else b"",
        ))
    return clips
