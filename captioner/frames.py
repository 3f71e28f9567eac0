"""Frames given to the VLM: N frames evenly spaced over a clip, resized to a pixel budget, with the
video metadata Qwen2-VL-family processors need for numpy frames.

Two sources: the frames the analysis pass already sampled (pipeline stage: no new decode), and the
clip's own mp4 (`spacetime caption` on an existing dataset).

Metadata (transformers' VideoMetadata keys): `fps` and `total_num_frames` of the clip, the indices of
the given frames within it and the duration. The processor derives the frames' own rate from them
(len(indices) / total * fps), which sets Qwen2.5-VL's temporal positions.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from spacetime.frames import upright


@dataclass
class ClipVideo:
    frames: np.ndarray  # [N, H, W, 3] uint8 RGB, upright
    metadata: dict  # fps, duration, total_num_frames, frames_indices, video_backend, do_sample_frames

    @property
    def duration(self) -> float:
        return float(self.metadata["duration"])


def pick(n_available: int, n_wanted: int) -> list[int]:
    """Indices of `n_wanted` evenly spaced items of `n_available` (all of them if fewer)."""
    if n_available <= n_wanted:
        return list(range(n_available))
    return [int(round(x)) for x in np.linspace(0, n_available - 1, n_wanted)]


def fit_pixels(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(w, h) with w*h <= max_pixels, aspect kept, never upscaled, even sizes (>= 2)."""
    scale = min(1.0, (max_pixels / max(1, width * height)) ** 0.5)
    w = max(2, int(width * scale) // 2 * 2)
    h = max(2, int(height * scale) // 2 * 2)
    return w, h


def resize(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    import cv2

    n, h, w = frames.shape[:3]
    tw, th = fit_pixels(w, h, max_pixels)
    if (tw, th) == (w, h):
        return frames
    return np.stack([cv2.resize(f, (tw, th), interpolation=cv2.INTER_AREA) for f in frames])


def metadata(fps: float, total_frames: int, indices: list[int], duration: float) -> dict:
    return {
        "fps": float(fps),
        "duration": float(duration),
        "total_num_frames": int(max(total_frames, (max(indices) + 1) if indices else 1)),
        "frames_indices": [int(i) for i in indices],
        "video_backend": "pyav",
        "do_sample_frames": False,  # these ARE the sampled frames
    }


def from_sampled(clip: dict, sampled: np.ndarray, n_frames: int, max_pixels: int) -> ClipVideo:
    """Frames for a pipeline clip from the analysis pass's sampled frames (`sampled`: [M, H, W, 3],
    taken at clip["sampled_idx"], source frame indices)."""
    if sampled.ndim != 4 or len(sampled) == 0:
        raise ValueError(f"clip {clip['clip_id']}: no sampled frames to caption")
    keep = pick(len(sampled), n_frames)
    source_idx = clip.get("sampled_idx") or list(range(clip["start_frame"], clip["start_frame"] + len(sampled)))
    indices = [max(0, int(source_idx[k]) - int(clip["start_frame"])) for k in keep]
    duration = float(clip["end_time"]) - float(clip["start_time"])
    frames = resize(np.ascontiguousarray(sampled[keep]), max_pixels)
    return ClipVideo(frames, metadata(clip["fps"], clip["num_frames"], indices, duration))


def from_mp4(data: bytes, n_frames: int, max_pixels: int, span: tuple[int, int] | None = None) -> ClipVideo:
    """Decode `n_frames` evenly spaced frames of an mp4 (bytes), resized while decoding. Memory is
    bounded by the kept frames, not the clip. `span`: (skip_frames, num_frames) of the clip's record,
    the frames of the file that are the clip (a copy_only clip has leading frames before its span)."""
    import av

    from spacetime.frames import decode_all

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = stream.frames or 0
        if total <= 0:  # no frame count in the header: count packets (cheap, no decode)
            total = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
        skip = 0
        if span is not None:
            skip, total = span
        wanted = {skip + i for i in pick(total, n_frames)}
        keep: dict[int, np.ndarray] = {}
        fps = float(stream.average_rate or stream.guessed_rate or 1)
        size = None
        for i, frame in enumerate(decode_all(container, stream)):
            if i in wanted:
                rotation = int(getattr(frame, "rotation", 0) or 0) % 360
                if size is None:
                    w, h = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
                    size = fit_pixels(w, h, max_pixels)
                    if rotation in (90, 270):
                        size = (size[1], size[0])
                image = frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA")
                keep[i] = upright(image.to_ndarray(), rotation)
        if not keep:
            raise ValueError("no decodable video frame")
        indices = sorted(keep)
        duration = float(stream.duration * stream.time_base) if stream.duration and span is None else max(total, 1) / fps
    return ClipVideo(np.stack([keep[i] for i in indices]), metadata(fps, total, [i - skip for i in indices], duration))
