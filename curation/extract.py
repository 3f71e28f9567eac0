"""Stage 5, extract: each surviving clip at native resolution, frame-accurate, starting on a keyframe.

- Stream copy when the clip starts on a source keyframe, needs no rotation or crop, and the copied
  packets decode to exactly the clip's frames (checked; B-frames referencing past the end fail it).
- Otherwise re-encode (extract.codec, CRF/preset from config) with a fixed thread count, so the same
  clip always gives the same bytes. Pixels are rotated upright (display matrix applied) and the crop
  box (borders filter) applied; no resize. yuv420p needs even sizes: an odd last row/column is cut.
  Re-encoded clips are constant frame rate at the source's average rate.
Clips are staged on the output store (never carried in Ray objects); the unit writer packs them into shards.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from curation.settings import ExtractConfig
from spacetime.config import S3Config
from spacetime.frames import decode_all, upright
from spacetime.io import open_uri
from spacetime.store import Store

COPYABLE_CODECS = {"h264", "hevc", "av1", "vp9", "mpeg4"}


def _count_frames_strict(path: Path) -> int:
    """Frames of a clip under a strict decode; -1 if any packet fails (a copy of damaged packets
    must not reach a shard: it is re-encoded from what decodes instead)."""
    try:
        with av.open(str(path)) as c:
            return sum(1 for _ in c.decode(video=0))
    except av.error.FFmpegError:
        return -1


def _in_span(pts: int | None, clip: dict) -> bool:
    return pts is not None and pts >= clip["start_pts"] and (clip["end_pts"] is None or pts < clip["end_pts"])


def stream_copy(uri: str, s3: S3Config, clip: dict, out: Path) -> bool:
    """Copy the clip's packets; True when the result decodes to exactly clip['num_frames'] frames."""
    with av.open(open_uri(uri, s3), metadata_errors="ignore") as src:
        stream = src.streams.video[0]
        with av.open(str(out), "w", format="mp4") as dst:
            ostream = dst.add_stream_from_template(stream)
            src.seek(clip["start_pts"], stream=stream, backward=True, any_frame=False)
            for packet in src.demux(stream):
                if packet.dts is None and packet.pts is None:
                    continue
                if clip["end_pts"] is not None and packet.dts is not None and packet.dts >= clip["end_pts"]:
                    break
                if not _in_span(packet.pts, clip):
                    continue
                packet.pts -= clip["start_pts"]
                if packet.dts is not None:
                    packet.dts -= clip["start_pts"]
                packet.stream = ostream
                dst.mux(packet)
    return _count_frames_strict(out) == clip["num_frames"]


def x264_options(cfg: ExtractConfig) -> dict[str, str]:
    """Options that make the same clip encode to the same bytes, run after run, on any machine.

    - `threads` fixed: x264's default depends on the machine's cores and output depends on it
      (PyAV's codec_context.thread_count does not reach x264; its own option does).
    - `mbtree=0`: with the macroblock-tree lookahead on, identical frames encoded with identical
      settings sporadically gave different bytes (measured: 2 distinct outputs in 12 encodes with
      threads=1; 1 in 16+ with mbtree=0 or asm=0). The cost is a few percent of bitrate at equal CRF.
    """
    return {"crf": str(cfg.crf), "preset": cfg.preset, "threads": str(cfg.threads), "x264-params": "mbtree=0"}


def reencode(uri: str, s3: S3Config, clip: dict, cfg: ExtractConfig, out: Path,
             crop: tuple[int, int, int, int] | None) -> int:
    """Decode the span and encode it upright and cropped; returns the frames written."""
    rotation = clip["rotation"]
    rate = Fraction(clip["fps"]).limit_denominator(1001000)
    written = 0
    with av.open(open_uri(uri, s3), metadata_errors="ignore") as src:
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        src.seek(clip["start_pts"], stream=stream, backward=True, any_frame=False)
        with av.open(str(out), "w", format="mp4") as dst:
            ostream = None
            for frame in decode_all(src, stream):
                if frame.pts is not None and clip["end_pts"] is not None and frame.pts >= clip["end_pts"]:
                    break
                if not _in_span(frame.pts, clip):
                    continue
                image = upright(frame.to_ndarray(format="rgb24"), rotation)
                if crop:
                    x, y, w, h = crop
                    image = image[y:y + h, x:x + w]
                image = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
                if ostream is None:
                    ostream = dst.add_stream(cfg.codec, rate=rate)
                    ostream.width, ostream.height = image.shape[1], image.shape[0]
                    ostream.pix_fmt = cfg.pix_fmt
                    ostream.options = x264_options(cfg) if cfg.codec == "libx264" else {"crf": str(cfg.crf)}
                out_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                out_frame.pts = written
                out_frame.time_base = 1 / rate
                for packet in ostream.encode(out_frame):
                    dst.mux(packet)
                written += 1
                if written == clip["num_frames"]:
                    break
            if ostream is not None:
                for packet in ostream.encode():
                    dst.mux(packet)
    return written


def extract_clip(clip: dict, source: dict, cfg: ExtractConfig, s3: S3Config, store: Store, rel: str) -> dict:
    """Write the clip to `rel` on the output store (published whole, see spacetime.store); returns
    the fields to record."""
    crop = tuple(clip["crop"]) if clip.get("crop") else None
    mode = None
    with store.writing(rel, unique=True) as tmp:  # a duplicate source may extract the same clip at once
        if (cfg.stream_copy and clip["start_is_keyframe"] and not clip["rotation"] and crop is None
                and source["codec"] in COPYABLE_CODECS and not source.get("is_image")):
            try:
                if stream_copy(source["uri"], s3, clip, tmp):
                    mode = "copy"
            except av.error.FFmpegError:
                mode = None
        if mode is None:
            frames = reencode(source["uri"], s3, clip, cfg, tmp, crop)
            if frames != clip["num_frames"]:
                raise RuntimeError(f"decoded {frames} of the span's {clip['num_frames']} frames")
            mode = "reencode"
        with av.open(str(tmp)) as c:
            s = c.streams.video[0].codec_context
            width, height = s.width, s.height
        size = tmp.stat().st_size
    return {"extract_mode": mode, "width": width, "height": height, "bytes": size}
