"""Stage 3, analyze: ONE threaded decode pass per source at reduced resolution.

Every frame-level consumer is fed from this loop: the shot detector of `analyze.detector`
(scenedetect's hard cuts through `process_frame` plus a blend-fitting detector for gradual
transitions, or TransNetV2 on 48x27 frames made from the pass's small frame, or both), per-frame
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
            return self.flush()
        self.thumbs.append((index, thumb))
        frames = dict(self.thumbs)
        for length in self.lengths:
            first = index - length
            if first - 1 in frames:
                ends = self._fits(frames, first, index)
                if ends:
                    self.fits.append((ends, first, index))
        if self.fits and index - self.fits[-1][2] > self.cfg.dissolve_max_frames // 2:
            return self.flush()
        return None

    def flush(self) -> tuple[int, int] | None:
        if not self.fits:
            return None
        top = max(f[0] for f in self.fits)
        _, first, end = min((f for f in self.fits if f[0] >= 0.95 * top), key=lambda f: (f[2] - f[1], f[1]))
        self.fits = []
        return first, end

    @property
    def pending_since(self) -> int | None:
        return min(f[1] for f in self.fits) if self.fits else None


class ClassicShots:
    """scenedetect's hard cuts (`content` or `adaptive`) plus DissolveDetector's gradual transitions."""

    def __init__(self, cfg: AnalyzeConfig, fps: Fraction):
        from scenedetect import AdaptiveDetector, ContentDetector

        self.fps = fps
        if cfg.detector == "adaptive":
            self.detector = AdaptiveDetector(adaptive_threshold=cfg.adaptive_threshold, min_scene_len=cfg.min_scene_frames)
        else:
            self.detector = ContentDetector(threshold=cfg.content_threshold, min_scene_len=cfg.min_scene_frames)
        self.twin = DissolveDetector(cfg) if cfg.dissolve else None
        self.lag = (cfg.dissolve_max_frames + 2 if self.twin else 0) + self.detector.event_buffer_length + 1

    def update(self, index: int, bgr: np.ndarray, gray: np.ndarray) -> list[tuple[int, int]]:
        from scenedetect import FrameTimecode

        hard = [tc.frame_num for tc in self.detector.process_frame(FrameTimecode(index, self.fps), bgr)]
        found = []
        if self.twin is not None:  # first: a hard cut flushes a pending dissolve that precedes it
            dissolve = self.twin.update(index, gray[::4, ::4].copy(), is_cut=bool(hard))  # ~48x36 thumbs
            if dissolve:
                found.append(dissolve)
        return found + [(cut, cut + 1) for cut in hard]

    def finish(self, last: int) -> list[tuple[int, int]]:
        from scenedetect import FrameTimecode

        cuts = [(tc.frame_num, tc.frame_num + 1) for tc in self.detector.post_process(FrameTimecode(last, self.fps))]
        pending = self.twin.flush() if self.twin is not None else None  # a dissolve near the end
        return sorted(cuts + ([pending] if pending else []))

    @property
    def pending_since(self) -> int | None:
        return self.twin.pending_since if self.twin else None


class LearnedShots:
    """TransNetV2 (curation.transnet) fed 48x27 frames made from the pass's small frame."""

    def __init__(self, cfg: AnalyzeConfig):
        from curation.transnet import TransNetV2Shots

        self.model = TransNetV2Shots(cfg.transnet_threshold, cfg.dissolve_max_frames, cfg.transnet_device,
                                     cfg.transnet_dtype)
        self.lag = self.model.lag

    def update(self, index: int, bgr: np.ndarray, gray: np.ndarray) -> list[tuple[int, int]]:
        from curation.transnet import frame48

        return self.model.update(index, frame48(bgr))

    def finish(self, last: int) -> list[tuple[int, int]]:
        return self.model.finish()

    @property
    def pending_since(self) -> int | None:
        return None  # every transition is reported within `lag` frames of its first frame


class CombinedShots:
    """TransNetV2 and the classic detectors, merged by `analyze.combine` (see AnalyzeConfig).

    Their transitions are held until neither detector can still report one that overlaps them (`lag`
    frames), then merged: transitions within `combine_tolerance` frames of each other are one (the
    connected groups of [first, end + tolerance]); its extent is the learned model's where it found
    it, else the classic one's.

    Under `agree` only groups with a classic transition are kept, so TransNetV2 runs only near the
    classic transitions (`TransNetV2Near`: the reference windows around them, the same numbers), not
    over the whole video: before a group is released, the learned transitions connected to each of
    its classic ones are found (growing the connected interval until no more join). The result is
    the same as running the model everywhere (tests/test_transnet.py); the cost falls with the
    number of cuts, from every frame twice (100-frame windows, step 50) to nothing on a single shot.
    """

    def __init__(self, cfg: AnalyzeConfig, fps: Fraction, sparse: bool = True):
        """`sparse=False` runs TransNetV2 everywhere under `agree` too (the reference, for tests)."""
        from curation.transnet import TransNetV2Near, TransNetV2Shots

        self.cfg = cfg
        self.classic = ClassicShots(cfg, fps)
        self.near = (TransNetV2Near(cfg.transnet_threshold, cfg.dissolve_max_frames, cfg.transnet_device,
                                    cfg.transnet_dtype) if sparse and cfg.combine == "agree" else None)
        self.learned = None if self.near else LearnedShots(cfg)
        learned_lag = TransNetV2Shots.lag_of(cfg.dissolve_max_frames)
        self.lag = max(self.classic.lag, learned_lag) + cfg.combine_tolerance + 1
        self.held: list[tuple[int, int, str]] = []  # (first, end, "classic" | "learned")
        self.resolved: set[tuple[int, int, str]] = set()  # classic ones whose learned neighbours are held

    def update(self, index: int, bgr: np.ndarray, gray: np.ndarray) -> list[tuple[int, int]]:
        self.held += [(*t, "classic") for t in self.classic.update(index, bgr, gray)]
        if self.near:
            from curation.transnet import frame48

            self.near.update(frame48(bgr))
        else:
            self.held += [(*t, "learned") for t in self.learned.update(index, bgr, gray)]
        return self._release(index - self.lag)

    def finish(self, last: int) -> list[tuple[int, int]]:
        self.held += [(*t, "classic") for t in self.classic.finish(last)]
        if self.near:
            self.near.finish()
        else:
            self.held += [(*t, "learned") for t in self.learned.finish(last)]
        return self._release(None)

    def _resolve(self) -> None:
        """Hold the learned transitions connected to each held classic one (agree mode)."""
        tol = self.cfg.combine_tolerance
        for t in sorted(self.held):
            if t[2] != "classic" or t in self.resolved:
                continue
            first, last = t[0], t[1] + tol  # the connected interval so far
            while True:
                found = self.near.near(first - tol - 1, last)
                if found is None:
                    return  # frames not decoded yet; later classic ones need later frames still
                joined = [f for f in found if f[0] <= last and f[1] + tol >= first]
                grown = (min([first] + [f[0] for f in joined]), max([last] + [f[1] + tol for f in joined]))
                if grown == (first, last):
                    break
                first, last = grown
            known = set(self.held)
            self.held += [(*f, "learned") for f in joined if (*f, "learned") not in known]
            self.resolved.add(t)

    def _release(self, before: int | None) -> list[tuple[int, int]]:
        if self.near:
            self._resolve()
        tol, out = self.cfg.combine_tolerance, []
        self.held.sort()
        while self.held:
            group = [self.held[0]]
            for t in self.held[1:]:
                if t[0] <= max(g[1] for g in group) + tol:
                    group.append(t)
            if before is not None and max(g[1] for g in group) + tol > before:
                break  # a detector may still report a transition that joins this group
            if self.near and any(g[2] == "classic" and g not in self.resolved for g in group):
                break  # its learned neighbours are not known yet
            del self.held[:len(group)]
            self.resolved -= set(group)
            merged = self._merge(group)
            if merged:
                out.append(merged)
        return out

    def _merge(self, group: list[tuple[int, int, str]]) -> tuple[int, int] | None:
        learned = [g for g in group if g[2] == "learned"]
        classic = [g for g in group if g[2] == "classic"]
        if self.cfg.combine == "agree" and not (learned and classic):
            return None
        if learned:
            return min(g[0] for g in learned), max(g[1] for g in learned)
        if self.cfg.combine == "learned_plus_dissolves" and all(g[1] - g[0] == 1 for g in classic):
            return None  # a classic hard cut alone is not trusted
        return min(g[0] for g in classic), max(g[1] for g in classic)

    @property
    def pending_since(self) -> int | None:
        firsts = [t[0] for t in self.held] + [p for p in [self.classic.pending_since] if p is not None]
        return min(firsts) if firsts else None


class CleanTransitions:
    """Two corrections to any detector's transitions (measured with benchmarks/shot_truth.py):

    - Flashes: a hard cut across which the picture comes back within `flash_frames` frames (a camera
      flash, a lightning strike, a glitch) is no cut. Of the 48x36 luma thumbnails of the frames
      before and after it (at most flash_frames + 1 apart), the closest pair differs by less than
      `flash_diff`: a 2-frame flash came out at 3.0 in a slow shot and 13.6 in a moving one, every
      true cut of the benchmark set at 30.8 or more (a jump cut within one scene; other cuts 43+),
      frames 4 apart inside shots at 2-4 (median; fast pans 21-26).
    - Fades through black: transitions separated by at most `fade_gap` frames of which one at least
      is dark (mean luma below `dark_luma`), or by none, are one transition (a fade out, black, a
      fade in; the detectors often miss the darkest frames of each side). A shot that short (0.6 s
      at 25 fps) would be rejected as too short anyway.

    Transitions are held until the detector can no longer report one that would join them."""

    def __init__(self, inner, cfg: AnalyzeConfig):
        self.inner, self.cfg = inner, cfg
        self.k = cfg.flash_frames
        self.wait = inner.lag + cfg.fade_gap + self.k + 1  # frames after a transition's END
        self.lag = self.wait + cfg.dissolve_max_frames
        self.thumbs: dict[int, np.ndarray] = {}
        self.luma: dict[int, float] = {}
        self.held: list[tuple[int, int]] = []

    def update(self, index: int, bgr: np.ndarray, gray: np.ndarray) -> list[tuple[int, int]]:
        self.thumbs[index] = gray[::4, ::4].copy()  # a copy: a view would keep the whole frame alive
        self.luma[index] = float(gray.mean())
        old = index - self.lag - self.k - 2
        if old in self.thumbs:
            del self.thumbs[old], self.luma[old]
        self.held = sorted(self.held + self.inner.update(index, bgr, gray))
        return self._release(index)

    def finish(self, last: int) -> list[tuple[int, int]]:
        self.held = sorted(self.held + self.inner.finish(last))
        return self._release(None)

    def _flash(self, cut: int) -> bool:
        k, near = self.k, []
        for a in range(cut - 1 - k, cut):
            for b in range(cut, a + k + 2):
                if a in self.thumbs and b in self.thumbs:
                    near.append(float(np.abs(self.thumbs[a] - self.thumbs[b]).mean()))
        return bool(near) and min(near) < self.cfg.flash_diff

    def _dark_gap(self, end: int, first: int) -> bool:
        gap = range(end, first)
        return len(gap) <= self.cfg.fade_gap and (not gap or min(self.luma.get(i, 255.0) for i in gap) < self.cfg.dark_luma)

    def _release(self, index: int | None) -> list[tuple[int, int]]:
        out = []
        while self.held:
            first, end = self.held[0]
            if index is not None and index < end + self.wait:
                break  # a transition that joins it, or the flash's return, may still come
            del self.held[0]
            if end - first == 1 and self.k and self._flash(first):
                continue
            if self.held and self.held[0][0] <= end + self.cfg.fade_gap and self._dark_gap(end, self.held[0][0]):
                self.held[0] = (first, max(end, self.held[0][1]))  # merged: it may join the next one too
                continue
            out.append((first, end))
        return out

    @property
    def pending_since(self) -> int | None:
        firsts = [t[0] for t in self.held] + [p for p in [self.inner.pending_since] if p is not None]
        return min(firsts) if firsts else None


def make_shot_detector(cfg: AnalyzeConfig, fps: Fraction):
    """The detector of `analyze.detector`, corrected for flashes and fades (CleanTransitions):
    update(index, bgr, gray) -> transitions found, finish(last index) -> the rest, `lag` (frames
    between a transition's first frame and its report, at most) and `pending_since`."""
    if cfg.detector == "transnetv2":
        inner = LearnedShots(cfg)
    elif cfg.detector == "combined":
        inner = CombinedShots(cfg, fps)
    else:
        inner = ClassicShots(cfg, fps)
    return CleanTransitions(inner, cfg) if cfg.clean_transitions else inner


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


def _next_start(transition: tuple[int, int]) -> int:
    """The first frame of the shot after a transition: a hard cut's frame starts the new shot, the
    frames of a gradual transition belong to neither."""
    first, end = transition
    return first if end - first == 1 else end


def analyze(source: dict, cfg: AnalyzeConfig, s3: S3Config, window_frames: int) -> Iterator[dict]:
    """Decode `source` once; yield segments (dicts) separated by transitions or window flushes.

    Each segment: start_frame, end_frame (exclusive), pts (per frame), keyframes, diff, luma,
    sampled_idx + sampled (npy bytes of upright RGB frames), start/end_transition. The last one has
    final=True and the source totals: num_frames, cuts, decode_errors (packets whose decode raised;
    curation.extract trusts a copy of a source's packets without decoding it only when this is 0).
    """
    rotation = source["rotation"]
    fps = Fraction(source["fps"]).limit_denominator(1001000)
    shots = make_shot_detector(cfg, fps)
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

    errors: list = []
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
        for frame in decode_all(container, stream, errors):
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

            for found in shots.update(index, bgr, gray):
                if found[0] > seg.start:
                    cuts.append(found)
                    yield close(found[0], found, _next_start(found))
            # Flush a long shot in windows, never inside a transition that may still be confirmed.
            pending = shots.pending_since
            window_end = seg.start + window_frames
            if index >= window_end + shots.lag and (pending is None or pending >= window_end):
                yield close(window_end, None, window_end)

    total = index + 1
    if total == 0:
        raise ValueError("no decodable video frame")
    for found in shots.finish(index):
        # (a "shot" of the last frame alone is no shot: TransNetV2 fires there on fast motion, the
        # last window being padded with that frame)
        if seg.start < found[0] < total - 1:
            cuts.append(found)
            yield close(found[0], found, min(_next_start(found), total))
    last = close(total, None, total)
    last.update(final=True, num_frames=total, cuts=[list(c) for c in sorted(cuts)], decode_errors=len(errors))
    yield last
