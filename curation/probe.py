"""Stage 2, probe: what each source is, or a readable reason why it is not a usable video.

Rejection is by checks, not by waiting for a decoder to fail (facts in ../shared/ENVIRONMENT.md):
PyAV opens a PNG named .mp4 as a one-frame `png_pipe` "video", an audio-only file opens with zero
video streams, and a header can claim dimensions that FFmpeg would try to decode (GBs of RAM).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from curation.settings import ProbeConfig
from curation.sources import digest_source
from spacetime.config import S3Config
from spacetime.io import open_uri

# FFmpeg demuxers that read single still images; a source read by one is an image.
IMAGE_FORMATS = {"png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif", "image2", "gif_pipe"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class ProbeError(ValueError):
    """The source is not a usable video; str() is the manifest's `error`."""


def _is_vfr(container, stream, packets: int) -> bool:
    """Variable frame rate: PTS steps of the first `packets` packets are not all equal."""
    pts = []
    for packet in container.demux(stream):
        if packet.pts is not None:
            pts.append(packet.pts)
        if len(pts) >= packets:
            break
    # Packets come in decode order: with B-frames the highest PTS read so far can sit ahead of
    # frames not yet demuxed, so the top of the sorted list (the reorder depth) is left out.
    pts = sorted(pts)[: max(2, len(pts) - 16)]
    steps = [b - a for a, b in zip(pts, pts[1:])]
    return bool(steps) and max(steps) - min(steps) > 1  # 1 tick of rounding is still constant


def _looks_like_text(uri: str, s3: S3Config) -> bool:
    source = open_uri(uri, s3)
    with (open(source, "rb") if isinstance(source, str) else source) as f:
        head = f.read(4096)
    try:
        return b"\0" not in head and bool(head.decode("utf-8").strip())
    except UnicodeDecodeError:
        return False


def stream_digest(uri: str, s3: S3Config, rotation: int) -> str:
    """sha256 of the first video stream's coded pictures: codec, extradata, size, rotation, then every
    packet's payload in decode order. Two files with the same value decode to the same frames (a
    remux: another container or metadata, the same packets), whatever their bytes. A demux, no decode."""
    import hashlib

    h = hashlib.sha256()
    with av.open(open_uri(uri, s3), metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        ctx = stream.codec_context
        h.update(f"{ctx.name}:{ctx.width}x{ctx.height}:{rotation}:".encode())
        h.update(bytes(ctx.extradata or b""))
        for packet in container.demux(stream):
            if packet.size:
                h.update(packet.size.to_bytes(8, "little"))
                h.update(bytes(packet))
    return h.hexdigest()


def probe(uri: str, cfg: ProbeConfig, s3: S3Config) -> dict:
    """Probe `uri`. Returns the sources.parquet fields; raises ProbeError with a readable reason."""
    digest, digest_kind, size = digest_source(uri, s3)
    info = {"uri": uri, "digest": digest, "digest_kind": digest_kind, "size_bytes": size}
    if size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        # max_pixels at open: probing decodes a frame, and a header claiming 15360x8640 costs
        # hundreds of MB before any check of ours could run (measured: +325 MB; +700 MB for a PNG)
        container = av.open(open_uri(uri, s3), metadata_errors="ignore",
                            options={"max_pixels": str(cfg.max_pixels)})
    except av.error.FFmpegError as err:
        if _looks_like_text(uri, s3):
            raise ProbeError(f"a text file named {Path(uri).suffix or 'without extension'}, not a video") from None
        raise ProbeError(f"not a readable media file ({err.strerror or err}); "
                         "truncated, missing its index (moov atom) or not a video") from None
    with container:
        fmt = container.format.name
        ext = Path(uri).suffix.lower()
        is_image = fmt in IMAGE_FORMATS
        if is_image and ext not in IMAGE_EXTENSIONS:
            raise ProbeError(f"a still image ({fmt.replace('_pipe', '').upper()}) named {ext or 'without extension'}, "
                             "not a video; rename it with its image extension to curate it as a 1-frame clip")
        if not container.streams.video:
            kind = "audio only" if container.streams.audio else "no streams of any kind"
            raise ProbeError(f"no video stream ({kind})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = ctx.width, ctx.height
        if width <= 0 or height <= 0:
            raise ProbeError(f"video stream has no usable dimensions ({width}x{height}); its header may claim "
                             f"more than probe.max_pixels={cfg.max_pixels}")
        if width * height > cfg.max_pixels:
            raise ProbeError(f"header claims {width}x{height}, above probe.max_pixels={cfg.max_pixels}; "
                             "raise that limit if the file is genuine")
        duration = float(stream.duration * stream.time_base) if stream.duration else (
            container.duration / av.time_base if container.duration else 0.0)
        if duration > cfg.max_duration:
            raise ProbeError(f"duration {duration:.0f}s is above probe.max_duration={cfg.max_duration:.0f}s")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate or Fraction(25)
        stream.thread_type = "AUTO"
        first = None
        try:
            for first in container.decode(stream):
                break
        except av.error.FFmpegError as err:
            raise ProbeError(f"first frame does not decode ({err.strerror or err})") from None
        if first is None:
            raise ProbeError("no decodable video frame")
        rotation = int(first.rotation or 0) % 360
        vfr = False if is_image else _is_vfr(container, stream, cfg.vfr_packets)
        if rotation in (90, 270):
            width, height = height, width
        # Inside the block: closing the container frees its streams, and a field read after that read
        # freed memory (a time base of 'None', in about one run of 100 sources, failed the whole run).
        info.update(
            status="ok", error=None, container=fmt, codec=ctx.name, width=width, height=height,
            rotation=rotation, fps=float(rate), vfr=vfr, duration=duration, pix_fmt=ctx.format.name if ctx.format else None,
            has_audio=bool(container.streams.audio), is_image=is_image, time_base=str(stream.time_base),
        )
    if cfg.stream_digest:
        info["stream_digest"] = stream_digest(uri, s3, rotation)
    return info
