"""The data contract: ids, buckets, deterministic shards readable by webdataset."""

import hashlib

import pytest
import webdataset as wds

from spacetime import contract


def test_clip_id_is_content_addressed():
    a = contract.clip_id("d" * 64, 10, 50)
    assert a == contract.clip_id("d" * 64, 10, 50)
    assert a != contract.clip_id("d" * 64, 10, 51) and a != contract.clip_id("e" * 64, 10, 50)
    assert "." not in a and len(a) == 20


@pytest.mark.parametrize("w,h,n,name", [
    (1920, 1080, 300, "16x9_1080p_256f"), (1080, 1920, 40, "9x16_1080p_32f"), (512, 512, 1, "1x1_480p_1f"),
    (640, 272, 59, "21x9_240p_32f"), (100, 80, 15, "4x3_0p_1f"),
])
def test_bucket_for(w, h, n, name):
    bucket = contract.bucket_for(w, h, n)
    assert bucket.name == name and contract.Bucket.parse(name) == bucket


def test_bucket_target_size_keeps_class_ratio():
    for name in ("16x9_720p_64f", "9x16_480p_16f", "1x1_240p_1f"):
        b = contract.Bucket.parse(name)
        w, h = b.target_size()
        assert w % contract.SIZE_MULTIPLE == 0 and h % contract.SIZE_MULTIPLE == 0
        assert abs(w / h - contract.ASPECT_CLASSES[b.aspect]) < 0.05
        assert min(w, h) <= b.resolution


def test_shard_bytes_are_deterministic_and_webdataset_reads_them(tmp_path):
    samples = [("k1", b"video-1", {"clip_id": "k1", "n": 1}, "a cat"), ("k2", b"video-2", {"clip_id": "k2"}, "")]
    digests = []
    for name in ("a.tar", "b.tar"):
        contract.write_shard(tmp_path / name, samples)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    read = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == ["k1", "k2"]
    assert read[0][contract.VIDEO_EXT] == b"video-1" and read[0][contract.CAPTION_EXT] == b"a cat"
    assert contract.read_sample_record(read[0]) == {"clip_id": "k1", "n": 1}
    assert not list(tmp_path.glob("*.tmp"))
