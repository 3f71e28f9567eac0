"""Stage 3, analyze: ONE threaded decode pass per source at reduced resolution.

Every frame-level consumer is fed from this loop: scenedetect's detector (hard cuts, through
`process_frame`), a twin-comparison detector for gradual transitions (dissolves and fades), per-frame
signals (luma difference = motion proxy, mean luma), keyframe flags and PTS, and frames sampled at
`analyze.sample_fps` for the filter and caption stages. Nothing else decodes the source before
extraction.

Memory is bounded by the frames of ONE segment, not by the video: segments are emitted as soon as a
transition is confirmed, and a long shot is flushed in windows of `split.max_duration`.
Frame numbers are decoded-frame indices (not time x nominal fps, which is wrong on VFR files).
"""

from __future__ import annotations

import io
import logging
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from curation.settings import AnalyzeConfig, S3Config
from curation.sources import open_source

log = logging.getLogger(__name__)


def encode_frames(frames: list[np.ndarray]) -> bytes:
    """[N] HxWx3 uint8 frames -> npy bytes (one Ray row value; no tensor-extension quirks)."""
    buf = io.BytesIO()
    np.save(buf, np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), allow_pickle=False)
    return buf.getvalue()


def decode_frames(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate pixels as a player would for the stream's display matrix (PyAV: counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(frame, k=(rotation // 90) % 4)) if rotation else frame


def decode_all(container, stream) -> Iterator[av.VideoFrame]:
    """Decode every frame, surviving corrupt packets: `container.decode()` stops at the first bad
    packet, so packets are demuxed and each decoded in its own try/except."""
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError as err:
            log.debug("skipping undecodable packet at pts %s: %s", packet.pts, err)


@dataclass
class _Segment:
    start: int
    start_transition: tuple[int, int] | None = None
    pts: list[int] = field(default_factory=list)
    keyframes: list[int] = field(default_factory=list)
    diff: list[float] = field(default_factory=list)
    luma: list[float] = field(default_factory=list)
    sampled_idx: list[int] = field(default_factory=list)
    sampled: list[np.ndarray] = field(default_factory=list)


class TwinComparison:
    """Gradual-transition detector (Zhang et al., 1993, twin comparison) with a blend check.

    A candidate is a run of consecutive frame differences above `low` (and below a hard cut) lasting
    `min_frames`..`max_frames`, whose two outer frames differ by at least `high`. A camera pan also
    makes such runs, so the middle frame must be a blend a*A + (1-a)*B of the outer frames, with a
    residual below `blend_error` of their difference; dissolves and fades are, pans are not.
    Known limit: a dissolve between two shots that are themselves in strong motion is missed.
    """

    def __init__(self, cfg: AnalyzeConfig):
        self.cfg = cfg
        self.thumbs: deque[tuple[int, np.ndarray]] = deque(maxlen=cfg.dissolve_max_frames + 2)
        self.run_start: int | None = None

    def _is_blend(self, first: int, last: int) -> bool:
        frames = dict(self.thumbs)
        a, b, mid = frames.get(first - 1), frames.get(last), frames.get((first + last) // 2)
        if a is None or b is None or mid is None:
            return False
        ends = float(np.abs(a - b).mean())
        if ends < self.cfg.dissolve_high:
            return False
        d = (a - b).ravel()
        alpha = float(np.clip(np.dot(mid.ravel() - b.ravel(), d) / max(np.dot(d, d), 1e-6), 0, 1))
        residual = float(np.abs(mid - (alpha * a + (1 - alpha) * b)).mean())
        return 0.15 < alpha < 0.85 and residual / ends <= self.cfg.dissolve_blend_error

    def update(self, index: int, thumb: np.ndarray, diff: float, is_cut: bool) -> tuple[int, int] | None:
        """Feed frame `index`; returns a finished transition [start, end) or None."""
        self.thumbs.append((index, thumb))
        moving = self.cfg.dissolve_low <= diff and not is_cut
        if moving:
            if self.run_start is None:
                self.run_start = index
            return None
        if self.run_start is None:
            return None
        first, last, self.run_start = self.run_start, index - 1, None
        length = last - first + 1
        if self.cfg.dissolve_min_frames <= length <= self.cfg.dissolve_max_frames and self._is_blend(first, last):
            return first, last + 1
        return None

    @property
    def pending_since(self) -> int | None:
        return self.run_start


def _make_detector(cfg: AnalyzeConfig):
    from scenedetect import AdaptiveDetector, ContentDetector

    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=cfg.min_scene_frames)
    return ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_frames)


def analysis_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """Decode size of the analysis pass for a coded width x height: height `target_height` (never
    upscaled), width keeping the aspect; both even."""
    h = min(target_height, height)
    w = max(2, int(round(width * h / height / 2)) * 2)
    return w, max(2, h // 2 * 2)


def analyze(source: dict, cfg: AnalyzeConfig, s3: S3Config, window_frames: int) -> Iterator[dict]:
    """Decode `source` once; yield segments (dicts) separated by transitions or window flushes.

    Each segment: start_frame, end_frame (exclusive), pts (per frame), keyframes, diff, luma,
    sampled_idx + sampled (npy bytes of upright RGB frames), start/end_transition. The last one has
    final=True and the source totals: num_frames, cuts, decode_errors.
    """
    from scenedetect import FrameTimecode

    rotation = source["rotation"]
    fps = Fraction(source["fps"]).limit_denominator(1001000)
    detector = _make_detector(cfg)
    twin = TwinComparison(cfg) if cfg.dissolve else None
    lookahead = (cfg.dissolve_max_frames + 2 if twin else 0) + detector.event_buffer_length + 1
    cuts: list[tuple[int, int]] = []
    seg = _Segment(start=0)
    seg_index = 0
    prev_gray = None
    sample_slot = -1
    index = -1
    first_pts = None

    def close(end: int, end_transition, next_start: int) -> dict:
        nonlocal seg, seg_index
        n = end - seg.start
        cut_at = end - seg.start
        row = dict(
            seg_index=seg_index, start_frame=seg.start, end_frame=end,
            start_transition=list(seg.start_transition) if seg.start_transition else None,
            end_transition=list(end_transition) if end_transition else None,
            pts=seg.pts[:n], end_pts=seg.pts[cut_at] if cut_at < len(seg.pts) else None,
            keyframes=[k for k in seg.keyframes if k < end],
            diff=seg.diff[:n], luma=seg.luma[:n],
            sampled_idx=[i for i in seg.sampled_idx if i < end],
            sampled=encode_frames([f for i, f in zip(seg.sampled_idx, seg.sampled) if i < end]),
            final=False, first_pts=first_pts,
        )
        # Frames from next_start on belong to the next segment (transition frames belong to none).
        keep = next_start - seg.start
        nxt = _Segment(start=next_start, start_transition=end_transition,
                       pts=seg.pts[keep:], keyframes=[k for k in seg.keyframes if k >= next_start],
                       diff=seg.diff[keep:], luma=seg.luma[keep:])
        nxt.sampled_idx = [i for i in seg.sampled_idx if i >= next_start]
        nxt.sampled = [f for i, f in zip(seg.sampled_idx, seg.sampled) if i >= next_start]
        seg, seg_index = nxt, seg_index + 1
        return row

    container = av.open(open_source(source["uri"], s3), metadata_errors="ignore")
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if cfg.threads:
            stream.codec_context.thread_count = cfg.threads
        size = analysis_size(stream.codec_context.width, stream.codec_context.height, cfg.height)
        last_pts = None
        for frame in decode_all(container, stream):
            index += 1
            pts = frame.pts if frame.pts is not None else (last_pts + 1 if last_pts is not None else 0)
            last_pts = pts
            if first_pts is None:
                first_pts = int(pts)
            bgr = frame.reformat(width=size[0], height=size[1], format="bgr24").to_ndarray()
            gray = bgr.mean(axis=2, dtype=np.float32)
            diff = float(np.abs(gray - prev_gray).mean()) if prev_gray is not None else 0.0
            prev_gray = gray
            seg.pts.append(int(pts))
            seg.diff.append(diff)
            seg.luma.append(float(gray.mean()))
            if frame.key_frame:
                seg.keyframes.append(index)
            t = float(pts * stream.time_base) if frame.pts is not None else index / float(fps)
            slot = int(t * cfg.sample_fps)
            if slot > sample_slot:
                sample_slot = slot
                seg.sampled_idx.append(index)
                seg.sampled.append(upright(np.ascontiguousarray(bgr[..., ::-1]), rotation))

            hard = [tc.frame_num for tc in detector.process_frame(FrameTimecode(index, fps), bgr)]
            for cut in hard:
                if cut > seg.start:
                    cuts.append((cut, cut + 1))
                    yield close(cut, (cut, cut + 1), cut)
            if twin is not None:
                thumb = gray[::4, ::4].copy()
                found = twin.update(index, thumb, diff, is_cut=bool(hard) or diff > 4 * cfg.dissolve_high)
                if found and found[0] > seg.start:
                    cuts.append(found)
                    yield close(found[0], found, found[1])
            # Flush a long shot in windows, never inside a transition that may still be confirmed.
            pending = twin.pending_since if twin else None
            window_end = seg.start + window_frames
            if index >= window_end + lookahead and (pending is None or pending >= window_end):
                yield close(window_end, None, window_end)

    total = index + 1
    if total == 0:
        raise ValueError("no decodable video frame")
    for cut in [tc.frame_num for tc in detector.post_process(FrameTimecode(index, fps))]:
        if seg.start < cut < total:
            cuts.append((cut, cut + 1))
            yield close(cut, (cut, cut + 1), cut)
    last = close(total, None, total)
    last.update(final=True, num_frames=total, cuts=[list(c) for c in sorted(cuts)])
    yield last
