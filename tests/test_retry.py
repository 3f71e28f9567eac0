"""`spacetime curate --retry-failed` (curation.retry): the failures of the last version run again,
after the cause is fixed, as a new version; what was settled stays, and no shard is rewritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from curation.clip_models import AestheticHead
from curation.completion import CompletionTracker
from curation.pipeline import Analyze, Extract, Probe, Split
from curation.publish import finalize
from curation.retry import Retry, failed_sources, merge, plan_retries, settled_spans
from curation.rundir import RunDir, RunDirError
from curation.settings import CurateConfig
from curation.stage import RETAINED, pack, unpack
from curation.units import write_unit
from curation.versions import Version, VersionLog
from spacetime import contract
from spacetime.config import load_config
from spacetime.standins import testmedia as tm
from spacetime.store import Store
from tests.helpers import CONFIGS, ROOT, curate_cmd


def _rows(cfg: CurateConfig, out: Store, uri: str, retain: list | None = None) -> list[dict]:
    """bikes.mp4's rows through probe, analyze and split, as the pipeline hands them to the filters."""
    s3 = cfg.sources.s3
    first = {"source": {"uri": uri, "status": "pending"}, **({"retain": retain} if retain is not None else {})}
    probed = Probe(cfg.probe, s3, out, None)(pack(first))
    split = Split(cfg.split, cfg.analyze.max_sampled_per_clip)
    return [row for seg in Analyze(cfg.analyze, s3, cfg.split.max_duration)(probed) for row in split(seg)]


def _finish(cfg: CurateConfig, out: Store, rows: list[dict], tracker: CompletionTracker) -> list[dict]:
    """The rows through extraction (no filter: each clip's fate is the test's) into the tracker."""
    extract = Extract(cfg.extract, cfg.sources.s3, out)
    metas = [unpack(extract(row))[0] for row in rows]
    for meta in metas:
        tracker.add(meta)
    return metas


def test_a_partly_failed_source_retried_keeps_its_settled_clips_and_shards(tmp_path):
    """A source with kept, rejected and failed clips, retried: only the failed clip goes through the
    stages again (the others are `retained` at split: no frames ride with them, nothing is extracted
    for them); the merged record holds every clip once, the earlier kept ones in their shard (not
    rewritten) and the retried one in the retry's unit; the published manifests list each clip once."""
    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml")
    uri = str(tm.real_footage("bikes.mp4"))
    out = Store(str(tmp_path / "out"))
    run = RunDir(out)

    # attempt 0: a clip is rejected by a filter, another fails (its score raised), the rest are extracted
    metas = [unpack(r) for r in _rows(cfg, out, uri)]
    candidates = [i for i, (m, _) in enumerate(metas) if m["clip"] and m["clip"]["status"] == "candidate"]
    assert len(candidates) >= 4
    rejected, failed = (metas[i][0]["clip"] for i in candidates[:2])
    rejected.update(status="rejected", reason="motion: static")
    failed.update(status="failed", reason="exposure failed: ValueError: cannot read")
    _finish(cfg, out, [pack(m, s) for m, s in metas], CompletionTracker(run))
    first = run.record(uri)
    fates = {c["clip_id"]: c["status"] for c in first["clips"]}
    assert fates[rejected["clip_id"]] == "rejected" and fates[failed["clip_id"]] == "failed"
    kept_before = sorted(k for k, status in fates.items() if status == "kept")
    assert len(kept_before) == len(candidates) - 2
    commit = write_unit(out, 0, [(uri, 0)], 1 << 30, {})
    shard0 = {p: p.read_bytes() for p in (tmp_path / "out" / contract.SHARDS_DIR).rglob("*.tar")}
    assert commit["samples"] == len(kept_before) and shard0

    # attempt 2 (version 2 retries it): the split marks every clip over settled frames `retained`
    retries = plan_retries([[(uri, 0)], [(uri, 2)]], 2)
    assert retries == {uri: Retry(attempt=2, prior_attempt=0, prior_unit=0)}
    again = _rows(cfg, out, uri, retain=settled_spans(first))
    clips = [(unpack(r)[0]["clip"], r["sampled"]) for r in again if unpack(r)[0]["clip"]]
    assert [c["clip_id"] for c, _ in clips if c["status"] != RETAINED] == [failed["clip_id"]]
    assert all(sampled == b"" for c, sampled in clips if c["status"] == RETAINED)
    tracker = CompletionTracker(run, retries)
    _finish(cfg, out, again, tracker)
    staged = (tmp_path / "out" / contract.WORK_DIR / "clips").glob("*.mp4")
    assert sorted(p.stem for p in staged) == [failed["clip_id"]]  # nothing else was extracted again
    merged = run.record(uri, 2)
    assert run.record(uri) == first  # the earlier attempt's record stays as it was
    by_id = {c["clip_id"]: c for c in merged["clips"]}
    assert sorted(by_id) == sorted(fates) and len(merged["clips"]) == len(by_id)
    assert {k: c["status"] for k, c in by_id.items()} == dict(fates, **{failed["clip_id"]: "kept"})
    assert not by_id[failed["clip_id"]].get("retained") and all(by_id[k]["retained"] for k in kept_before)
    assert merged["source"]["num_kept"] == len(kept_before) + 1
    assert tracker.counts["clips"] == 1 and tracker.counts["retried"] == 1  # this run's work: the one clip

    retry_commit = write_unit(out, 1, [(uri, 2)], 1 << 30, {})
    assert retry_commit["samples"] == 1
    for path, data in shard0.items():
        assert path.read_bytes() == data
    finalize(run, [[(uri, 0)], [(uri, 2)]], 0.0, {}, version=2, retried=1)
    clips_manifest = pq.read_table(tmp_path / "out" / contract.CLIPS_MANIFEST).to_pylist()
    assert sorted(c["clip_id"] for c in clips_manifest) == sorted(by_id)
    index = pq.read_table(tmp_path / "out" / contract.INDEX_PATH).to_pylist()
    kept = {c["clip_id"]: c["shard"] for c in clips_manifest if c["status"] == "kept"}
    assert {r["clip_id"]: r["shard"] for r in index} == kept and len(index) == len(kept)
    tars = sorted(str(p) for p in (tmp_path / "out" / contract.SHARDS_DIR).rglob("*.tar"))
    assert sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)) == sorted(kept)
    assert pq.read_table(tmp_path / "out" / contract.SOURCES_MANIFEST).num_rows == 1
    summary = json.loads((tmp_path / "out" / contract.SUMMARY_PATH).read_text())
    assert summary["clips"]["failed"] == 0 and summary["sources"]["total"] == 1 and summary["retried_sources"] == 1


def test_merge_applies_the_earlier_units_near_duplicates_and_keeps_a_failure_that_fails_again():
    """The earlier attempt's settled clips come with its unit's decisions (a near-duplicate stays
    rejected, naming the clip kept in its place); a clip that fails again is the new attempt's failure."""
    prior = {"source": {"uri": "a", "status": "ok"}, "clips": [
        {"clip_id": "k", "start_frame": 0, "end_frame": 10, "status": "kept"},
        {"clip_id": "n", "start_frame": 10, "end_frame": 20, "status": "kept"},
        {"clip_id": "f", "start_frame": 20, "end_frame": 30, "status": "failed", "reason": "old"}]}
    unit = {"index": [{"clip_id": "k", "shard": "shards/a.tar"}], "near_duplicates": {"n": "z"}}
    new = {"source": {"uri": "a", "status": "ok", "digest": "d"}, "timings": {"probe": 1.0}, "clips": [
        {"clip_id": "k", "start_frame": 0, "end_frame": 10, "status": RETAINED},
        {"clip_id": "f", "start_frame": 20, "end_frame": 30, "status": "failed", "reason": "new"}]}
    merged = merge(prior, unit, new)
    assert [(c["clip_id"], c["status"]) for c in merged["clips"]] == [("k", "kept"), ("n", "rejected"), ("f", "failed")]
    assert merged["clips"][0]["shard"] == "shards/a.tar" and merged["clips"][1]["duplicate_of"] == "z"
    assert merged["clips"][2]["reason"] == "new" and merged["source"]["num_kept"] == 1
    assert merged["timings"] == {"probe": 1.0} and merged["source"]["digest"] == "d"


def test_an_unfinished_version_is_finished_before_a_retry(tmp_path):
    """A killed run's version is finished by the same command; --retry-failed on it is refused, naming
    what to do. A killed retry's version resumes with its retried sources."""
    log = VersionLog(RunDir(Store(str(tmp_path))))
    log.save(Version(1, ["a", "b"]))
    with pytest.raises(RunDirError, match="rerun without --retry-failed to finish it"):
        log.plan(["a", "b"], retry_failed=True)
    log.save(Version(1, ["a", "b"], published=True))
    log.save(Version(2, ["a", "c"], retried=["a"]))
    current, earlier = log.plan(["a", "b", "c"], retry_failed=True)
    assert current.version == 2 and current.entries() == [("a", 2), ("c", 0)] and len(earlier) == 1


@pytest.mark.slow
def test_retry_failed_after_a_model_upgrade_gives_the_output_of_a_run_without_the_fault(clean_curation, tmp_path):
    """Version 2 adds two sources while the installed aesthetic head is the wrong one (made for
    another CLIP width: every score raises) and one source is not a video: each clip of the first and
    the second source are recorded as failed. The head is replaced at the same path and the file
    re-uploaded; `--retry-failed` publishes version 3, equal (but for shard names) to a version 2 made
    with the right head; the shards of version 1 are not touched; a second retry has nothing to do."""
    from spacetime.models import default_tiny_dir

    first = clean_curation.inputs
    more = tmp_path / "more"
    more.mkdir()
    tm.make_moving(more / "moving.mp4", seed=5)
    late = more / "late.mp4"
    late.write_bytes(b"an upload cut short: not a video yet")
    models = tmp_path / "models"
    manifest = _private_tiny_models(default_tiny_dir(), models)
    head = Path(manifest["clip"]["aesthetic_head"])
    good = head.read_bytes()
    torch.save(AestheticHead(embed_dim=7).state_dict(), head)
    env = dict(os.environ, SPACETIME_TINY_MODELS=str(models))

    def curate(out, *extra):
        done = subprocess.run(curate_cmd([*first, more], out, *extra), cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    out = tmp_path / "out"
    shutil.copytree(clean_curation.out, out)
    v1 = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / contract.SHARDS_DIR).rglob("*.tar")}
    broken = curate(out)
    assert "(after fixing the cause: --retry-failed)" in broken.stdout, broken.stdout
    sources = {os.path.basename(r["uri"]): r for r in pq.read_table(out / contract.SOURCES_MANIFEST).to_pylist()}
    assert sources["late.mp4"]["status"] == "failed"
    moving = [c for c in pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist() if c["source_uri"].endswith("moving.mp4")]
    assert moving and all(c["status"] == "failed" and "expected embeddings" in c["reason"] for c in moving)
    assert failed_sources(Store(str(out)), 2, {str(p) for p in more.iterdir()}) == (
        sorted(str(p) for p in more.iterdir()), 0)

    head.write_bytes(good)  # the upgrade, and the file uploaded again
    tm.make_moving(late, seed=7)
    retried = curate(out, "--retry-failed")
    assert "2 of them retried" in retried.stderr and "published version 3: 0 new sources, 2 retried" in retried.stderr
    reference = tmp_path / "reference"
    shutil.copytree(clean_curation.out, reference)
    curate(reference)

    def manifest_rows(folder, rel, key):
        rows = pq.read_table(folder / rel).to_pylist()
        return {r[key]: {k: v for k, v in r.items() if k != "shard"} for r in rows}

    for rel, key in ((contract.CLIPS_MANIFEST, "clip_id"), (contract.SOURCES_MANIFEST, "uri")):
        got, want = manifest_rows(out, rel, key), manifest_rows(reference, rel, key)
        differ = {k: {f: (got.get(k, {}).get(f), want.get(k, {}).get(f)) for f in {*got.get(k, {}), *want.get(k, {})}
                      if got.get(k, {}).get(f) != want.get(k, {}).get(f)} for k in {*got, *want} if got.get(k) != want.get(k)}
        assert got == want, list(differ.items())[:5]
    recovered = [c for c in manifest_rows(out, contract.CLIPS_MANIFEST, "clip_id").values()
                 if c["source_uri"].startswith(str(more)) and c["status"] == "kept"]
    assert {os.path.basename(c["source_uri"]) for c in recovered} == {"moving.mp4", "late.mp4"}
    index = pq.read_table(out / contract.INDEX_PATH).column("key").to_pylist()
    assert sorted(index) == sorted(pq.read_table(reference / contract.INDEX_PATH).column("key").to_pylist())
    tars = sorted(str(p) for p in (out / contract.SHARDS_DIR).rglob("*.tar"))
    assert sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)) == sorted(index)
    for path, (data, mtime) in v1.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, path
    summary = json.loads((out / contract.SUMMARY_PATH).read_text())
    assert summary["version"] == 3 and summary["retried_sources"] == 2 and summary["clips"]["failed"] == 0

    again = curate(out, "--retry-failed")
    assert "no new input and no failure to retry" in again.stderr and "stays at version 3" in again.stderr


def _private_tiny_models(source: Path, folder: Path) -> dict:
    """A copy of the tiny stand-ins whose files the test may replace (its manifest points at the copy)."""
    shutil.copytree(source, folder)
    text = (folder / "tiny_models.json").read_text().replace(str(source), str(folder))
    (folder / "tiny_models.json").write_text(text)
    return json.loads(text)
