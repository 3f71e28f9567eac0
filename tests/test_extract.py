"""curation.extract on real-footage files with 2 s GOPs and B-frames: which spans are copied,
partly re-encoded or re-encoded whole, and that every clip decodes to exactly its span's frames,
bit-identical wherever packets were copied."""

from __future__ import annotations

import av
import numpy as np
import pytest

from curation.extract import extract_clip
from curation.settings import ExtractConfig
from spacetime.standins import testmedia as tm
from spacetime.store import Store

GOP = 50  # frames (2 s at 25 fps); x264 veryfast also uses B-frames, so spans end inside B-groups


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gop2s")
    h264 = folder / "gop2s.mp4"
    tm.make_multishot(h264, options={"preset": "veryfast", "crf": "20", "g": str(GOP), "keyint_min": str(GOP),
                                     "sc_threshold": "0"})  # keyframes every 50 frames only
    hevc = folder / "gop2s_hevc10.mp4"
    tm.transcode(h264, hevc, "libx265", "yuv420p10le",
                 {"preset": "ultrafast", "x265-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0:open-gop=0:log-level=error"})  # closed GOPs
    return {"h264": h264, "hevc": hevc}


def _frames(path, fmt="rgb24"):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        decoded = list(c.decode(stream))
        keys = [i for i, f in enumerate(decoded) if f.key_frame]
        return [f.pts for f in decoded], [f.to_ndarray(format=fmt).astype(np.int16) for f in decoded], keys, \
            stream.codec_context.name, float(stream.average_rate)


def _extract(path, a, b, tmp_path, name, source=None, **cfg):
    pts, frames, keys, codec, fps = _frames(path)
    clip = dict(start_pts=pts[a], end_pts=pts[b] if b < len(pts) else None, num_frames=b - a, fps=fps,
                rotation=0, crop=None)
    source = dict({"uri": str(path), "codec": codec}, **(source or {}))
    fields = extract_clip(clip, source, ExtractConfig(crf=20, **cfg), source_s3(), Store(str(tmp_path)), name)
    got = _frames(tmp_path / name)
    return fields, frames[a:b], got, keys


def source_s3():
    from spacetime.config import S3Config

    return S3Config()


def _errors(reference, got):
    return [float(np.abs(g - r).mean()) for r, g in zip(reference, got)]


def test_a_span_from_a_keyframe_to_a_clean_end_is_copied_bit_exact(media, tmp_path):
    # Frames 0-49 are one closed GOP: nothing after it in decode order is shown inside it.
    fields, reference, (_, got, keys, _, _), _ = _extract(media["h264"], 0, GOP, tmp_path, "a.mp4")
    assert fields["extract_mode"] == "copy"
    assert len(got) == GOP and _errors(reference, got) == [0.0] * GOP and keys[0] == 0


def test_a_span_off_keyframes_re_encodes_only_its_edges(media, tmp_path):
    """Frames 20-119: the head 20-49 precedes the keyframe at 50; the span ends inside a B-frame
    group, whose forward reference lies past the end. Copying the packets as they are would decode
    those last frames against a missing reference, silently wrong (measured: mean error 7/255)."""
    a, b = 20, 119
    fields, reference, (_, got, keys, codec, _), _ = _extract(media["h264"], a, b, tmp_path, "b.mp4")
    assert fields["extract_mode"] == "partial" and codec == "h264"
    assert len(got) == b - a and keys[0] == 0  # starts on a keyframe of its own
    errors = _errors(reference, got)
    head = GOP - a
    assert max(errors[:head]) < 4.0 and min(errors[:head]) > 0  # re-encoded, close to the source
    copied = [i for i, e in enumerate(errors) if e == 0.0]
    assert copied[0] == head and len(copied) >= 2 * GOP - head - 5  # the rest bit-identical, but a short tail
    assert max(errors) < 4.0  # and the tail re-encoded, not decoded against a missing reference
    again = _extract(media["h264"], a, b, tmp_path, "b2.mp4")[0]
    assert (tmp_path / "b.mp4").read_bytes() == (tmp_path / "b2.mp4").read_bytes() and again == fields


def test_partial_off_or_a_codec_without_edges_re_encodes_the_span_whole(media, tmp_path):
    fields, reference, (_, got, _, _, _), _ = _extract(media["h264"], 20, 119, tmp_path, "c.mp4", partial=False)
    assert fields["extract_mode"] == "reencode" and len(got) == 99 and max(_errors(reference, got)) < 4.0
    # HEVC edges are not re-encoded (parameter sets differ): the whole span is, frame-exact in count
    fields, reference, (_, got, _, codec, _), _ = _extract(media["hevc"], 20, 119, tmp_path, "d.mp4")
    assert fields["extract_mode"] == "reencode" and codec == "h264" and len(got) == 99
    # while an HEVC GOP that starts and ends cleanly is still copied, bit-exact
    fields, reference, (_, got, _, codec, _), _ = _extract(media["hevc"], 0, GOP, tmp_path, "e.mp4")
    assert fields["extract_mode"] == "copy" and codec == "hevc" and _errors(reference, got) == [0.0] * GOP


def test_copy_only_copies_from_the_keyframe_before_the_span_and_the_loader_skips_the_lead(media, tmp_path):
    from training.data.decode import decode_clip

    a, b = 20, 119
    fields, reference, (_, got, keys, codec, _), _ = _extract(media["h264"], a, b, tmp_path, "f.mp4", copy_only=True)
    assert fields["extract_mode"] == "copy_only" and codec == "h264" and keys[0] == 0
    skip = fields["skip_frames"]
    assert skip == a  # the keyframe before the span is frame 0
    assert len(got) >= skip + (b - a) and _errors(reference, got[skip:skip + b - a]) == [0.0] * (b - a)
    exact = _extract(media["h264"], a, b, tmp_path, "g.mp4")[0]
    assert fields["bytes"] > exact["bytes"]  # the lead frames cost storage
    # The loader's decode honours skip_frames: the clip's frames, as read from the source itself.
    data = (tmp_path / "f.mp4").read_bytes()
    clip, _ = decode_clip(data, frames=10, stride=3, target=(160, 120), skip=skip)
    source, _ = decode_clip(media["h264"].read_bytes(), frames=10, stride=3, target=(160, 120), skip=a)
    assert np.array_equal(clip, source)
    # and so does the captioner's (recaption, fine-tuning): the same frames as from the source's span
    from captioner.frames import from_mp4

    video = from_mp4(data, 4, 160 * 120, (skip, b - a))
    assert np.array_equal(video.frames, from_mp4(media["h264"].read_bytes(), 4, 160 * 120, (a, b - a)).frames)
    assert len(video.frames) == 4
    # a span that starts on a keyframe needs no lead
    fields, *_ = _extract(media["h264"], GOP, 2 * GOP - 10, tmp_path, "h.mp4", copy_only=True)
    assert fields["extract_mode"] == "copy_only" and fields["skip_frames"] == 0


@pytest.mark.parametrize("rotation, crop", [(90, None), (270, (8, 4, 100, 61)), (180, (3, 5, 101, 60))])
def test_a_whole_re_encode_is_upright_and_cropped_like_the_source_frames(media, tmp_path, rotation, crop):
    """Rotation and crop act on the YUV planes (no RGB round trip), or through RGB where the crop
    starts on an odd pixel (the last case): either way each frame matches the source frame turned
    upright, cropped and cut to even sizes."""
    from spacetime.frames import upright

    pts, frames, _, codec, fps = _frames(media["h264"])
    a, b = 20, 45
    clip = dict(start_pts=pts[a], end_pts=pts[b], num_frames=b - a, fps=fps, rotation=rotation,
                crop=list(crop) if crop else None)
    fields = extract_clip(clip, {"uri": str(media["h264"]), "codec": codec}, ExtractConfig(crf=20), source_s3(),
                          Store(str(tmp_path)), "r.mp4")
    reference = []
    for frame in frames[a:b]:
        image = upright(frame, rotation)
        if crop:
            x, y, w, h = crop
            image = image[y:y + h, x:x + w]
        reference.append(image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2])
    got = _frames(tmp_path / "r.mp4")[1]
    assert fields["extract_mode"] == "reencode" and len(got) == b - a
    assert (fields["height"], fields["width"]) == reference[0].shape[:2] == got[0].shape[:2]
    assert max(_errors(reference, got)) < 4.0


def test_the_yuv_path_keeps_the_source_pixels_and_declines_an_odd_crop(media):
    from curation.extract import _yuv420_frame

    with av.open(str(media["h264"])) as c:
        frame = next(c.decode(video=0))
    assert np.array_equal(_yuv420_frame(frame, 0, None).to_ndarray(), frame.to_ndarray())  # no rounding at all
    assert _yuv420_frame(frame, 0, (1, 0, 64, 64)) is None and _yuv420_frame(frame, 0, (2, 4, 64, 64)).height == 64
    odd = av.VideoFrame(321, 240, "yuv420p")  # its chroma is 161 wide: rotated, it would shift by a pixel
    assert _yuv420_frame(odd, 90, None) is None and _yuv420_frame(odd, 0, None).width == 320


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_the_strict_check_counts_every_frame_and_fails_damaged_packets(media, tmp_path, codec):
    """The decode that vets a copied clip skips the deblocking filter (it never looks at pixels): it
    must still count every frame, and still fail on damaged packets, wherever they are."""
    from curation.extract import _count_frames_strict

    fields, _, (pts, *_), _ = _extract(media[codec], 0, GOP, tmp_path, "whole.mp4")
    assert fields["extract_mode"] == "copy" and _count_frames_strict(tmp_path / "whole.mp4") == len(pts) == GOP
    data = (tmp_path / "whole.mp4").read_bytes()
    for at in (0.3, 0.5, 0.8):
        start = int(len(data) * at)
        (tmp_path / "damaged.mp4").write_bytes(data[:start] + bytes(2000) + data[start + 2000:])
        assert _count_frames_strict(tmp_path / "damaged.mp4") == -1, at


CLEAN_MP4 = {"decode_errors": 0, "container": "mov,mp4,m4a,3gp,3g2,mj2"}  # what the probe and analysis record


@pytest.fixture
def strict_decodes(monkeypatch):
    """Counts the strict decodes extract_clip runs (the real function still runs)."""
    import curation.extract as extract

    calls, real = [], extract._count_frames_strict
    monkeypatch.setattr(extract, "_count_frames_strict", lambda path: calls.append(path) or real(path))
    return calls


@pytest.mark.parametrize("codec", ["h264", "hevc"])
def test_a_copy_of_a_clean_source_is_proven_by_its_container_not_decoded(media, tmp_path, strict_decodes, codec):
    """The analysis decoded every packet of the source without an error: a copy that demuxes to
    exactly the planned packets needs no decode, and is still bit-identical."""
    fields, reference, (_, got, _, _, _), _ = _extract(media[codec], 0, GOP, tmp_path, "a.mp4", source=CLEAN_MP4)
    assert fields["extract_mode"] == "copy" and _errors(reference, got) == [0.0] * GOP
    assert strict_decodes == []
    fields = _extract(media["h264"], 20, 119, tmp_path, "b.mp4", source=CLEAN_MP4, copy_only=True)[0]
    assert fields["extract_mode"] == "copy_only" and fields["skip_frames"] == 20 and strict_decodes == []
    # what the container cannot prove is decoded: the joins of a partial copy, and a source not known clean
    assert _extract(media["h264"], 20, 119, tmp_path, "c.mp4", source=CLEAN_MP4)[0]["extract_mode"] == "partial"
    assert len(strict_decodes) == 1
    for unknown in ({"container": CLEAN_MP4["container"]}, dict(CLEAN_MP4, container="matroska,webm")):
        assert _extract(media[codec], 0, GOP, tmp_path, "d.mp4", source=unknown)[0]["extract_mode"] == "copy"
    assert len(strict_decodes) == 3


def test_the_container_proof_is_a_proof_of_the_packets(media, tmp_path):
    """A file that does not demux to the planned packets (one payload byte changed, one packet
    missing, or not starting on a keyframe) is not proven."""
    from curation.extract import _demuxes_to, _signature

    _extract(media["h264"], 0, GOP, tmp_path, "a.mp4", source=CLEAN_MP4)
    with av.open(str(tmp_path / "a.mp4")) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size]
        signature = _signature(packets)
        assert _demuxes_to(tmp_path / "a.mp4", signature)
        assert not _demuxes_to(tmp_path / "a.mp4", signature[:-1])
        assert not _demuxes_to(tmp_path / "a.mp4", signature[1:])  # starts on a B-frame, the keyframe gone
        changed = [(bytes([signature[3][0][0] ^ 1]) + signature[3][0][1:],) + signature[3][1:]]
        assert not _demuxes_to(tmp_path / "a.mp4", signature[:3] + changed + signature[4:])


def test_a_damaged_source_is_decoded_and_its_damaged_clip_fails(media, tmp_path, strict_decodes):
    """Packets of the first GOP damaged: the analysis counts the damage, so a copy of that span is
    decoded, fails the strict check, and the clip fails as it did before the container proof (never
    a damaged copy in a shard). Told falsely that the source is clean, the container would pass it:
    the analysis' count is what the proof rests on."""
    from curation.analyze import analyze
    from curation.probe import probe
    from curation.settings import AnalyzeConfig, ProbeConfig

    data = media["h264"].read_bytes()
    with av.open(str(media["h264"])) as c:
        at = [p.pos for p in c.demux(c.streams.video[0]) if p.size][10]
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(data[:at] + bytes(2000) + data[at + 2000:])
    source = probe(str(damaged), ProbeConfig(), source_s3())
    final = list(analyze(source, AnalyzeConfig(detector="content"), source_s3(), 10 * GOP))[-1]
    assert final["decode_errors"] > 0
    truth = dict(container=source["container"], decode_errors=final["decode_errors"])
    clip_pts = _frames(media["h264"])[0]
    clip = dict(start_pts=clip_pts[0], end_pts=clip_pts[GOP], num_frames=GOP, fps=25.0, rotation=0, crop=None)
    with pytest.raises(RuntimeError, match="decoded"):
        extract_clip(clip, dict(truth, uri=str(damaged), codec="h264"), ExtractConfig(), source_s3(),
                     Store(str(tmp_path)), "damaged_clip.mp4")
    assert strict_decodes  # the copy was decoded, and refused
    lied = extract_clip(clip, dict(truth, uri=str(damaged), codec="h264", decode_errors=0), ExtractConfig(),
                        source_s3(), Store(str(tmp_path)), "lied.mp4")
    assert lied["extract_mode"] == "copy"
