"""s3:// inputs: a real S3-compatible server process (moto's server mode) on 127.0.0.1 (conftest's s3_server)."""

import pyarrow.parquet as pq
import pytest

from spacetime import contract
from spacetime.standins import testmedia as tm
from spacetime.config import load_config
from curation.pipeline import run_curation
from curation.settings import CurateConfig
from curation.sources import list_inputs
from tests.helpers import CONFIGS, ROOT, start_local_ray


def test_curate_from_s3(s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="raw")
    media = tmp_path / "media"
    media.mkdir()
    truth = tm.make_multishot(media / "multishot.mp4")
    s3.upload_file(str(media / "multishot.mp4"), "raw", "videos/multishot.mp4")
    s3.upload_file(str(tm.real_footage("bikes.mp4")), "raw", "videos/sub/bikes.mp4")
    s3.put_object(Bucket="raw", Key="videos/notes.txt", Body=b"not a video")  # filtered by extension

    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", [f"sources.s3.endpoint={s3_server}", "caption=null"])
    assert list_inputs(["s3://raw/videos"], cfg.sources) == [
        "s3://raw/videos/multishot.mp4", "s3://raw/videos/sub/bikes.mp4"]
    start_local_ray()
    out = tmp_path / "out"
    summary = run_curation(["s3://raw/videos"], str(out), cfg)
    sources = {r["uri"]: r for r in pq.read_table(out / contract.SOURCES_MANIFEST).to_pylist()}
    assert all(r["status"] == "ok" and r["digest_kind"] == "size-etag" for r in sources.values())
    found = [tuple(c) for c in sources["s3://raw/videos/multishot.mp4"]["cuts"]]
    assert len(found) == len(truth.cuts)
    index = pq.read_table(out / contract.INDEX_PATH).to_pylist()
    assert summary["clips"]["kept"] == len(index) >= len(truth.shots)
    assert {r["source_uri"] for r in index} == set(sources)


def test_missing_s3_prefix_is_a_clear_error(s3_server):
    cfg = load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", [f"sources.s3.endpoint={s3_server}", "caption=null"])
    with pytest.raises(ValueError, match="s3://nope/x/y.mp4: no such object"):
        list_inputs(["s3://nope/x/y.mp4"], cfg.sources)


def s3_objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` (relative key -> bytes), as a reader of the bucket sees them."""
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.slow
def test_curate_to_s3_output_matches_a_local_one_and_grows(s3_server, clean_curation, tmp_path):
    """--output s3://: the workers write shards, staged clips and metadata straight to the bucket (no
    shared folder). A run SIGKILLed mid-way and rerun gives objects byte-identical to a local output
    of the same inputs (conftest's clean_curation), no temporary object is left, the reader reads it
    back, and a grown input list publishes version 2 there."""
    import io
    import json
    import os
    import re
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import boto3

    from spacetime.config import S3Config
    from tests.helpers import curate_cmd, run

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="curated")
    first, local = clean_curation.inputs, clean_curation.out
    second = tmp_path / "second"
    second.mkdir()
    tm.make_moving(second / "moving.mp4", seed=11)  # new content
    shutil.copyfile(tm.real_footage("bikes.mp4"), second / "bikes_again.mp4")  # a copy of a first source
    endpoint = ["--set", f"sources.s3.endpoint={s3_server}"]

    killed = subprocess.Popen(curate_cmd(first, "s3://curated/runs/ds", *endpoint), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not client.list_objects_v2(Bucket="curated", Prefix="runs/ds/.work/done/").get("KeyCount"):
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the driver and its Ray processes, after the first completed source
    killed.wait()
    assert "summary.json" not in s3_objects(client, "curated", "runs/ds"), "the run finished before the kill"
    done = run(curate_cmd(first, "s3://curated/runs/ds", *endpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(rf"sources, [1-{len(first) - 1}] already done", done.stderr), done.stderr[-3000:]  # resumed, not redone
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir()) and not (ROOT / "s3:").exists()

    objects = s3_objects(client, "curated", "runs/ds")
    shards = sorted(k for k in objects if k.endswith(".tar"))
    assert shards == sorted(str(p.relative_to(local)) for p in (local / contract.SHARDS_DIR).rglob("*.tar"))
    assert all(objects[k] == (local / k).read_bytes() for k in shards)
    for rel in (contract.INDEX_PATH, contract.CLIPS_MANIFEST, contract.SOURCES_MANIFEST):
        assert pq.read_table(io.BytesIO(objects[rel])).equals(pq.read_table(local / rel)), rel
    # nothing temporary or staged is left; the pointer, the version's files and the report are there
    assert not [k for k in objects if ".tmp" in k or k.startswith(".work/clips/")]
    assert json.loads(objects[contract.LATEST_PATH]) == {"version": 1, "path": contract.version_dir(1)}
    assert f"{contract.version_dir(1)}/index.parquet" in objects and "report/index.html" in objects
    thumbs = [k for k in objects if k.startswith("report/thumbs/")]
    assert thumbs and all(f'src="thumbs/{k.rsplit("/", 1)[1]}"' in objects["report/index.html"].decode()
                          for k in thumbs if k[len("report/thumbs/"):-4] in
                          pq.read_table(io.BytesIO(objects[contract.INDEX_PATH])).column("key").to_pylist())

    # every sample reads back from the bucket with the project's reader
    index = pq.read_table(io.BytesIO(objects[contract.INDEX_PATH])).to_pylist()
    with contract.ShardReader(S3Config(endpoint=s3_server)) as reader:
        read = [contract.read_record(s, k).clip_id for k in shards
                for s in reader.samples(f"s3://curated/runs/ds/{k}")]
    assert sorted(read) == sorted(r["key"] for r in index)

    # incremental: the grown bucket adds version 2; version 1's shard objects are untouched
    grown = run(curate_cmd([*first, second], "s3://curated/runs/ds", *endpoint))
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert f"{len(first)} already done, 2 to process" in grown.stderr and "published version 2" in grown.stderr
    after = s3_objects(client, "curated", "runs/ds")
    assert all(after[k] == objects[k] for k in shards)
    assert json.loads(after[contract.LATEST_PATH])["version"] == 2
    sources = {r["uri"].rsplit("/", 1)[1]: r for r in pq.read_table(io.BytesIO(after[contract.SOURCES_MANIFEST])).to_pylist()}
    assert sources["bikes_again.mp4"]["status"] == "duplicate"
    keys = pq.read_table(io.BytesIO(after[contract.INDEX_PATH])).column("key").to_pylist()
    assert len(keys) == len(set(keys)) > len(index)
    assert not [k for k in after if ".tmp" in k or k.startswith(".work/clips/")]
    assert b"Started a local Ray instance" in after[f"{contract.LOGS_DIR}/ray.log"]  # Ray's messages, uploaded

    # `spacetime inspect` reads the published version from the bucket
    shown = subprocess.run([sys.executable, "-m", "spacetime", "inspect", "s3://curated/runs/ds", "--samples", "1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "AWS_ENDPOINT_URL": s3_server})
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "s3://curated/runs/ds  (version 2)" in shown.stdout and "buckets  " in shown.stdout
    assert sum(1 for line in shown.stdout.splitlines() if line.startswith("clip ")) == 1
