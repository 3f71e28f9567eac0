"""Quality filters with the default thresholds on labelled generated clips, calibration, report."""

import csv
import io
import json
import re
import subprocess
import sys

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from spacetime import contract
from spacetime.standins import testmedia as tm
from curation.filters import border_box, native_crop
from curation.pipeline import run_curation
from curation.settings import BordersConfig
from tests.helpers import ROOT, start_local_ray
from tests.test_curate import tiny_config

# name -> (generator, expected fate: "kept" or the rejecting filter)
LABELLED = {
    "static.mp4": (lambda p: tm.make_static(p, num_frames=50), "motion"),
    "moving.mp4": (lambda p: tm.make_moving(p, num_frames=50), "kept"),
    "letterboxed.mp4": (lambda p: tm.make_letterboxed(p, num_frames=50), "kept"),
    "pillarboxed.mp4": (lambda p: tm.make_pillarboxed(p, num_frames=50), "kept"),
    # real footage with text burned in: subtitles are cropped away (kept), a caption mid-picture rejects
    "subtitled.mp4": (lambda p: tm.make_subtitled(p, "bigbuckbunny.mp4"), "kept"),
    "captioned.mp4": (lambda p: tm.make_subtitled(p, "carphone_pristine.mp4", 0.12, where="centre"), "text"),
}


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    root = tmp_path_factory.mktemp("filters")
    media = root / "media"
    media.mkdir()
    truth = {name: make(media / name) for name, (make, _) in LABELLED.items()}
    sharp, blurred = tm.make_blur_pair(media / "blur", num_frames=40, source=tm.Segment("bikes.mp4", 140, 40))
    good, dark = tm.make_exposure_pair(media / "exposure", num_frames=40,
                                       source=tm.Segment("bigbuckbunny.mp4", 20, 40))
    pairs = {"sharp": (sharp, "kept"), "blurred": (blurred, "sharpness"),
             "well_exposed": (good, "kept"), "dark": (dark, "exposure")}
    start_local_ray()
    out = root / "out"
    inputs = [str(media)] + [str(gt.path) for gt, _ in pairs.values()]
    run_curation(inputs, str(out), tiny_config(caption="null"))
    clips = {c["source_uri"]: c for c in pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist()}
    expected = {str((media / n).resolve()): fate for n, (_, fate) in LABELLED.items()}
    expected.update({str(gt.path.resolve()): fate for gt, fate in pairs.values()})
    return {"out": out, "clips": clips, "expected": expected, "truth": truth}


def test_default_thresholds_separate_labelled_clips(filtered):
    assert set(filtered["clips"]) == set(filtered["expected"])
    for uri, fate in filtered["expected"].items():
        clip = filtered["clips"][uri]
        got = "kept" if clip["status"] == "kept" else (clip["reason"] or "").split(":")[0]
        assert got == fate, f"{uri}: expected {fate}, got {clip['status']} ({clip['reason']})"


def test_every_clip_is_scored_kept_or_not(filtered):
    for uri, clip in filtered["clips"].items():
        scores = contract.scores_of(clip["scores"])
        for key in ("picture_area", "luma_mean", "luma_clipped", "sharpness", "motion", "shake", "aesthetic"):
            assert key in scores, (uri, key)
        assert 1.0 <= scores["aesthetic"] <= 10.0


@pytest.mark.parametrize("name,bar_axis", [("letterboxed.mp4", "height"), ("pillarboxed.mp4", "width")])
def test_bars_are_cropped_from_shards(filtered, name, bar_axis):
    gt = filtered["truth"][name]
    x0, y0, x1, y1 = gt.content_box
    clip = next(c for u, c in filtered["clips"].items() if u.endswith(name))
    assert clip["status"] == "kept"
    index = {r["key"]: r for r in pq.read_table(filtered["out"] / contract.INDEX_PATH).to_pylist()}
    row = index[clip["clip_id"]]
    # the picture without its bars, give or take the 2-px rounding to even sizes
    assert abs(row["width"] - (x1 - x0)) <= 4 and abs(row["height"] - (y1 - y0)) <= 4
    assert (row["height"] < gt.size[1]) if bar_axis == "height" else (row["width"] < gt.size[0])
    sample = next(s for s in wds.WebDataset(str(filtered["out"] / row["shard"]), shardshuffle=False)
                  if s["__key__"] == row["key"])
    with av.open(io.BytesIO(sample["mp4"])) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="gray")
    assert frame[:2].mean() > 24 and frame[-2:].mean() > 24  # no black rows left at the edges
    assert frame[:, :2].mean() > 24 and frame[:, -2:].mean() > 24


def test_subtitle_band_is_cropped_and_its_text_recorded(filtered):
    """Real PP-OCR on real footage: the subtitle band is cut from the stored clip (crop below the
    subtitles' top), the words read are in the record, and clean footage scores no text."""
    uri = str(filtered["truth"]["subtitled.mp4"].path.resolve())
    clip = filtered["clips"][uri]
    width, height = filtered["truth"]["subtitled.mp4"].size
    scores = contract.scores_of(clip["scores"])
    assert scores["text_area"] > 0.01 and scores["text_band"] > 0
    x, y, w, h = _record(filtered["out"], clip)["crop"]
    assert (x, y, w) == (0, 0, width) and 0.75 * height <= h <= 0.93 * height  # subtitles sit 7-13% up
    words = set(re.findall(r"[a-z]+", (clip["ocr_text"] or "").lower()))
    assert len(words & set(re.findall(r"[a-z]+", " ".join(tm.SUBTITLES).lower()))) >= 2, clip["ocr_text"]
    for name in ("moving.mp4", "letterboxed.mp4"):
        clean = filtered["clips"][str(filtered["truth"][name].path.resolve())]
        assert contract.scores_of(clean["scores"])["text_area"] == 0.0 and clean["ocr_text"] is None
    captioned = filtered["clips"][str(filtered["truth"]["captioned.mp4"].path.resolve())]
    assert "filters.text.max_area" in captioned["reason"] and "news" in captioned["ocr_text"].lower()


def _record(out, clip) -> dict:
    """The <key>.json the writer put in the clip's shard."""
    for sample in wds.WebDataset(str(out / clip["shard"]), shardshuffle=False):
        if sample["__key__"] == clip["clip_id"]:
            return json.loads(sample["json"])
    raise AssertionError(f"{clip['clip_id']} not in {clip['shard']}")


def test_border_box_needs_bands_stable_over_frames():
    frames = np.full((3, 100, 160, 3), 120, np.uint8)
    frames[:, :10] = 0
    frames[:, 90:] = 0
    assert border_box(frames, BordersConfig()) == (0, 10, 160, 80)
    frames[1, :10] = 200  # the top band lights up in one frame: it is picture, not a bar
    assert border_box(frames, BordersConfig()) == (0, 0, 160, 90)
    assert native_crop((0, 10, 160, 80), (160, 100), (1920, 1200)) == [0, 120, 1920, 960]


def test_calibrate_finds_a_separating_threshold(filtered, tmp_path):
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip_id", "bad"])
        for uri, fate in filtered["expected"].items():
            if fate in ("kept", "sharpness"):  # blurred vs good clips (dark ones have low contrast too)
                writer.writerow([filtered["clips"][uri]["clip_id"], int(fate == "sharpness")])
    plot = tmp_path / "pr.png"
    out = subprocess.run([sys.executable, "-m", "spacetime", "calibrate", "sharpness", "--manifest",
                          str(filtered["out"] / contract.CLIPS_MANIFEST), "--labels", str(labels),
                          "--target-precision", "1.0", "--plot", str(plot)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("threshold for precision"))
    assert "precision 1.000, recall 1.000" in line
    threshold = float(line.split(":")[1].split()[0])
    blurred = contract.scores_of(next(c for u, c in filtered["clips"].items() if "blur" in u and
                                      filtered["expected"][u] == "sharpness")["scores"])["sharpness"]
    assert threshold > blurred
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_loads_in_chromium_with_all_images(filtered, tmp_path):
    from tests.browser import Page

    index = filtered["out"] / contract.REPORT_DIR / "index.html"
    page = Page(index.as_uri())
    try:
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        shot = page.screenshot(tmp_path / "report.png")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    finally:
        page.close()
    assert not page.errors, page.errors
    assert len(images) >= 10 and all(ok for _, ok in images), [src for src, ok in images if not ok]
    assert any(src.startswith("thumbs/") for src, _ in images) and any(src.startswith("plots/") for src, _ in images)
    for section in ("Funnel", "Buckets", "Errors"):
        assert any(h.startswith(section) for h in headings)
    assert shot.stat().st_size > 10_000


def _sampled_rows(n: int) -> list[tuple[dict, bytes]]:
    """Rows as the filters pass them on: a candidate clip's meta and its sampled frames (real footage,
    encoded by spacetime.frames), each clip a different stretch of the video."""
    from spacetime.frames import encode_frames

    with av.open(str(tm.real_footage("bikes.mp4"))) as container:
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(8 * n), container.decode(video=0))]
    rows = []
    for k in range(n):
        clip = {"clip_id": f"c{k}", "status": "candidate", "scores": {},
                "caption": f"a cyclist {'rides past' if k % 2 else 'waits'} on a city street, filmed in daylight",
                "caption_fields": {"short": "a cyclist on a street"}}
        rows.append(({"clip": clip}, encode_frames(frames[8 * k:8 * k + 8:2])))
    return rows


def test_alignment_is_the_clip_cosine_of_caption_and_frames(tiny_models, monkeypatch):
    """filters.alignment: scores.caption_alignment / short_caption_alignment are the cosine of the CLIP
    text embedding of each caption to the clip's mean frame embedding, computed here independently
    with open_clip; the aesthetic stage's kept embedding gives the same numbers as embedding the frames
    again; a threshold rejects with the score in the reason; no embedding leaves the stage."""
    import copy

    import open_clip
    import torch

    from curation.clip_models import load_clip
    from curation.filters import Aesthetic, Alignment
    from spacetime.frames import decode_frames

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    filters = tiny_config(caption="null").filters
    rows = _sampled_rows(3)
    alone = copy.deepcopy(rows)
    Aesthetic(filters.aesthetic, keep_embedding=True).process(rows)
    assert all(len(meta["clip"]["frame_embedding"]) == tiny_models["clip"]["embed_dim"] for meta, _ in rows)
    text_only = Alignment(filters.alignment, filters.aesthetic, embedded=True)
    assert text_only.model.visual is None  # the aesthetic stage embeds the frames: only the text tower
    batch = {"meta": [json.dumps(m) for m, _ in rows], "sampled": [s for _, s in rows]}
    after = [json.loads(m) for m in text_only(batch)["meta"]]
    assert not any("frame_embedding" in m["clip"] for m in after)
    stage = Alignment(filters.alignment, filters.aesthetic)
    stage.process(alone)  # no aesthetic stage: the frames embedded here
    clip = tiny_models["clip"]
    model, preprocess = load_clip(clip["model_name"], clip["pretrained"], clip["config_dir"])
    tokenizer = open_clip.get_tokenizer(clip["model_name"])
    for meta, (_, sampled), (again, _) in zip(after, rows, alone):
        c = meta["clip"]
        from PIL import Image

        with torch.no_grad():
            frames = decode_frames(sampled)
            image = model.encode_image(torch.stack([preprocess(Image.fromarray(f)) for f in frames[:4]]))
            image = torch.nn.functional.normalize(torch.nn.functional.normalize(image, dim=-1).mean(0), dim=0)
            text = torch.nn.functional.normalize(model.encode_text(tokenizer([c["caption"], "a cyclist on a street"])), dim=-1)
        want = (text @ image).numpy()
        assert c["scores"]["caption_alignment"] == pytest.approx(want[0], abs=2e-4)
        assert c["scores"]["short_caption_alignment"] == pytest.approx(want[1], abs=2e-4)
        assert again["clip"]["scores"] == pytest.approx({k: v for k, v in c["scores"].items() if k != "aesthetic"}, abs=2e-4)
        assert c["status"] == "candidate"
    # a threshold above every score rejects each clip, naming the score and the setting
    strict = Alignment(filters.alignment.model_copy(update={"min_score": 0.999}), filters.aesthetic)
    rows = _sampled_rows(1)
    strict.process(rows)
    clip = rows[0][0]["clip"]
    assert clip["status"] == "rejected"
    assert clip["reason"] == (f"alignment: caption-video similarity {clip['scores']['caption_alignment']:.3f}"
                              " < filters.alignment.min_score=0.999")
    rows = _sampled_rows(1)  # a text-only stage given a clip without the aesthetic stage's embedding
    text_only.process(rows)
    assert rows[0][0]["clip"]["status"] == "failed" and "no frame embedding from the aesthetic stage" in rows[0][0]["clip"]["reason"]
