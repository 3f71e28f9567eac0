"""Exactly once: a SIGKILLed `spacetime curate`, rerun, writes the same bytes as an uninterrupted
run; a second run on a live run's output is refused; a rerun with another config is refused. Runs
the real CLI in subprocesses."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import time

import pyarrow.parquet as pq
import webdataset as wds

from curation.sources import source_key
from spacetime import contract
from spacetime.standins import testmedia as tm
from tests.helpers import ROOT, curate_cmd, run


def files_under(out):
    return sorted(p.relative_to(out) for p in (out / contract.SHARDS_DIR).rglob("*.tar"))


def test_kill_and_resume_gives_identical_shards(clean_curation, tmp_path):
    media, clean, done = clean_curation.inputs, clean_curation.out, clean_curation.result
    # off a terminal, a progress line every 3 s from the start (a timer: sources finish in bursts here)
    beats = [line for line in done.stderr.splitlines() if f"/{len(media)} sources; clips kept" in line]
    assert len(beats) >= 3 and "ETA" in beats[-1], done.stderr[-3000:]
    # the console holds our lines only; Ray's own (its loggers, warnings, the C++ core worker) are in the log
    ray_log = (clean / contract.LOGS_DIR / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log
    assert not [line for line in done.stderr.splitlines() if " -- " in line or ".cc:" in line], done.stderr[-3000:]
    assert "published version 1" in done.stderr and done.stdout.startswith(f"curated {len(media)}/{len(media)} sources")
    # the report, drawn while the command shuts its Ray down, is whole (Ray aborted the process if
    # the drawing thread's garbage collection freed Ray objects during the shutdown)
    assert (clean / contract.REPORT_DIR / "plots" / "stages.svg").exists()
    # Shards are written per work unit (2 sources) by the unit's task and committed before the
    # metadata; finalize writes no video byte. (When small sources complete in one burst, as here,
    # the units are written right after it; benchmarks/curation_scale.py measures time to first shard.)
    units = {int(p.stem): p.stat().st_mtime for p in (clean / contract.WORK_DIR / "units").glob("*.json")}
    tars = list((clean / contract.SHARDS_DIR).rglob("*.tar"))
    assert len(units) == 4 and len({p.name.rsplit("-", 2)[1] for p in tars}) > 1
    assert all(p.stat().st_mtime <= units[int(p.name.rsplit("-", 2)[1])] for p in tars)
    assert max(units.values()) <= (clean / contract.INDEX_PATH).stat().st_mtime

    killed = tmp_path / "killed"
    proc = subprocess.Popen(curate_cmd(media, killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    records = killed / contract.WORK_DIR / "done"
    deadline = time.time() + 300
    # one writer per output: a second run while the first lives is refused, naming the holder
    while time.time() < deadline and not (killed / contract.WORK_DIR / "lease.json").exists():
        time.sleep(0.02)
    second = run(curate_cmd(media, killed))
    assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and proc.poll() is None
    while time.time() < deadline and not (records.exists() and any(records.glob("*.json"))):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    # The kill lands after the first completed source and before the run's end: while sources are
    # still in flight, or (sources can complete in a burst) while shards are being assembled.
    # Either way the rerun must give the same bytes.
    # (not a hidden temp record: a kill can land mid-write, and the rerun ignores it as it should)
    finished_before_kill = len([p for p in records.glob("*.json") if not p.name.startswith(".")])
    assert not (killed / contract.SUMMARY_PATH).exists(), "the run finished before it could be killed"
    assert 1 <= finished_before_kill <= len(media)

    resumed = run(curate_cmd(media, killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{finished_before_kill} already done" in resumed.stderr

    assert files_under(clean) == files_under(killed) and files_under(clean)
    match, mismatch, errors = filecmp.cmpfiles(clean, killed, [str(p) for p in files_under(clean)], shallow=False)
    assert not mismatch and not errors
    for table in (contract.INDEX_PATH, contract.CLIPS_MANIFEST):
        assert pq.read_table(clean / table).equals(pq.read_table(killed / table)), table
    ids = pq.read_table(killed / contract.INDEX_PATH).column("clip_id").to_pylist()
    assert len(ids) == len(set(ids))  # nothing duplicated

    # rerunning a finished output is a no-op; another config on it is refused with a clear message
    again = run(curate_cmd(media, killed))
    assert again.returncode == 0 and f"{len(media)} already done" in again.stderr
    other = run(curate_cmd(media, killed, "--set", "split.max_duration=4"))
    assert other.returncode == 2 and "config.split.max_duration: 10.0 -> 4.0" in other.stderr, other.stderr[-2000:]


def test_a_grown_input_list_publishes_a_new_version_and_leaves_old_shards_alone(clean_curation, tmp_path):
    """Incremental ingest: rerunning with more inputs processes only the new sources, publishes
    version 2 (pointer written after its files, stable paths replaced), never rewrites version 1's
    shards, a new copy of a version-1 source is a duplicate of it, and the clips of a smaller
    re-encode of it are near-duplicates of version 1's clips (the index spans versions).
    Version 1 is a copy of conftest's clean_curation (an output holds no path of its own)."""
    first = clean_curation.inputs
    bikes = next(i for i in first if i.endswith("/bikes.mp4"))
    second = tmp_path / "second"
    second.mkdir()
    tm.make_moving(second / "moving.mp4", seed=11)  # new content
    shutil.copyfile(bikes, second / "bikes_again.mp4")
    tm.transcode(bikes, second / "bikes_small.mp4", codec="libx264", pix_fmt="yuv420p",
                 size=(320, 136), options={"crf": "30"})
    out = tmp_path / "out"
    shutil.copytree(clean_curation.out, out)
    v1_shards = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / contract.SHARDS_DIR).rglob("*.tar")}
    v1_index = pq.read_table(out / contract.INDEX_PATH)
    assert v1_shards and json.loads((out / contract.LATEST_PATH).read_text())["version"] == 1

    grown = run(curate_cmd([*first, second], out))
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert f"{len(first)} already done, 3 to process" in grown.stderr and "published version 2" in grown.stderr
    for path, (data, mtime) in v1_shards.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, path
    index = pq.read_table(out / contract.INDEX_PATH)
    keys = index.column("key").to_pylist()
    assert set(v1_index.column("key").to_pylist()) < set(keys) and len(keys) == len(set(keys))
    sources = {os.path.basename(r["uri"]): r for r in pq.read_table(out / contract.SOURCES_MANIFEST).to_pylist()}
    assert sources["bikes_again.mp4"]["status"] == "duplicate"
    assert sources["bikes_again.mp4"]["duplicate_of"] == sources["bikes.mp4"]["uri"]
    # known from version 1's manifest at probe time: the copy is not decoded again
    record = json.loads((out / contract.WORK_DIR / "done" / f"{source_key(sources['bikes_again.mp4']['uri'])}.json").read_text())
    assert "probe" in record["timings"] and "analyze" not in record["timings"] and record["clips"] == []
    clips = pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist()
    v1_kept = {c["clip_id"]: c for c in clips if c["source_uri"] == bikes and c["status"] == "kept"}
    small = [c for c in clips if c["source_uri"].endswith("/bikes_small.mp4") and not c["reason"].startswith("too_short")]
    assert len(small) == len(v1_kept) == 5
    for c in small:  # each shot's copy names the version-1 clip of the same shot
        assert c["status"] == "rejected" and c["reason"].startswith("duplicate:"), c
        original = v1_kept[c["duplicate_of"]]
        assert abs(original["start_frame"] - c["start_frame"]) <= 2, (c, original)
    latest = json.loads((out / contract.LATEST_PATH).read_text())
    assert latest == {"version": 2, "path": contract.version_dir(2)}
    assert pq.read_table(out / contract.version_dir(1) / "index.parquet").equals(v1_index)
    assert pq.read_table(out / latest["path"] / "index.parquet").equals(index)
    tars = sorted(str(p) for p in (out / contract.SHARDS_DIR).rglob("*.tar"))
    assert sorted(s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)) == sorted(keys)

    # the first inputs alone: nothing new, the dataset keeps every source so far
    again = run(curate_cmd(first, out))
    assert again.returncode == 0 and "stays at version 2" in again.stderr, again.stderr[-3000:]
    assert pq.read_table(out / contract.INDEX_PATH).equals(index)
