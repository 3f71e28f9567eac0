"""benchmarks/faults.py, the fault matrix of issue #31 ("No fault loses a clip"): its comparison of a
trial's output with the reference (fast, on made-up fates), and CI's seeded subset of the matrix:
ONE trial of the cheapest fault that still proves something, the driver's process group SIGKILLed
mid-run and the same command rerun, which must give the all-zero row (no clip lost, duplicated or
failed by the fault, no process left over, no kept clip without a caption)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "faults.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("faults_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def state(kept=(), failed=(), index=None, tars=None, sources=(), uncaptioned=()):
    """A read_state()-shaped output: `failed` as (clip_id, reason) pairs."""
    clips = [{"clip_id": c, "status": "kept", "reason": None} for c in kept]
    clips += [{"clip_id": c, "status": "failed", "reason": r} for c, r in failed]
    index = Counter(kept if index is None else index)
    tars = Counter(kept if tars is None else tars)
    return {"clips": clips, "sources": [{"uri": u, "status": s, "error": e} for u, s, e in sources],
            "kept": set(kept) & set(index) & set(tars), "index_keys": index, "tar_keys": tars,
            "uncaptioned": list(uncaptioned)}


def test_the_comparison_counts_each_way_a_fault_can_show():
    bench = load_bench()
    ref = state(kept=["a", "b", "c", "d"], failed=[("e", "caption: qa: repetition"), ("f", "extract: invalid data")])
    same = bench.compare(ref, state(kept=["a", "b", "c", "d"], failed=[("e", "caption: qa: repetition"),
                                                                       ("f", "extract: invalid data")]))
    assert not any(same[k] for k in ("lost", "duplicated", "failed_by_fault", "uncaptioned", "qa_differs", "extra"))

    # captions are not deterministic: QA may fail another clip, or pass one the reference failed
    qa = bench.compare(ref, state(kept=["a", "b", "c", "e"], failed=[("d", "caption: qa: empty dense"),
                                                                     ("f", "extract: invalid data")]))
    assert qa["lost"] == [] and qa["qa_differs"] == ["d", "e"] and qa["failed_by_fault"] == []

    bad = bench.compare(ref, state(
        kept=["a", "b"], index=["a", "a", "b"], tars=["a", "b", "b"],
        failed=[("c", "caption: endpoint error after 4 attempt(s): APIConnectionError: Connection error."),
                ("d", "extract: RayActorError: the actor died"), ("f", "extract: invalid data")],
        sources=[("s1.mp4", "failed", "OSError: AWS Error NETWORK_CONNECTION")], uncaptioned=["b"]))
    assert bad["lost"] == ["c", "d"] and bad["duplicated"] == ["a", "b"] and bad["uncaptioned"] == ["b"]
    assert len(bad["failed_by_fault"]) == 3  # c and d (infrastructure causes) and the source
    assert bench.compare(ref, None)["lost"] == ["a", "b", "c", "d"]  # nothing published


@pytest.mark.slow
def test_a_killed_driver_and_its_rerun_lose_no_clip(tmp_path):
    """One seeded trial: a reference run, then a run SIGKILLed (its process group) at a moment drawn
    in 20-40% of the reference's wall time, then the same command again."""
    report_path = tmp_path / "faults.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--trials", "1", "--kinds", "driver-kill", "--sources", "2", "--seed", "1",
         "--window", "0.2,0.4", "--work", str(tmp_path / "work"), "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(report_path.read_text())
    (trial,) = report["trials"]
    assert trial["fired"], trial  # the kill landed while the run was going on
    assert trial["run"]["rc"] == -9 and trial["rerun"]["rc"] == 0, trial
    total = report["table"]["total"]
    zero = ("lost", "duplicated", "failed_by_fault", "leftover", "uncaptioned", "hung")
    assert {k: total[k] for k in zero} == dict.fromkeys(zero, 0), result.stdout
    assert "goal 0 / 0 / 0 / 0 / 0: met" in result.stdout
