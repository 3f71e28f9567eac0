"""s3:// inputs: a real S3-compatible server process (moto's server mode) on 127.0.0.1 (conftest's s3_server)."""

import pyarrow.parquet as pq
import pytest

from spacetime import contract
from spacetime.standins import testmedia as tm
from spacetime.config import load_config
from curation.pipeline import run_curation
from curation.settings import CurateConfig
from curation.sources import list_inputs
from tests.helpers import CONFIGS, start_local_ray


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
