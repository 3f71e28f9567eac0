"""Stage 5, extract: each surviving clip at native resolution, frame-exact.

- Copy (`copy`): the span's packets, when they decode to exactly its frames and the clip needs no
  rotation or crop. H.264 spans that do not start on a keyframe (or end inside a B-frame group) are
  copied from their first keyframe on, and only the frames around that run are re-encoded
  (`partial`; see copy_span). The result is checked (see `_verified`): by its container alone when
  that proves it, else by a strict decode.
- Otherwise re-encode the whole span (`reencode`: extract.codec, CRF/preset from config) with a fixed
  thread count, so the same clip always gives the same bytes. Pixels are rotated upright (display
  matrix applied) and the crop box (borders filter) applied; no resize. yuv420p needs even sizes: an
  odd last row/column is cut. Re-encoded clips are constant frame rate at the source's average rate.
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
    must not reach a shard: it is re-encoded from what decodes instead). The pictures are not looked
    at, so the decoder skips its deblocking filter: the same frames and errors, 24% less time on the
    clips of benchmarks/curation_vs_decode.py (2.75 -> 2.08 s for 36 clips, 1628 frames)."""
    try:
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            stream.codec_context.options = {"skip_loop_filter": "all"}
            return sum(1 for _ in c.decode(stream))
    except av.error.FFmpegError:
        return -1


# --- verifying a copy without decoding it --------------------------------------------------------
# A copy is the source's own packets from a keyframe on, in decode order. If the analysis decoded every
# packet of the source without an error (source["decode_errors"] == 0: curation.analyze counts them), and
# the file demuxes to exactly the planned packets (the same payloads, in the same order, with the same
# relative timestamps, the first a keyframe: an MP4 sync sample, a random access point), it decodes to
# the span's frames as the source did: no decode is needed to know it. What the container cannot prove
# is still decoded: a source with damaged packets (the damage may fall in the span), a container whose
# keyframe flags are not sync samples, and a `partial` copy (its joins to the re-encoded edges).
PROVING_CONTAINERS = ("mov", "mp4")  # PyAV format names are lists: "mov,mp4,m4a,3gp,3g2,mj2"


def proves_copies(source: dict) -> bool:
    """Whether a copy of `source`'s packets may be verified by its container alone (see above)."""
    return source.get("decode_errors") == 0 and \
        any(name in PROVING_CONTAINERS for name in str(source.get("container") or "").split(","))


def _signature(packets: list[av.Packet]) -> list[tuple]:
    """What a file holding `packets` must demux to: payload, keyframe flag, PTS and DTS relative to
    the first packet's DTS (a muxer may move all timestamps by one offset)."""
    base = packets[0].dts if packets and packets[0].dts is not None else 0
    return [(bytes(p), bool(p.is_keyframe), p.pts - base, None if p.dts is None else p.dts - base) for p in packets]


def _demuxes_to(path: Path, signature: list[tuple]) -> bool:
    """Whether the file at `path` holds exactly the packets of `signature`, the first a keyframe. A
    demux: no decode."""
    if not signature or not signature[0][1]:
        return False
    try:
        with av.open(str(path)) as c:
            return _signature([p for p in c.demux(c.streams.video[0]) if p.size]) == signature
    except av.error.FFmpegError:
        return False


def _verified(out: Path, signature: list[tuple] | None, frames: int) -> bool:
    """The copy at `out` shows at least `frames` frames: proven by its container when `signature` is
    given (a copy that proves_copies), else counted by a strict decode."""
    if signature is not None:
        return _demuxes_to(out, signature)
    return _count_frames_strict(out) >= frames


# --- copy, re-encoding only the edges ----------------------------------------------------------
# A span is copied as the longest run of source packets, in decode order from the span's first
# keyframe, that displays a contiguous part of the span and nothing outside it. Any prefix of the
# decode order from a closed-GOP keyframe holds every reference its frames use, so this run decodes
# exactly as in the source: bit-identical frames. The span's frames before that keyframe (the head)
# and after the run's last frame (the tail: B-frames whose forward reference lies past the span end)
# are re-encoded. An MP4 track has one sample description, so every part must decode under one avcC:
# the edges are encoded with their own SPS/PPS ids (x264 `sps-id`) and the avcC lists both parameter
# sets (it holds arrays of them); every slice names its PPS. Edges are H.264 only (other codecs are
# copied when no edge needs encoding). Edges have no B-frames and their DTS are shifted by the
# source's reorder delay, which keeps DTS increasing across both joins.


def _nals(annexb: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes removed)."""
    starts, i = [], 0
    while (j := annexb.find(b"\x00\x00\x01", i)) >= 0:
        starts.append(j + 3)
        i = j + 3
    nals = []
    for k, a in enumerate(starts):
        last = k + 1 == len(starts)
        nal = annexb[a:] if last else annexb[a:starts[k + 1] - 3]
        nals.append(nal if last else nal.rstrip(b"\x00"))  # a 4-byte start code's leading zero
    return nals


def _length_prefixed(annexb: bytes) -> bytes:
    """Annex-B (what libx264 outputs) to MP4's 4-byte length-prefixed NAL units."""
    return b"".join(len(nal).to_bytes(4, "big") + nal for nal in _nals(annexb))


def _parameter_set_id(nal: bytes) -> int:
    """The id of an SPS or PPS NAL unit: its first Exp-Golomb field (in an SPS, after the profile,
    constraint and level bytes)."""
    skip = 4 if nal[0] & 0x1F == 7 else 1
    bits = "".join(f"{b:08b}" for b in nal[skip:skip + 8])
    zeros = bits.index("1")
    return int(bits[zeros:2 * zeros + 1], 2) - 1


def _parse_avcc(avcc: bytes) -> tuple[bytes, list[bytes], list[bytes], bytes]:
    """(5 header bytes, SPS list, PPS list, trailing bytes) of an AVCDecoderConfigurationRecord."""
    if len(avcc) < 7 or avcc[0] != 1:
        raise ValueError("not an avcC record")
    pos, sets = 5, ([], [])
    for kind in (0, 1):
        count = avcc[pos] & (0x1F if kind == 0 else 0xFF)
        pos += 1
        for _ in range(count):
            size = int.from_bytes(avcc[pos:pos + 2], "big")
            sets[kind].append(avcc[pos + 2:pos + 2 + size])
            pos += 2 + size
    return avcc[:5], sets[0], sets[1], avcc[pos:]


def _merged_avcc(avcc: bytes, sps: list[bytes], pps: list[bytes]) -> bytes:
    """`avcc` with more parameter sets listed."""
    header, old_sps, old_pps, tail = _parse_avcc(avcc)
    out = bytearray(header)
    for kind, nals in enumerate((old_sps + sps, old_pps + pps)):
        out.append(0xE0 | len(nals) if kind == 0 else len(nals))
        for nal in nals:
            out += len(nal).to_bytes(2, "big") + nal
    return bytes(out + tail)


def _in_span(pts: int | None, clip: dict) -> bool:
    return pts is not None and pts >= clip["start_pts"] and (clip["end_pts"] is None or pts < clip["end_pts"])


def _packets_through_span(src, stream, clip: dict) -> list[av.Packet]:
    """Packets in decode order from the keyframe at or before the span's start up to the first
    whose DTS is past the span (DTS <= PTS: by then every frame of the span is in)."""
    packets = []
    src.seek(clip["start_pts"], stream=stream, backward=True, any_frame=False)
    for packet in src.demux(stream):
        if packet.dts is None and packet.pts is None:
            continue
        if clip["end_pts"] is not None and packet.dts is not None and packet.dts >= clip["end_pts"]:
            break
        packets.append(packet)
    return packets


def _mux_shifted(out: Path, stream, packets: list[av.Packet], offset: int, extradata: bytes | None = None) -> list[tuple]:
    """`packets` into an MP4 at `out`, their timestamps moved back by `offset`, in the source
    stream's format (with `extradata` instead of its own, if given). Returns their _signature."""
    signature = _signature(packets)
    with av.open(str(out), "w", format="mp4") as dst:
        ostream = dst.add_stream_from_template(stream)
        if extradata is not None:
            ostream.codec_context.extradata = extradata
        for packet in packets:
            packet.pts -= offset
            if packet.dts is not None:
                packet.dts -= offset
            packet.stream = ostream
            dst.mux(packet)
    return signature


def _copy_plan(src, stream, clip: dict) -> tuple[list[int], list[av.Packet]] | None:
    """(the span's frame PTS in display order, the packets to copy), or None when the span's
    frames are not all found or it holds no keyframe."""
    packets = _packets_through_span(src, stream, clip)
    span = sorted(p.pts for p in packets if _in_span(p.pts, clip))
    first = next((i for i, p in enumerate(packets) if p.is_keyframe and _in_span(p.pts, clip)), None)
    if len(span) != clip["num_frames"] or first is None:
        return None
    index = {pts: i for i, pts in enumerate(span)}
    start = index[packets[first].pts]
    run, best, top = [], 0, start - 1
    for packet in packets[first:]:
        if not _in_span(packet.pts, clip) or index[packet.pts] < start:
            break  # shown outside the span, or before the keyframe (an open GOP's leading picture)
        run.append(packet)
        top = max(top, index[packet.pts])
        if top - start + 1 == len(run):  # the run so far shows span[start:top + 1], none missing
            best = len(run)
    return span, run[:best]


def _encode_edge(src, stream, first_pts: int, last_pts: int, sps_id: int, cfg: ExtractConfig):
    """The source frames with first_pts <= PTS <= last_pts, re-encoded (libx264, no B-frames,
    parameter sets numbered `sps_id`): (packets, extradata in Annex-B)."""
    ctx = stream.codec_context
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = ctx.width, ctx.height, "yuv420p"
    enc.time_base, enc.framerate = stream.time_base, stream.average_rate
    enc.flags |= av.codec.context.Flags.global_header  # parameter sets in extradata, not in packets
    options = x264_options(cfg)
    enc.options = dict(options, **{"x264-params": options["x264-params"] + f":sps-id={sps_id}:bframes=0"})
    packets = []
    src.seek(first_pts, stream=stream, backward=True, any_frame=False)
    for frame in decode_all(src, stream):
        if frame.pts is None or frame.pts < first_pts:
            continue
        if frame.pts > last_pts:
            break
        fresh = av.VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)  # no picture type
        fresh.pts, fresh.time_base = frame.pts, frame.time_base
        packets.extend(enc.encode(fresh))
    packets.extend(enc.encode(None))
    return packets, bytes(enc.extradata)


def copy_span(uri: str, s3: S3Config, clip: dict, cfg: ExtractConfig, out: Path, proven: bool = False) -> str | None:
    """Copy the span's packets, re-encoding only its edges (see above). Returns "copy" (nothing
    re-encoded) or "partial" once the result is verified to show exactly the span's frames (`proven`:
    a "copy" by its container, see proves_copies; else by a strict decode); None when this cannot
    give a valid clip (the caller re-encodes it whole)."""
    with av.open(open_uri(uri, s3), metadata_errors="ignore") as src:
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        plan = _copy_plan(src, stream, clip)
        if plan is None or not plan[1]:
            return None
        span, run = plan
        shown = sorted(p.pts for p in run)
        head, tail = span[:span.index(shown[0])], span[span.index(shown[-1]) + 1:]
        ctx, extradata = stream.codec_context, bytes(stream.codec_context.extradata or b"")
        encoded: tuple[list, list] = ([], [])
        if head or tail:
            if not cfg.partial or ctx.name != "h264" or ctx.pix_fmt != "yuv420p" or not extradata.startswith(b"\x01") \
                    or extradata[4] & 0x03 != 3:
                return None  # edges only for 8-bit 4:2:0 H.264 in avcC with 4-byte NAL lengths
            _, sps, pps, _ = _parse_avcc(extradata)
            sps_id = max(_parameter_set_id(n) for n in sps + pps) + 1
            if sps_id > 31:
                return None
            edges = [_encode_edge(src, stream, part[0], part[-1], sps_id, cfg) for part in (head, tail) if part]
            if len({x for _, x in edges}) != 1:  # both edges must share one set of parameter sets
                return None
            nals = _nals(edges[0][1])
            extradata = _merged_avcc(extradata, [n for n in nals if n[0] & 0x1F == 7], [n for n in nals if n[0] & 0x1F == 8])
            encoded = (edges[0][0] if head else [], edges[-1][0] if tail else [])
        delay = run[0].pts - run[0].dts if run[0].dts is not None else 0  # the source's reorder delay

        def for_mp4(packet: av.Packet) -> av.Packet:  # an edge's packet, in the copied stream's form
            data = av.Packet(_length_prefixed(bytes(packet)))
            data.pts, data.dts = packet.pts, packet.pts - delay
            data.time_base, data.is_keyframe = stream.time_base, packet.is_keyframe
            return data

        signature = _mux_shifted(out, stream, [for_mp4(p) for p in encoded[0]] + run + [for_mp4(p) for p in encoded[1]],
                                 clip["start_pts"], extradata)
    partial = bool(head or tail)
    if proven and not partial:  # the run shows exactly the span (_copy_plan): the container proves the rest
        return "copy" if _verified(out, signature, clip["num_frames"]) else None
    return ("partial" if partial else "copy") if _count_frames_strict(out) == clip["num_frames"] else None


def copy_from_keyframe(uri: str, s3: S3Config, clip: dict, out: Path, proven: bool = False) -> int | None:
    """extract.copy_only: the packets in decode order from the keyframe at or before the span's start
    up to the first whose DTS is past the span (by then every frame of the span is in), less an open
    GOP's leading pictures (shown before that keyframe). The file shows the frames from the keyframe
    to the span start, the span, then possibly a few reference frames past its end. Returns how many
    come before the span (skip_frames), once verified (by the container when `proven`, see
    proves_copies; else by a strict decode); None when no valid copy exists."""
    with av.open(open_uri(uri, s3), metadata_errors="ignore") as src:
        stream = src.streams.video[0]
        run: list[av.Packet] = []
        for packet in _packets_through_span(src, stream, clip):
            if packet.pts is None:
                continue
            if not run and not packet.is_keyframe:
                return None  # the seek did not land on a keyframe
            if not run or packet.pts >= run[0].pts:
                run.append(packet)
        if not run or run[0].pts > clip["start_pts"]:
            return None
        first = run[0].pts
        if sum(1 for p in run if _in_span(p.pts, clip)) != clip["num_frames"]:
            return None
        skip = sum(1 for p in run if p.pts < clip["start_pts"])
        signature = _mux_shifted(out, stream, run, first)
    return skip if _verified(out, signature if proven else None, skip + clip["num_frames"]) else None


def x264_options(cfg: ExtractConfig) -> dict[str, str]:
    """Options that make the same clip encode to the same bytes, run after run, on any machine.

    - `threads` fixed: x264's default depends on the machine's cores and output depends on it
      (PyAV's codec_context.thread_count does not reach x264; its own option does).
    - `mbtree=0`: with the macroblock-tree lookahead on, identical frames encoded with identical
      settings sporadically gave different bytes (measured: 2 distinct outputs in 12 encodes with
      threads=1; 1 in 16+ with mbtree=0 or asm=0). The cost is a few percent of bitrate at equal CRF.
    """
    return {"crf": str(cfg.crf), "preset": cfg.preset, "threads": str(cfg.threads), "x264-params": "mbtree=0"}


def _yuv420_frame(frame: av.VideoFrame, rotation: int, crop: tuple[int, int, int, int] | None) -> av.VideoFrame | None:
    """The frame upright, cropped and cut to even sizes without leaving YUV 4:2:0: each plane is
    rotated and cut on its own. Through RGB, the two colour conversions cost ~14 of the ~64 ms a 1080p
    frame took to re-encode (veryfast, 2 threads), and rounded every pixel twice. None where the chroma
    grid would not stay aligned with the luma (a crop starting on an odd row or column; a rotation of
    a frame with an odd side, whose half-size chroma plane rounds up): the caller goes through RGB."""
    if (crop and (crop[0] % 2 or crop[1] % 2)) or (rotation % 360 and (frame.width % 2 or frame.height % 2)):
        return None
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")  # 10-bit, 4:2:2, full range: one conversion
    planes = [upright(np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width], rotation)
              for p in frame.planes]
    if crop:
        x, y, w, h = crop
        planes = [planes[0][y:y + h, x:x + w]] + [p[y // 2:(y + h + 1) // 2, x // 2:(x + w + 1) // 2] for p in planes[1:]]
    h, w = planes[0].shape[0] // 2 * 2, planes[0].shape[1] // 2 * 2
    if not (h and w):
        return None
    out = av.VideoFrame(w, h, "yuv420p")
    for plane, src in zip(out.planes, (planes[0][:h, :w], planes[1][:h // 2, :w // 2], planes[2][:h // 2, :w // 2])):
        np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width] = src
    return out


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
                out_frame = _yuv420_frame(frame, rotation, crop) if cfg.pix_fmt == "yuv420p" else None
                if out_frame is None:  # another output format, or a crop at an odd offset: through RGB
                    image = upright(frame.to_ndarray(format="rgb24"), rotation)
                    if crop:
                        x, y, w, h = crop
                        image = image[y:y + h, x:x + w]
                    image = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
                    out_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                if ostream is None:
                    ostream = dst.add_stream(cfg.codec, rate=rate)
                    ostream.width, ostream.height = out_frame.width, out_frame.height
                    ostream.pix_fmt = cfg.pix_fmt
                    ostream.options = x264_options(cfg) if cfg.codec == "libx264" else {"crf": str(cfg.crf)}
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
    skip = 0
    with store.writing(rel, unique=True) as tmp:  # a duplicate source may extract the same clip at once
        copyable = not clip["rotation"] and crop is None and source["codec"] in COPYABLE_CODECS \
            and not source.get("is_image")
        proven = proves_copies(source)
        if cfg.copy_only and copyable:
            try:
                found = copy_from_keyframe(source["uri"], s3, clip, tmp, proven)
            except (av.error.FFmpegError, ValueError):
                found = None
            if found is not None:
                mode, skip = "copy_only", found
        if mode is None and cfg.stream_copy and copyable:
            try:
                mode = copy_span(source["uri"], s3, clip, cfg, tmp, proven)
            except (av.error.FFmpegError, ValueError):  # e.g. DTS the muxer refuses: re-encode instead
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
    return {"extract_mode": mode, "skip_frames": skip, "width": width, "height": height, "bytes": size}
