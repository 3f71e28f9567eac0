"""Burned-in text (subtitles, logos, captions) from PP-OCR text detection on sampled frames.

Engine: PP-OCRv4 detection (DB) + recognition from the `rapidocr-onnxruntime` 1.4.4 wheel, whose
ONNX models ship inside it (nothing is downloaded), on one onnxruntime intra-op thread (rapidocr
silently ignores a thread count above os.cpu_count() and then uses every core).

Detection at the frame's own size. RapidOCR's defaults (`det_limit_type="min"`, 736) UPSCALE a
640x360 frame (560 ms). With `det_limit_type="max"` rapidocr 1.4.4 ignores `det_limit_side_len`
(`TextDetector.get_preprocess` replaces it with 960/1500/2000), and its pre-processing still
RESIZES every frame to multiples of 32: a 176x144 frame is squeezed to 192x128, which lost a 6%
subtitle on 5 of 8 carphone_pristine frames and 6 of 8 carphone_distorted ones. So `detect_boxes`
scales a frame down itself only when its longer side exceeds `side`, pads it (black, bottom/right)
to multiples of 32, and calls the detector directly (`rapid.text_det`): no resize at all (every
subtitled frame then has its box), and no crops warped for nothing (`RapidOCR.__call__` with
`use_rec=False` still cuts one per box). Frames are RGB; the models were trained on BGR
(cv2.imread), so they are flipped first.

Persistence. Each frame's boxes are rasterised onto a coarse grid (`grid` square cells over the
frame height): a cell is covered in a frame if any box touches it, which dilates every box by up to
one cell. A cell is text if it is covered in at least `persist` of the frames (and in at least 2
frames when there are 2 or more). A subtitle changes words every second or two but stays in the
same band, so the band's cells persist; a logo persists by definition; scene text moves with the
camera or leaves with a cut; a one-frame flash and the detector's occasional box on clean footage
(2 of 47 clean sampled frames: a road marking and a taxi sign in bikes.mp4) do not persist.
`text_area` is the fraction of the frame's cells that are text. Scene text filmed by a locked
camera does persist: a text filter may as well reject it.

Band. If every text cell lies within `band` of the bottom (or top) edge, `band` is the strip to crop
(like letterbox bars): from that edge to the farthest edge of any box touching text cells on any
frame (a long or two-line subtitle reaches further than the persistent cells), plus BAND_MARGIN,
capped at `band`.

Recognition (optional) reads the boxes touching text cells on `rec_frames` frames (evenly spaced
among those that have such boxes) and returns the deduplicated strings.

Measured (benchmarks/ocr_text.py) on the four real footage files, sampled at 2 fps and 224 px high
as the pipeline does, one clip per shot (8 clips, 47 frames), clean and with text burned in at full
resolution (subtitles 5/6/7% of the frame height, white with a black outline, a new line every
second; a "NEWS 24" logo in either top corner), on a 2-core machine loaded by other work (load
average 3-4), one thread: detection 0.03-0.06 s per 528x224 frame, 0.03-0.05 s per 398x224,
0.01-0.02 s per 176x144 (0.13 s per 640x360); recognition (3 frames) 0.07-0.22 s per clip.
text_area: clean 0.000 on every clip (and for any grid 8-32, persist 0.3-0.75); 6% subtitles
0.069-0.150, 5% 0.031-0.094, logos 0.020-0.056. With MAX_AREA = 0.01: no false positive (0/8),
subtitles 23/24 clips (the miss: 5% subtitles on the 176x144 carphone_distorted, 7-px letters;
caught with max_frames=4), logos 16/16, each with the right band. persist 0.75 misses 2/24.
Loading takes ~0.4 s and ~190 MB.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

# Defaults, chosen by measurement (benchmarks/ocr_text.py); see score_text.
GRID = 16  # cells over the frame height (14 px at 224): a 6%-high subtitle line spans 2-3 rows
PERSIST = 0.5  # fraction of frames a cell must be covered in
MIN_BOX_FRAC = 0.0005  # boxes below this fraction of the frame area are ignored (spurious specks)
BAND = 0.25  # persistent text confined to this fraction at the bottom/top -> crop it
REC_FRAMES = 3  # frames whose text boxes are recognised
BAND_MARGIN = 0.02  # of the frame height, added to a band crop beyond the text boxes
MAX_AREA = 0.01  # proposed reject threshold on text_area (clean footage 0, logo >= 0.02, subtitles >= 0.07)


@dataclass
class OcrEngine:
    """A loaded RapidOCR engine and the longest frame side detection runs at."""

    rapid: Any  # rapidocr_onnxruntime.RapidOCR
    side: int


def load_ocr(side: int = 640, threads: int = 1) -> OcrEngine:
    """PP-OCRv4 detection + recognition from the rapidocr-onnxruntime wheel (offline), on `threads`
    onnxruntime intra-op threads. Frames larger than `side` (longer side) are scaled down to it for
    detection; smaller frames are never scaled up."""
    if not 32 <= side <= 960:  # above 960 rapidocr would resize again (its "max" limit is 960)
        raise ValueError(f"side must be within 32..960, got {side}")
    from rapidocr_onnxruntime import RapidOCR

    rapid = RapidOCR(
        det_limit_type="max",
        det_limit_side_len=side,  # recorded only: rapidocr 1.4.4 ignores it under "max"
        intra_op_num_threads=threads,  # rapidocr ignores values above os.cpu_count()
        inter_op_num_threads=1,
        use_cls=False,  # subtitles are upright; the 180-degree classifier is not needed
        print_verbose=False,
    )
    return OcrEngine(rapid=rapid, side=side)


def _prepare(engine: OcrEngine, frame: np.ndarray) -> tuple[np.ndarray, float]:
    """RGB frame -> BGR detector input (scaled to fit `side`, padded to multiples of 32) and the
    scale from frame pixels to input pixels."""
    import cv2

    h, w = frame.shape[:2]
    bgr = np.ascontiguousarray(frame[..., ::-1])
    scale = min(1.0, engine.side / max(h, w))
    if scale < 1.0:
        bgr = cv2.resize(bgr, (max(1, round(w * scale)), max(1, round(h * scale))),
                         interpolation=cv2.INTER_AREA)
    ih, iw = bgr.shape[:2]
    bgr = cv2.copyMakeBorder(bgr, 0, max(32, ih + (-ih % 32)) - ih, 0, max(32, iw + (-iw % 32)) - iw,
                             cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return bgr, scale


def detect_boxes(engine: OcrEngine, frame: np.ndarray) -> list[np.ndarray]:
    """Text boxes of one RGB frame [H, W, 3] uint8: float32 quadrilaterals [4, 2] (x, y) in frame
    pixels, clockwise from top-left. Detection only."""
    bgr, scale = _prepare(engine, frame)
    boxes, _ = engine.rapid.text_det(bgr)
    if boxes is None or len(boxes) == 0:
        return []
    h, w = frame.shape[:2]
    out = []
    for box in np.asarray(boxes, np.float32) / scale:
        box[:, 0] = box[:, 0].clip(0, w)
        box[:, 1] = box[:, 1].clip(0, h)
        out.append(box)
    return out


def _cells(box: np.ndarray, cell: float, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1), exclusive ends: the grid cells a box's bounding rectangle touches."""
    x0, y0 = box.min(axis=0)
    x1, y1 = box.max(axis=0)
    r0, c0 = min(rows - 1, max(0, int(y0 // cell))), min(cols - 1, max(0, int(x0 // cell)))
    r1, c1 = math.ceil(y1 / cell), math.ceil(x1 / cell)
    return r0, min(rows, max(r1, r0 + 1)), c0, min(cols, max(c1, c0 + 1))


def _touches(box: np.ndarray, text: np.ndarray, cell: float) -> bool:
    """Whether a box touches a text cell."""
    r0, r1, c0, c1 = _cells(box, cell, *text.shape)
    return bool(text[r0:r1, c0:c1].any())


def _recognize(engine: OcrEngine, frame: np.ndarray, boxes: list[np.ndarray]) -> list[str]:
    """Recognised strings (score >= rapidocr's text_score) of `boxes` in an RGB frame."""
    rapid = engine.rapid
    bgr = np.ascontiguousarray(frame[..., ::-1])
    crops = rapid.get_crop_img_list(bgr, [np.ascontiguousarray(b, np.float32) for b in boxes])
    results, _ = rapid.text_rec(crops)
    return [str(t).strip() for t, score, *_ in results if float(score) >= rapid.text_score and str(t).strip()]


def _dedupe(strings: list[str]) -> list[str]:
    """Drop repeats and strings contained in a longer one, comparing letters and digits only
    (recognition drops or adds spaces and punctuation: "NEWS 24" = "NEWS24"), first seen first."""
    keys = ["".join(c for c in s.lower() if c.isalnum()) for s in strings]
    kept: list[tuple[str, str]] = []
    for s, k in sorted(zip(strings, keys), key=lambda x: -len(x[1])):
        if k and not any(k in other for _, other in kept):
            kept.append((s, k))
    order = {k: i for i, k in enumerate(keys)}
    return [s for s, k in sorted(kept, key=lambda x: order[x[1]])]


def score_text(
    engine: OcrEngine,
    frames: np.ndarray,
    *,
    persist: float = PERSIST,
    grid: int = GRID,
    min_box_frac: float = MIN_BOX_FRAC,
    band: float = BAND,
    recognize: bool = True,
    rec_frames: int = REC_FRAMES,
    max_frames: int | None = None,
) -> dict[str, Any]:
    """Persistent burned-in text in sampled frames [N, H, W, 3] uint8 RGB (one clip, one shot).

    Returns
      text_area: fraction of the grid's cells covered by text in >= `persist` of the frames;
      band: {"side": "bottom"|"top", "rows": fraction of the frame height to crop} when all of that
        text lies within `band` of the bottom (checked first) or top edge, else None;
      text: recognised text of the persistent boxes, deduplicated, " | "-joined ("" if none or
        `recognize` is False);
      seconds: detection seconds per frame; rec_seconds: recognition seconds in all;
      frames: frames scored; boxes: boxes kept (all frames).

    `max_frames` scores that many evenly spaced frames only (detection costs ~0.03 s a frame).
    A cell is text when covered in >= ceil(`persist` x N) frames, and in >= 2 when N >= 2: one
    frame's text is never persistent unless it is the only frame. Detection stops as soon as no cell
    can reach that any more (clean footage: after 5 of 8 frames at persist 0.5), which changes no
    result; `frames` counts the frames detection ran on.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if len(frames) == 0:
        return {"text_area": 0.0, "band": None, "text": "", "seconds": 0.0, "rec_seconds": 0.0,
                "frames": 0, "boxes": 0}
    if max_frames is not None and len(frames) > max_frames:
        frames = frames[np.unique(np.linspace(0, len(frames) - 1, max_frames).round().astype(int))]
    n, h, w = frames.shape[:3]
    cell = h / grid
    rows, cols = grid, max(1, math.ceil(w / cell - 1e-9))
    min_area = min_box_frac * h * w

    need = max(math.ceil(persist * n - 1e-9), min(2, n))
    start = time.perf_counter()
    per_frame: list[list[np.ndarray]] = []
    covered = np.zeros((n, rows, cols), bool)
    counts = np.zeros((rows, cols), np.int32)
    for i, frame in enumerate(frames):
        if counts.max() + (n - i) < need:  # no cell can persist any more: the answer is "no text"
            break
        kept = []
        for box in detect_boxes(engine, frame):
            x0, y0 = box.min(axis=0)
            x1, y1 = box.max(axis=0)
            if (x1 - x0) * (y1 - y0) < min_area:
                continue
            kept.append(box)
            r0, r1, c0, c1 = _cells(box, cell, rows, cols)
            covered[i, r0:r1, c0:c1] = True
        counts += covered[i]
        per_frame.append(kept)
    det_seconds = (time.perf_counter() - start) / max(len(per_frame), 1)

    text = counts >= need
    result: dict[str, Any] = {
        "text_area": float(text.mean()),
        "band": None,
        "text": "",
        "seconds": det_seconds,
        "rec_seconds": 0.0,
        "frames": len(per_frame),
        "boxes": sum(len(b) for b in per_frame),
    }
    if not text.any():
        return result

    # Band: every text cell within `band` of one edge. The crop goes to the farthest edge of the
    # boxes that touch text cells in that strip on any frame (a long or two-line subtitle), plus
    # `BAND_MARGIN` of the frame height.
    text_rows = np.flatnonzero(text.any(axis=1))
    limit = math.floor(band * grid + 1e-9)  # rows of cells inside the band
    on_text = [[b for b in boxes if _touches(b, text, cell)] for boxes in per_frame]
    if text_rows[0] >= rows - limit:
        top = min(float(b[:, 1].min()) for boxes in on_text for b in boxes)
        result["band"] = {"side": "bottom", "rows": round(min(band, (h - top) / h + BAND_MARGIN), 4)}
    elif text_rows[-1] < limit:
        bottom = max(float(b[:, 1].max()) for boxes in on_text for b in boxes)
        result["band"] = {"side": "top", "rows": round(min(band, bottom / h + BAND_MARGIN), 4)}

    if recognize and rec_frames > 0:
        start = time.perf_counter()
        hits = [(i, boxes) for i, boxes in enumerate(on_text) if boxes]
        picks = np.unique(np.linspace(0, len(hits) - 1, min(rec_frames, len(hits))).round().astype(int))
        strings: list[str] = []
        for j in picks:
            i, boxes = hits[j]
            strings += _recognize(engine, frames[i], boxes)
        result["text"] = " | ".join(_dedupe(strings))
        result["rec_seconds"] = time.perf_counter() - start
    return result
