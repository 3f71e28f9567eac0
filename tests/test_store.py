"""spacetime.store: one output API for a local folder and s3:// (a real moto server, conftest's s3_server)."""

import pickle

import pytest

from spacetime.config import S3Config
from spacetime.store import Store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path / "out")
    import boto3

    endpoint = request.getfixturevalue("s3_server")
    bucket = f"store-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return Store(f"s3://{bucket}/prefix/", S3Config(endpoint=endpoint))


def test_write_read_list_copy_delete(store):
    store.write("a/x.json", '{"k": 1}')
    store.write("a/y.json", b"yy")
    store.write("a/z.txt", b"z")
    store.write("a/deeper/w.json", b"w")
    assert store.read_text("a/x.json") == '{"k": 1}' and store.read_bytes("a/y.json") == b"yy"
    assert store.list("a", ".json") == ["x.json", "y.json"]  # files directly under the folder
    assert store.list("missing") == []
    assert store.exists("a/z.txt") and not store.exists("a/nope")
    store.copy("a/x.json", "b/copy.json")
    assert store.read_bytes("b/copy.json") == b'{"k": 1}'
    store.delete("a/x.json")
    store.delete("a/x.json")  # twice: nothing to do
    assert not store.exists("a/x.json")
    store.delete_dir("a")
    assert store.list("a") == [] and not store.exists("a/deeper/w.json")
    with pytest.raises(FileNotFoundError, match="nope"):
        store.read_bytes("nope")


def test_writing_publishes_whole_or_nothing(store):
    with store.writing("shards/s.tar") as tmp:
        tmp.write_bytes(b"a" * 1000)
        assert not store.exists("shards/s.tar")  # not visible while it is being written
    assert store.read_bytes("shards/s.tar") == b"a" * 1000
    with pytest.raises(RuntimeError), store.writing("shards/t.tar") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not store.exists("shards/t.tar") and store.list("shards") == ["s.tar"]


def test_a_store_pickles_as_its_uri(store):
    store.write("k", b"v")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.uri == store.uri and clone.read_bytes("k") == b"v"


def test_an_s3_uri_without_a_bucket_is_refused():
    with pytest.raises(ValueError, match="needs a bucket"):
        Store("s3://")
