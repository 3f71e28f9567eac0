"""Stage 3, analyze: ONE threaded decode pass per source at reduced resolution.

Every frame-level consumer is fed from this loop: scenedetect's detector (hard cuts, through
`process_frame`), a blend-fitting detector for gradual transitions (dissolves and fades), per-frame
signals (luma difference = motion proxy, mean luma), keyframe flags and PTS, and frames sampled at
`analyze.sample_fps` for the filter and caption stages. Nothing else decodes the source before
extraction.

Memory is bounded by the frames of ONE segment, not by the video: segments are emitted as soon as a
transition is confirmed, and a long shot is flushed in windows of `split.max_duration`.
Frame numbers are decoded-frame indices (not time x nominal fps, which is wrong on VFR files).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

from curation.settings import AnalyzeConfig
from spacetime.config import S3Config
from spacetime.frames import decode_all, encode_frames, upright
from spacetime.io import open_uri

log = logging.getLogger(__name__)


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


class DissolveDetector:
    """Gradual transitions (dissolves, fades) by blend fitting, on small grey thumbnails.

    For a window of L blended frames ending at the current frame, with A = the frame before the
    window and B = the current frame: A and B must differ like a cut (>= `dissolve_high`), and the
    frames at 1/4, 1/2 and 3/4 of the window must each be a blend a*A + (1-a)*B (residual below
    `dissolve_blend_error` of |A-B|) with a falling from A to B. A hard cut fails the blend (its
    middle frame is pure A or B), and so does a pan or moving content (not a blend); a fade is a
    blend with black. Window lengths are tried on a geometric grid between `dissolve_min_frames` and
    `dissolve_max_frames`. Sub-windows of a dissolve fit too, with a smaller |A-B|, and windows
    overhanging it by a few frames fit with about the same |A-B|: of the fitting windows around one
    transition, the shortest within 5% of the largest |A-B| is the transition.
    (The classic twin-comparison run of moderate frame differences was tried first: on moving
    footage the within-shot differences are as large as the dissolve's, so runs never isolate it.)
    """

    def __init__(self, cfg: AnalyzeConfig):
        self.cfg = cfg
        self.thumbs: deque[tuple[int, np.ndarray]] = deque(maxlen=cfg.dissolve_max_frames + 2)
        lengths = np.geomspace(cfg.dissolve_min_frames, cfg.dissolve_max_frames, num=10)
        self.lengths = sorted({int(round(x)) for x in lengths})
        self.fits: list[tuple[float, int, int]] = []  # (|A-B|, start, end) around one transition

    def _fits(self, frames: dict, first: int, end: int) -> float:
        """|A-B| if frames first..end-1 are blends of A=frame first-1 and B=frame end, else 0."""
        a, b = frames[first - 1], frames[end]
        ends = float(np.abs(a - b).mean())
        if ends < self.cfg.dissolve_high:
            return 0.0
        d = (a - b).ravel()
        dd = max(float(np.dot(d, d)), 1e-6)
        alphas = []
        for q in (0.25, 0.5, 0.75):
            mid = frames[first + int((end - first - 1) * q + 0.5)]
            alpha = float(np.dot(mid.ravel() - b.ravel(), d) / dd)
            residual = float(np.abs(mid - (alpha * a + (1 - alpha) * b)).mean())
            if residual > self.cfg.dissolve_blend_error * ends:
                return 0.0
            alphas.append(alpha)
        # a ramp from A to B (eased dissolves allowed): a(q) near 1 - q at each quarter point
        ramp = all(abs(alpha - (1 - q)) <= 0.25 for alpha, q in zip(alphas, (0.25, 0.5, 0.75)))
        return ends if ramp and alphas[0] > alphas[1] > alphas[2] else 0.0

    def update(self, index: int, thumb: np.ndarray, is_cut: bool) -> tuple[int, int] | None:
        """Feed frame `index`; returns a finished transition [start, end) or None."""
        if is_cut:  # a hard cut ends the pending transition and breaks every window through it
            self.thumbs.clear()
            self.thumbs.append((index, thumb))
            return self._finish()
        self.thumbs.append((index, thumb))
        frames = dict(self.thumbs)
        for length in self.lengths:
            first = index - length
            if first - 1 in frames:
                ends = self._fits(frames, first, index)
                if ends:
                    self.fits.append((ends, first, index))
        if self.fits and index - self.fits[-1][2] > self.cfg.dissolve_max_frames // 2:
            return self._finish()
        return None

    def _finish(self) -> tuple[int, int] | None:
        if not self.fits:
            return None
        top = max(f[0] for f in self.fits)
        _, first, end = min((f for f in self.fits if f[0] >= 0.95 * top), key=lambda f: (f[2] - f[1], f[1]))
        self.fits = []
        return first, end

    @property
    def pending_since(self) -> int | None:
        return min(f[1] for f in self.fits) if self.fits else None


def _make_detector(cfg: AnalyzeConfig):
    from scenedetect import AdaptiveDetector, ContentDetector

    if cfg.detector == "adaptive":
        return AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=cfg.min_scene_frames)
    return ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_frames)


def _plane(plane, width: int, height: int) -> np.ndarray:
    return np.frombuffer(plane, np.uint8).reshape(height, plane.line_size)[:, :width]


def small_bgr_and_luma(frame: av.VideoFrame, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The analysis-size BGR frame (for scenedetect) and its luma (float32), cheaply.

    For 8-bit 4:2:0 frames (nearly all sources) the Y/U/V planes are resized with OpenCV
    (bilinear) and converted at the small size: ~0.35 ms for 1080p, where swscale's full-frame
    conversion takes 1.4-2 ms, which on 2 cores shares the CPU with the decoder threads (see
    benchmarks/analysis_vs_decode.py). Detection does not need exact colours; the sampled frames
    that models see are converted by swscale (`sample_frame`).
    """
    import cv2

    if frame.format.name in ("yuv420p", "yuvj420p") and frame.width % 2 == 0 and frame.height % 2 == 0:
        w, h = frame.width, frame.height
        y = cv2.resize(_plane(frame.planes[0], w, h), size, interpolation=cv2.INTER_LINEAR)
        u = cv2.resize(_plane(frame.planes[1], w // 2, h // 2), size, interpolation=cv2.INTER_LINEAR)
        v = cv2.resize(_plane(frame.planes[2], w // 2, h // 2), size, interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(cv2.merge([y, u, v]), cv2.COLOR_YUV2BGR), y.astype(np.float32)
    bgr = frame.reformat(width=size[0], height=size[1], format="bgr24").to_ndarray()
    return bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)


def sample_frame(frame: av.VideoFrame, height: int, rotation: int) -> np.ndarray:
    """An upright RGB frame of the given height (never upscaled) for filters and captioning."""
    w, h = analysis_size(frame.width, frame.height, height)
    return upright(frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray(), rotation)


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
    twin = DissolveDetector(cfg) if cfg.dissolve else None
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
            end_on_keyframe=end in seg.keyframes,  # the frame after the segment (a cut's first frame)
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

    container = av.open(open_uri(source["uri"], s3), metadata_errors="ignore")
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if cfg.threads:
            stream.codec_context.thread_count = cfg.threads
        if cfg.skip_loop_filter:
            stream.codec_context.options = {"skip_loop_filter": "all"}
        size = analysis_size(stream.codec_context.width, stream.codec_context.height, cfg.height)
        last_pts = None
        for frame in decode_all(container, stream):
            index += 1
            pts = frame.pts if frame.pts is not None else (last_pts + 1 if last_pts is not None else 0)
            last_pts = pts
            if first_pts is None:
                first_pts = int(pts)
            bgr, gray = small_bgr_and_luma(frame, size)
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
                seg.sampled.append(sample_frame(frame, cfg.sample_height, rotation))

            hard = [tc.frame_num for tc in detector.process_frame(FrameTimecode(index, fps), bgr)]
            if twin is not None:  # first: a hard cut flushes a pending dissolve that precedes it
                found = twin.update(index, gray[::4, ::4].copy(), is_cut=bool(hard))  # ~48x36 thumbs
                if found and found[0] > seg.start:
                    cuts.append(found)
                    yield close(found[0], found, found[1])
            for cut in hard:
                if cut > seg.start:
                    cuts.append((cut, cut + 1))
                    yield close(cut, (cut, cut + 1), cut)
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
