"""One sample's pixels and caption: pure functions of its bytes, its record and (seed, epoch).

    stride = frame_stride(fps, num_frames, frames, cfg.target_fps)
    frames_u8, cropped = decode_clip(mp4_bytes, frames, stride, (W, H))   # [3, T, H, W] uint8
    caption = choose_caption(record, caption_draw(seed, epoch, clip_id), cfg)

Frames. A sample of bucket `A_Rp_Ff` gives the FIRST F frames of its clip at the clip's fps (with
`target_fps`, every k-th frame, k = round(fps / target_fps), reduced so the F frames fit in the
clip), resized to the bucket's `Bucket.target_size()`.

Resize rule. Scale (keeping the aspect ratio) by s = max(W / w, H / h), the smallest scale at
which the frame covers the W x H target (each side rounded, never below the target), then take
the centred W x H crop. The cropped fraction 1 - W*H / (w*s * h*s) is reported per step (0 when
the clip has the class's exact ratio). Frames are shown upright: a display rotation, if any,
is applied (spacetime.frames.upright).

Decoding. PyAV decodes from the start of the clip (curated clips start on a keyframe) and stops
after the last frame needed; each frame is resized and cropped by swscale and written planar into
the caller's uint8 buffer (one slot of the batch: training.data.dataset converts the whole batch to
the output dtype once). Each clip gets its own single-threaded swscale context (a VideoReformatter
made in decode_clip): `frame.reformat()` reuses one per thread (PyAV >= 18.1.1) with slice threads,
and a DataLoader worker forked from a process that had used it inherited that context with its
threads gone, and hung for ever on its first resize (seen on CI; tests/test_loader.py checks it).

Captions. Drawn per (seed, epoch, clip id), so a resumed or re-sharded run draws the same ones:
empty with probability caption_dropout, else the short caption with probability
short_caption_prob, else the dense caption.
"""

from __future__ import annotations

import hashlib
import io

import av
from av.video.reformatter import VideoReformatter
import numpy as np

from spacetime.contract import VIDEO_EXT
from spacetime.frames import upright
from spacetime.record import ClipRecord
from training.config import LoaderConfig

# LoaderConfig.interpolation -> the swscale name PyAV takes
INTERPOLATION = {"area": "AREA", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


# -------------------------------------------------------------------------------------- frames
def frame_stride(fps: float, num_frames: int, frames: int, target_fps: float | None) -> int:
    """Source frames between two sample frames: round(fps / target_fps), shrunk to fit the clip."""
    if target_fps is None or frames <= 1 or fps <= 0:
        return 1
    stride = max(1, round(fps / target_fps))
    return max(1, min(stride, (num_frames - 1) // (frames - 1)))


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """Smallest aspect-preserving size of a width x height frame that covers target (W, H)."""
    tw, th = target
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


def resize_crop(frame: av.VideoFrame, target: tuple[int, int], interpolation: str,
                reformatter: VideoReformatter | None = None) -> tuple[np.ndarray, float]:
    """Upright frame, resized to cover `target` and centre-cropped: ([H, W, 3] uint8, cropped fraction).
    swscale runs single-threaded, in `reformatter` (a new one if None; never PyAV's shared one)."""
    rotation = int(getattr(frame, "rotation", 0) or 0)
    turned = rotation % 180 != 0
    w, h = (frame.height, frame.width) if turned else (frame.width, frame.height)
    rw, rh = cover_size(w, h, target)
    cw, ch = (rh, rw) if turned else (rw, rh)  # swscale works before the rotation
    image = (reformatter or VideoReformatter()).reformat(frame, width=cw, height=ch, format="rgb24",
                                                         interpolation=interpolation, threads=1).to_ndarray()
    image = upright(image, rotation)
    tw, th = target
    x0, y0 = (rw - tw) // 2, (rh - th) // 2
    return image[y0:y0 + th, x0:x0 + tw], 1.0 - (tw * th) / (rw * rh)


def decode_clip(data: bytes, frames: int, stride: int, target: tuple[int, int], interpolation: str = "AREA",
                threads: int = 1, out: np.ndarray | None = None, skip: int = 0) -> tuple[np.ndarray, float]:
    """Frames 0, stride, 2*stride, ... (`frames` of them) of an encoded clip, decoding no further
    than the last one, each resized+cropped to `target` (W, H): ([3, T, H, W] uint8 (into `out` if
    given), cropped fraction). Planar, so the float conversion of a batch is one contiguous pass.
    `skip`: the record's skip_frames (copy_only clips), leading frames of the file before frame 0."""
    tw, th = target
    if out is None:
        out = np.empty((3, frames, th, tw), np.uint8)
    n, cropped = 0, 0.0
    reformatter = VideoReformatter()
    with av.open(io.BytesIO(data), metadata_errors="ignore") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if threads != 1:
            stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream), start=-skip):
            if i < 0 or i % stride:
                continue
            image, cropped = resize_crop(frame, target, interpolation, reformatter)
            out[:, n] = image.transpose(2, 0, 1)
            n += 1
            if n == frames:
                break
    if n < frames:
        raise ValueError(f"decoded {n} of the {frames} frames its bucket needs (stride {stride})")
    return out, cropped


def sample_frames(parts: dict[str, bytes], record: ClipRecord, fps: float, num_frames: int, frames: int,
                  size: tuple[int, int], cfg: LoaderConfig, out: np.ndarray | None = None) -> tuple[np.ndarray, float, int]:
    """A shard sample's frames as its bucket needs them (the loader's and the latent cache's one
    definition): ([3, T, H, W] uint8 (into `out` if given), cropped fraction, stride)."""
    stride = frame_stride(fps, num_frames, frames, cfg.target_fps)
    pixels, cropped = decode_clip(parts[VIDEO_EXT], frames, stride, size, INTERPOLATION[cfg.interpolation],
                                  cfg.decode_threads, out, skip=record.skip_frames)
    return pixels, cropped, stride


# ------------------------------------------------------------------------------------ captions
def caption_draw(seed: int, epoch: int, clip_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, clip id)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{clip_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def caption_kind(draw: float, has_short: bool, cfg: LoaderConfig) -> str:
    """"empty" with probability caption_dropout, else "short" with probability short_caption_prob
    (when there is a short caption), else "dense"."""
    if draw < cfg.caption_dropout:
        return "empty"
    if draw < cfg.caption_dropout + cfg.short_caption_prob and has_short:
        return "short"
    return "dense"


def choose_caption(record: ClipRecord, draw: float, cfg: LoaderConfig) -> str:
    """The caption `caption_kind` picks for `record`."""
    kind = caption_kind(draw, bool(record.short_caption), cfg)
    return {"empty": "", "short": record.short_caption, "dense": record.dense_caption}[kind]
