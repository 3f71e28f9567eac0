"""spacetime.store: one output API for a local folder and s3:// (a real moto server, conftest's s3_server)."""

import _thread
import pickle
import signal
import threading
import time

import pytest

from spacetime.config import S3Config
from spacetime.store import Store


def s3_store(endpoint: str, tmp_path) -> Store:
    """A store on a fresh bucket of the S3 server at `endpoint`, under `prefix/`."""
    import boto3

    bucket = f"store-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return Store(f"s3://{bucket}/prefix/", S3Config(endpoint=endpoint))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path / "out")
    return s3_store(request.getfixturevalue("s3_server"), tmp_path)


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


# ------------------------------------------------------------------------- faults during an S3 upload
class Interrupted(Exception):
    """What a Ctrl-C, a SIGTERM turned into SystemExit or a ray.cancel() raises: wherever the code is."""


@pytest.fixture
def interrupt():
    """`interrupt(delay)`: a started timer that raises Interrupted in this (the main) thread `delay`
    seconds later, at whatever line it is then, as a signal does."""

    def raise_interrupted(signum, frame):
        raise Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGUSR1, raise_interrupted)
    timers = []

    def start(delay: float) -> threading.Timer:
        timers.append(threading.Timer(delay, _thread.interrupt_main, (signal.SIGUSR1,)))
        timers[-1].start()
        return timers[-1]

    yield start
    for t in timers:
        t.cancel()
        t.join()
    signal.signal(signal.SIGUSR1, previous)


def s3_leftovers(store: Store) -> tuple[dict[str, int], list[str]]:
    """Every object under the store's prefix (key -> size) and every unfinished multipart upload."""
    import boto3

    bucket, prefix = store.root.split("/", 1)
    s3 = boto3.client("s3", endpoint_url=store.s3.endpoint, region_name="us-east-1")
    objects = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return {o["Key"][len(prefix) + 1:]: o["Size"] for o in objects}, [u["Key"] for u in uploads]


class Faulty:
    """A file-like source that raises after `n` bytes (a dropped connection, a disk error)."""

    def __init__(self, n: int):
        self.left = n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("source failed mid-read")
        chunk = b"s" * min(self.left, size if size > 0 else self.left, 1 << 20)
        self.left -= len(chunk)
        return chunk


def test_s3_a_writer_that_fails_midway_leaves_no_object(s3_server, tmp_path):
    import shutil

    store = s3_store(s3_server, tmp_path)
    with pytest.raises(RuntimeError, match="writer died"), store.writing("shards/a.tar") as tmp:
        with open(tmp, "wb") as f:
            for _ in range(24):  # 24 MiB: more than two of pyarrow's 10 MiB upload parts
                f.write(b"x" * (1 << 20))
        raise RuntimeError("writer died")
    with pytest.raises(OSError, match="mid-read"), store.writing("shards/b.tar") as tmp:
        with open(tmp, "wb") as f:
            shutil.copyfileobj(Faulty(15 << 20), f)
    assert s3_leftovers(store) == ({}, [])  # no object, no temporary object, no unfinished upload
    with store.writing("shards/c.tar") as tmp:
        tmp.write_bytes(b"c" * (24 << 20))
    assert s3_leftovers(store) == ({"shards/c.tar": 24 << 20}, [])


@pytest.mark.parametrize("method", ["writing", "write"])
def test_s3_an_interrupt_during_the_upload_never_leaves_a_truncated_object(s3_server, tmp_path, interrupt, method):
    """pyarrow's S3 output stream completes its object with the bytes so far when it is closed (or
    collected) after an exception: an interrupt arriving at any moment of an upload must leave the
    object whole or absent. The upload is interrupted at delays that sweep its whole duration."""
    store = s3_store(s3_server, tmp_path)
    data = bytes(range(256)) * (48 << 10)  # 12 MiB: two of pyarrow's upload parts (10 MiB each)

    def upload(rel: str, delay: float | None) -> None:
        if method == "write":
            timer = interrupt(delay) if delay is not None else None
            store.write(rel, data)
        else:
            with store.writing(rel) as tmp:
                tmp.write_bytes(data)
                timer = interrupt(delay) if delay is not None else None  # the upload starts as the block exits
        if timer is not None:
            timer.cancel()
            timer.join()
            time.sleep(0.001)  # an interrupt that came at the very end is raised here

    start = time.perf_counter()
    upload("whole", None)  # a normal write lands
    took = time.perf_counter() - start
    assert store.read_bytes("whole") == data
    delays = [0.0, 0.002, 0.01] + [took * f for f in (0.2, 0.5, 0.9)]
    interrupted = 0
    for i, delay in enumerate(delays):
        try:
            upload(f"shards/{i}.tar", delay)
        except Interrupted:
            interrupted += 1
    assert interrupted >= len(delays) // 2, f"only {interrupted} uploads interrupted: the sweep missed them"
    objects, uploads = s3_leftovers(store)
    truncated = {k: n for k, n in objects.items() if n != len(data)}
    assert not truncated, f"truncated objects after interrupted uploads: {truncated} (whole: {len(data)} bytes)"
    assert all(store.read_bytes(k) == data for k in objects) and not uploads
