"""spacetime.faults: content vs infrastructure failures, and what a run does with each.

The unit tests classify the errors the libraries we run on really raise (made, not mocked: openai's
client against a closed port, pyarrow's S3 filesystem against a closed port, PyAV on garbage bytes).
The end-to-end test is the outage of issue #31: a curation run whose caption endpoint is down leaves
its sources for the rerun (exit 3, nothing published), and the rerun against the live endpoint (a
transport setting changed: allowed) captions every kept clip.
"""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest

from curation.completion import CompletionTracker
from curation.rundir import RunDir, RunDirError
from curation.stage import pack
from spacetime import contract
from spacetime.faults import EXIT_INCOMPLETE, InfrastructureError, is_infrastructure, retry
from spacetime.store import Store
from tests.helpers import CONFIGS, free_port, run


# ------------------------------------------------------------------------------ classification
def test_transport_and_memory_errors_are_infrastructure():
    import asyncio

    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{free_port()}/v1", api_key="x", max_retries=0, timeout=5)
    async def list_models():
        return await client.models.list()

    with pytest.raises(Exception) as refused:
        asyncio.run(list_models())
    assert type(refused.value).__name__ == "APIConnectionError" and is_infrastructure(refused.value)

    from pyarrow import fs

    s3 = fs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                         retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=1), connect_timeout=2)
    with pytest.raises(OSError) as unreachable:
        s3.get_file_info("bucket/key")
    assert is_infrastructure(unreachable.value), unreachable.value

    import torch

    assert is_infrastructure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_infrastructure(MemoryError()) and is_infrastructure(ConnectionRefusedError())
    wrapped = RuntimeError("the batch failed")
    wrapped.__cause__ = TimeoutError("read timed out")
    assert is_infrastructure(wrapped)  # the cause chain counts
    assert is_infrastructure(InfrastructureError("engine failed to restart"))


def test_the_inputs_own_faults_are_content(tmp_path):
    import av

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(Exception) as bad_video:
        av.open(str(garbage))
    assert not is_infrastructure(bad_video.value), bad_video.value
    with pytest.raises(FileNotFoundError) as missing:
        open(tmp_path / "absent.mp4", "rb")
    assert not is_infrastructure(missing.value)
    assert not is_infrastructure(ValueError("caption: schema: missing field 'dense'"))


def test_retry_retries_infrastructure_only():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert retry(flaky, "flaky", attempts=3, backoff=0.5, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and 1.0 <= sleeps[1] <= 1.25  # 0.5 x 2, + jitter

    def bad_bytes():
        calls.append(1)
        raise ValueError("invalid data")

    calls.clear()
    with pytest.raises(ValueError):
        retry(bad_bytes, "bad", attempts=5, sleep=sleeps.append)
    assert len(calls) == 1  # a content failure is not retried

    def down():
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        retry(down, "down", attempts=2, sleep=lambda s: None)


# --------------------------------------------------------------------------- the completion tracker
def test_a_deferred_row_leaves_its_source_without_a_completion_record(tmp_path):
    """Real row shapes (the stages' meta): one source whose every clip is fine completes; one whose
    second clip was deferred by the caption stage gets no record, and says why."""
    from curation.stage import defer, fail

    run_dir = RunDir(Store(tmp_path))
    tracker = CompletionTracker(run_dir)

    def rows(uri: str, clips: int):
        source = {"uri": uri, "status": "ok", "duration": 4.0, "digest": uri}
        return [dict(source=dict(source), seg_index=0, final=True, rows_in_segment=clips,
                     clip={"clip_id": f"{uri}-{k}", "status": "kept", "start_frame": k * 10, "end_frame": k * 10 + 9})
                for k in range(clips)]

    good, bad = rows("a.mp4", 2), rows("b.mp4", 3)
    defer(bad[1]["clip"], "caption: endpoint error after 2 attempt(s): APIConnectionError: Connection error.")
    fail(bad[2]["clip"], "extract", ValueError("invalid data"))  # a content failure is still a fate
    assert bad[2]["clip"]["status"] == "failed"
    done = [tracker.add(json.loads(pack(m)["meta"])) for m in good + bad]
    assert done == [False, True, False, False, False]
    assert run_dir.done_keys() == {run_dir.done_path("a.mp4").rsplit("/", 1)[1][:-len(".json")]}
    assert tracker.left == {"b.mp4": bad[1]["clip"]["reason"]}
    assert tracker.counts["sources"] == 1 and not tracker.rows  # nothing of b.mp4 is held


def test_an_infrastructure_failure_of_a_filter_defers_the_clip(tmp_path):
    from curation.stage import fail

    clip = {"clip_id": "c", "status": "candidate"}
    fail(clip, "text", OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."))
    assert clip == {"clip_id": "c", "status": "deferred",
                    "reason": "text: OSError: AWS Error SLOW_DOWN during GetObject operation: Please reduce your "
                              "request rate."}


# ------------------------------------------------------------------------------- fingerprints
def test_only_results_are_fingerprinted(tmp_path):
    """Transport, resources and progress may change on a rerun; a result setting may not, and the
    refusal names it with both values. `auto` is resolved on the driver before it is fingerprinted."""
    from curation.pipeline import preflight
    from curation.settings import CurateConfig
    from spacetime.config import load_config, result_fingerprint

    def fingerprint(*overrides):
        cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", ["filters.aesthetic.enabled=false", *overrides])
        preflight(cfg)
        return {"config": result_fingerprint(cfg)}

    base = fingerprint()
    assert base["config"]["analyze"]["transnet_dtype"] in ("float32", "bfloat16")  # never "auto"
    assert "ray" not in base["config"] and "resources" not in base["config"]["caption"]
    assert "resources" not in base["config"]["filters"]["text"]  # nested sections too
    run_dir = RunDir(Store(tmp_path))
    run_dir.claim(base)
    for transport in ("caption.openai.retries=9", "caption.openai.base_url=http://elsewhere:1/v1",
                      "caption.openai.timeout=5", "caption.openai.concurrency=64", "caption.openai.backoff=3",
                      "caption.resources.actors=4", "filters.text.resources.num_cpus=2", "ray.num_cpus=64",
                      "progress.log_every_s=1", "sources.s3.endpoint=http://127.0.0.1:9000",
                      "caption.vllm.kv_cache_memory_bytes=1024", "write.resources.actors=3"):
        run_dir.claim(fingerprint(transport))  # accepted
    with pytest.raises(RunDirError, match=r"config\.analyze\.height: 144 -> 180"):
        run_dir.claim(fingerprint("analyze.height=180"))
    # a resume on a machine where `auto` resolves the other way is refused, naming it
    resolved = base["config"]["analyze"]["transnet_dtype"]
    other = "float32" if resolved == "bfloat16" else "bfloat16"
    with pytest.raises(RunDirError, match=rf"config\.analyze\.transnet_dtype: '{resolved}' -> '{other}'"):
        run_dir.claim(fingerprint(f"analyze.transnet_dtype={other}"))


# ----------------------------------------------------------------------------- end to end: outage
def _caption_run(inputs, out, base_url: str, retries: int):
    cmd = [sys.executable, "-m", "spacetime", "curate", "--config", str(CONFIGS / "curate/tiny.yaml"),
           "--output", str(out), "--set", "write.unit_sources=2", "--set", "caption.engine=openai",
           "--set", f"caption.openai.base_url={base_url}", "--set", "caption.openai.served_model=tiny-vlm",
           "--set", f"caption.openai.retries={retries}", "--set", "caption.openai.backoff=0.05",
           "--set", "caption.openai.timeout=60"]
    for i in inputs:
        cmd += ["--input", str(i)]
    return run(cmd)


@pytest.mark.slow
def test_a_caption_outage_leaves_the_sources_for_the_rerun_which_captions_every_kept_clip(
        vllm_server, clean_curation, tmp_path):
    inputs = [i for i in clean_curation.inputs if i.endswith(("bikes.mp4", "carphone_pristine.mp4"))]
    out = tmp_path / "out"
    down = _caption_run(inputs, out, f"http://127.0.0.1:{free_port()}/v1", retries=1)
    assert down.returncode == EXIT_INCOMPLETE, down.stderr[-3000:]
    assert "2 of 2 sources left for the rerun" in down.stderr and "APIConnectionError" in down.stderr, \
        down.stderr[-3000:]
    assert not (out / contract.LATEST_PATH).exists() and not (out / contract.SUMMARY_PATH).exists()
    assert not list((out / contract.WORK_DIR / "done").glob("*.json"))  # no fate was recorded

    up = _caption_run(inputs, out, vllm_server.base_url, retries=2)  # the endpoint is back; a transport change
    assert up.returncode == 0, up.stderr[-3000:]
    clips = pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist()
    assert not [c for c in clips if "endpoint" in (c["reason"] or "") or c["status"] == "deferred"]
    kept = {c["clip_id"] for c in clips if c["status"] == "kept"}
    index = pq.read_table(out / contract.INDEX_PATH).to_pylist()
    assert kept and {r["clip_id"] for r in index} == kept and all(r["has_caption"] for r in index)
    # the clips a run that never saw the outage keeps (clean_curation: the same filters, no captions),
    # less any the tiny random VLM's answers failed QA on
    names = {"bikes.mp4", "carphone_pristine.mp4"}
    reference = {c["clip_id"] for c in pq.read_table(clean_curation.out / contract.CLIPS_MANIFEST).to_pylist()
                 if c["status"] == "kept" and c["source_uri"].rsplit("/", 1)[1] in names}
    caption_failed = {c["clip_id"] for c in clips if c["status"] == "failed" and c["reason"].startswith("caption:")}
    assert kept | caption_failed == reference and len(kept) >= len(reference) // 2, (kept, caption_failed)
