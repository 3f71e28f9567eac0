"""curation.pipeline stages run in-process (no Ray): what their rows carry for the writer."""

from __future__ import annotations

import json
from collections import Counter

from curation.filters import Exposure, Sharpness
from curation.pipeline import Analyze, Extract, Probe, Split
from curation.settings import CurateConfig
from curation.stage import pack, unpack
from spacetime.config import load_config
from spacetime.standins import testmedia as tm
from spacetime.store import Store
from tests.helpers import CONFIGS


def test_stage_seconds_summed_over_rows_count_each_stage_call_once(tmp_path):
    """The writer sums `timings` over all rows of a source; a multi-shot source fans out into
    segments, then clips, and each stage's seconds must still be counted once (not once per row)."""
    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml")
    s3 = cfg.sources.s3
    probe = Probe(cfg.probe, s3, Store(str(tmp_path)), None)
    analyze = Analyze(cfg.analyze, s3, cfg.split.max_duration)
    split = Split(cfg.split.model_copy(update={"max_duration": 1.0}), cfg.analyze.max_sampled_per_clip)  # fans out

    probed = probe(pack({"source": {"uri": str(tm.real_footage("bikes.mp4")), "status": "pending"}}))
    probe_seconds = unpack(probed)[0]["timings"]["probe"]
    segments = list(analyze(probed))
    analyze_seconds = [unpack(r)[0]["timings"]["analyze"] for r in segments]
    clips = [row for seg in segments for row in split(seg)]
    assert len(segments) > 2 and len(clips) > len(segments)  # shots, then 1 s windows

    total: Counter = Counter()
    for row in clips:
        total.update(unpack(row)[0]["timings"])
    assert abs(total["probe"] - probe_seconds) < 1e-9
    assert abs(total["analyze"] - sum(analyze_seconds)) < 1e-9
    # each segment row holds its own analysis time, not the running total of the source's
    assert max(analyze_seconds) < sum(analyze_seconds)


def _bikes_clip_rows(cfg: CurateConfig, tmp_path, count: int) -> list[dict]:
    """The first `count` clip rows of bikes.mp4, as the stages before the filters hand them on."""
    s3 = cfg.sources.s3
    probed = Probe(cfg.probe, s3, Store(str(tmp_path)), None)(
        pack({"source": {"uri": str(tm.real_footage("bikes.mp4")), "status": "pending"}}))
    split = Split(cfg.split, cfg.analyze.max_sampled_per_clip)
    rows = [row for seg in Analyze(cfg.analyze, s3, cfg.split.max_duration)(probed) for row in split(seg)]
    return [r for r in rows if unpack(r)[0]["clip"]][:count]


def test_a_filter_that_raises_fails_its_clip_and_the_rows_go_on(tmp_path):
    """One clip whose frames a filter cannot read (its sampled bytes damaged in transit) is a failed
    clip with the error as its reason; it was an exception that ended the whole run. Its neighbours
    are scored as before, and later filters leave the failed clip alone."""
    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml")
    rows = _bikes_clip_rows(cfg, tmp_path, 2)
    rows[0] = dict(rows[0], sampled=rows[0]["sampled"][: len(rows[0]["sampled"]) // 2])  # cut short
    sharpness, exposure = Sharpness(cfg.filters.sharpness), Exposure(cfg.filters.exposure)
    filtered = [exposure(sharpness(r)) for r in rows]
    out = [unpack(r)[0]["clip"] for r in filtered]
    assert out[0]["status"] == "failed" and out[0]["reason"].startswith("sharpness failed: "), out[0]
    assert "sharpness" not in out[0]["scores"] and "luma_mean" not in out[0]["scores"]
    assert out[1]["status"] != "failed" and {"sharpness", "luma_mean"} <= set(out[1]["scores"])
    # the last stage, which draws every clip's thumbnail from the same bytes, passes it on as it is
    extracted = unpack(Extract(cfg.extract, cfg.sources.s3, Store(str(tmp_path / "out")))(filtered[0]))[0]["clip"]
    assert extracted["status"] == "failed" and extracted["reason"] == out[0]["reason"]


def test_the_aesthetic_model_stage_fails_a_clip_it_cannot_read_and_scores_the_rest(tmp_path, tiny_models):
    """The aesthetic actor batches frames across clips: one clip with damaged sampled bytes (every
    other filter switched off, so nothing failed it before) is failed with the error; it used to fail
    the whole batch, and the run with it. A model that raises on a batch fails the clip at fault only; one
that runs out of memory fails none (they wait for the rerun)."""
    from curation.filters import Aesthetic

    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml")
    rows = _bikes_clip_rows(cfg, tmp_path, 3)
    rows[1] = dict(rows[1], sampled=rows[1]["sampled"][: len(rows[1]["sampled"]) // 2])
    batch = {"meta": [r["meta"] for r in rows], "sampled": [r["sampled"] for r in rows]}
    aesthetic = Aesthetic(cfg.filters.aesthetic)
    clips = [json.loads(m)["clip"] for m in aesthetic(batch)["meta"]]
    assert clips[1]["status"] == "failed" and clips[1]["reason"].startswith("aesthetic failed: "), clips[1]
    assert all(c["status"] != "failed" and "aesthetic" in c["scores"] for c in (clips[0], clips[2]))

    # A model that raises on a batch because of one clip: each clip alone finds it, the rest are scored.
    score = aesthetic.head.score
    rows[1] = dict(rows[1], sampled=rows[2]["sampled"])  # readable again
    batch = {"meta": [r["meta"] for r in rows], "sampled": [r["sampled"] for r in rows]}
    seen = []

    def raises_on_the_first_clip(embeddings):
        seen.append(len(embeddings))
        if len(seen) in (1, 2):  # the batch, then the first clip alone
            raise ValueError("a frame the model cannot take")
        return score(embeddings)

    aesthetic.head.score = raises_on_the_first_clip
    clips = [json.loads(m)["clip"] for m in aesthetic(batch)["meta"]]
    assert len(seen) == 4  # the batch, then each of the 3 clips alone
    assert clips[0]["status"] == "failed" and "a frame the model cannot take" in clips[0]["reason"]
    assert all(c["status"] == "candidate" and "aesthetic" in c["scores"] for c in clips[1:]), clips[1:]

    # Out of memory is the machine's fault, not the clips': no fate, the batch is left for the rerun.
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    aesthetic.head.score = out_of_memory
    clips = [json.loads(m)["clip"] for m in aesthetic(batch)["meta"]]
    assert [c["status"] for c in clips] == ["deferred"] * 3
    assert clips[0]["reason"] == "aesthetic: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_a_segment_that_cannot_be_split_fails_its_source_and_the_rows_go_on(tmp_path):
    """A segment whose sampled frames cannot be read (its bytes damaged in transit) used to raise in
    Split and end the whole run. Now its source's completion record says `failed`, naming the split
    and the segment, even though that segment is not the source's final one; the other segments'
    clips are still there."""
    from curation.completion import CompletionTracker
    from curation.rundir import RunDir

    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml")
    s3 = cfg.sources.s3
    uri = str(tm.real_footage("bikes.mp4"))
    probed = Probe(cfg.probe, s3, Store(str(tmp_path)), None)(pack({"source": {"uri": uri, "status": "pending"}}))
    segments = list(Analyze(cfg.analyze, s3, cfg.split.max_duration)(probed))
    assert len(segments) > 2 and segments[0]["sampled"] and not unpack(segments[0])[0]["final"]
    segments[0] = dict(segments[0], sampled=segments[0]["sampled"][: len(segments[0]["sampled"]) // 2])
    split = Split(cfg.split, cfg.analyze.max_sampled_per_clip)
    rows = [unpack(row)[0] for seg in segments for row in split(seg)]

    run = RunDir(Store(str(tmp_path / "out")))
    tracker = CompletionTracker(run)
    done = [tracker.add(m) for m in rows]
    assert done[-1] and not any(done[:-1])
    record = run.record(uri)
    assert record["source"]["status"] == "failed", record["source"]
    assert record["source"]["error"].startswith("split failed on segment 0: "), record["source"]["error"]
    second = unpack(segments[1])[0]["segment"]["start_frame"]
    assert record["clips"] and all(c["start_frame"] >= second for c in record["clips"])


def test_stages_without_a_model_are_tasks_and_model_stages_autoscaling_actor_pools(tmp_path):
    """The Ray Data plan `_apply` builds (no execution): tasks with the section's CPUs for stages
    without a model, an actor pool from `actors` to `max_actors` for the model stages."""
    import ray.data

    from curation.pipeline import _apply, stages
    from curation.pipeline import stop_ray
    from tests.helpers import start_local_ray

    had_ray = ray.is_initialized()
    start_local_ray()  # from_items puts its rows in the object store (else Ray would start with its defaults)
    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml",
                      ["caption=null", "filters.aesthetic.resources.max_actors=3", "extract.resources.num_cpus=0.5"])
    kinds = {}
    for i, spec in enumerate(stages(cfg, Store(str(tmp_path)))):
        op = _apply(ray.data.from_items([{"meta": "{}", "sampled": b""}]), spec, ("run", i))._logical_plan.dag
        kinds[spec.stage.name] = (type(op.compute).__name__, op.ray_remote_args.get("num_cpus"),
                                  getattr(op.compute, "min_size", None), getattr(op.compute, "max_size", None))
    if not had_ray:
        stop_ray()
    assert kinds["aesthetic"] == ("ActorPoolStrategy", 0, 1, 3)
    assert kinds["extract"] == ("TaskPoolStrategy", 0.5, None, None)
    assert kinds["dedup"] == ("ActorPoolStrategy", 0, 1, 1)  # one gate sees every row
    assert all(k[0] == "TaskPoolStrategy" and k[1] == 1.0 for name, k in kinds.items()
               if name not in ("aesthetic", "extract", "dedup"))
    assert list(kinds).index("dedup") == list(kinds).index("fingerprint") + 1  # before every model stage
    by_score = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", ["dedup.keep=aesthetic"])
    names = [s.stage.name for s in stages(by_score, Store(str(tmp_path)))]
    assert names.index("dedup") == names.index("aesthetic") + 1 < names.index("caption")  # it needs that score
    # a model stage that is switched off is not in the plan: no actor loads a model for nothing
    off = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", ["caption=null", "filters.aesthetic.enabled=false"])
    assert [s.stage.name for s in stages(off, Store(str(tmp_path)))] == [n for n in kinds if n != "aesthetic"]


def test_the_local_ray_has_cpus_per_core_slots_per_core():
    """The embedded Ray gets cores x ray.cpus_per_core CPU slots (2 by default: the stages stream and
    still fill the cores under Ray Data's per-operator reservation), unless ray.num_cpus says; and
    `stop_ray` stops every process of it (the monitor SIGKILLed first, the rest by ray.shutdown)."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = ("import psutil, ray\n"
              "from curation.pipeline import init_ray, stop_ray\n"
              "from curation.settings import CurateConfig\n"
              "for ray_cfg in ({}, {'cpus_per_core': 0.5}, {'num_cpus': 3}):\n"
              "    init_ray(CurateConfig(ray={'object_store_memory': 80 * 2**20, **ray_cfg}), None)\n"
              "    print(int(ray.cluster_resources()['CPU']), flush=True)\n"
              "    stop_ray()\n"
              "    print('left', [p.cmdline()[:2] for p in psutil.Process().children() if p.status() != 'zombie'])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
    cores = os.cpu_count()
    lines = out.stdout.splitlines()
    assert lines[0::2] == [str(2 * cores), str(max(1, round(cores / 2))), "3"], out.stderr[-3000:]
    assert lines[1::2] == ["left []"] * 3, lines  # stop_ray (its monitor killed first) leaves no Ray process


def test_the_progress_line_counts_clips_by_fate_and_estimates_the_rest():
    from collections import Counter

    from curation.pipeline import progress_line

    counts = Counter(sources=3, clips=7, kept=3, rejected=2, duplicates=1, failed=1, failed_sources=1,
                     video_seconds=360)
    line = progress_line(counts, total=10, wall=30.0, cores=2.0)
    # 6 min of video in 30 s of wall time = 12 video-h per wall-h; 7 sources left at 10 s each
    assert line == ("3/10 sources (1 failed); clips kept 3, rejected 2, duplicates 1, failed 1; "
                    "12.00 video-h per wall-h; ETA 70 s")
    assert progress_line(counts, 10, 30.0, 2.0, short=True).endswith("12.00 video-h/h; ETA 70 s")
    assert progress_line(counts, 100, 30.0, 2.0).endswith("ETA 16 min")  # 97 x 10 s
    assert progress_line(Counter(), 10, 5.0, 2.0).endswith("ETA ?")


def test_the_dashboard_flag_starts_ray_dashboard_and_logs_its_url(tmp_path):
    """`spacetime curate --dashboard` sets ray.dashboard: the local Ray starts its dashboard on
    127.0.0.1 and the URL is logged; the page answers."""
    import os
    import re
    import subprocess
    import sys

    from tests.helpers import ROOT

    script = ("import logging\n"
              "logging.basicConfig(level=logging.INFO)\n"
              "from curation.pipeline import init_ray\n"
              "from curation.settings import CurateConfig\n"
              "cfg = CurateConfig()\n"
              "cfg.ray.dashboard, cfg.ray.num_cpus = True, 1\n"
              "init_ray(cfg, None)\n"
              "print('ready', flush=True)\n"
              "input()\n"  # until the test has looked
              "import ray\n"
              "ray.shutdown()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        found = re.search(r"Ray dashboard: (http://127\.0\.0\.1:\d+)", "".join(lines))
        assert found, "".join(lines)[-3000:]
        import urllib.request

        with urllib.request.urlopen(found.group(1) + "/", timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read(200)
    finally:
        proc.communicate("\n", timeout=60)  # the driver shuts its Ray down
