"""The data contract: ids, buckets, deterministic shards that webdataset reads, one shard reader."""

import hashlib

import pytest
import webdataset as wds

from spacetime import contract
from spacetime.record import Caption, ClipRecord, SourceRef, Span


def test_clip_id_is_content_addressed():
    a = contract.clip_id("d" * 64, 10, 50)
    assert a == contract.clip_id("d" * 64, 10, 50)
    assert a != contract.clip_id("d" * 64, 10, 51) and a != contract.clip_id("e" * 64, 10, 50)
    assert "." not in a and len(a) == 20


@pytest.mark.parametrize("w,h,n,name", [
    (1920, 1080, 300, "16x9_1080p_256f"), (1080, 1920, 40, "9x16_1080p_32f"), (512, 512, 1, "1x1_480p_1f"),
    (640, 272, 59, "21x9_240p_32f"), (100, 80, 15, "4x3_0p_1f"),
    # a minute of HD at its native rate is one sample: 24, 30 and 60 fps
    (1280, 720, 60 * 24, "16x9_720p_1440f"), (1920, 1080, 60 * 30, "16x9_1080p_1800f"),
    (1920, 1080, 60 * 60, "16x9_1080p_3600f"), (1920, 1080, 59 * 24, "16x9_1080p_1024f"),
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


def record(key: str, caption: str | None) -> ClipRecord:
    return ClipRecord(clip_id=key, source=SourceRef(uri="a.mp4", digest="d", digest_kind="sha256"),
                      span=Span(start_frame=0, end_frame=16, start_time=0.0, end_time=0.64), fps=25.0,
                      width=64, height=48, num_frames=16, duration=0.64, bucket="4x3_0p_16f",
                      caption=Caption(dense=caption, short="short " + caption) if caption else None)


def test_shard_bytes_are_deterministic_and_webdataset_reads_them(tmp_path):
    samples = [(b"video-1", record("k1", "a cat")), (b"video-2", record("k2", None))]
    digests = []
    for name in ("a.tar", "b.tar"):
        contract.write_shard(tmp_path / name, samples)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    read = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == ["k1", "k2"]
    assert read[0][contract.VIDEO_EXT] == b"video-1" and read[0][contract.CAPTION_EXT] == b"a cat"
    assert read[1][contract.CAPTION_EXT] == b""  # no caption: an empty <key>.txt, never a missing one
    assert contract.read_record(read[0]) == samples[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]  # no temp file left


def test_shard_reader_random_access_and_scan_agree(tmp_path):
    samples = [(f"video-{i}".encode() * (i + 1), record(f"k{i}", f"clip {i}")) for i in range(5)]
    contract.write_shard(tmp_path / "s.tar", samples)
    with contract.ShardReader() as reader:
        scanned = list(reader.samples(tmp_path / "s.tar"))
        assert [s["__key__"] for s in scanned] == [f"k{i}" for i in range(5)]
        for video, rec in samples:
            one = reader.read(str(tmp_path / "s.tar"), rec.clip_id)
            assert one == next(s for s in scanned if s["__key__"] == rec.clip_id)
            assert one[contract.VIDEO_EXT] == video and contract.read_record(one) == rec
        with pytest.raises(KeyError, match="no member k9.mp4"):
            reader.read(str(tmp_path / "s.tar"), "k9")


def test_a_failed_write_leaves_no_shard(tmp_path):
    def samples():
        yield b"video", record("k1", "a cat")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        contract.write_shard(tmp_path / "x.tar", samples())
    assert list(tmp_path.iterdir()) == []


def test_the_typed_record_view_covers_every_record_field():
    """RECORD_ARROW (readers that need a schema up front) names every field of the clip record."""
    from spacetime.record import Caption, ClipRecord, SourceRef, Span

    record = contract.RECORD_ARROW
    assert {record.field(i).name for i in range(record.num_fields)} == set(ClipRecord.model_fields)
    for name, model in (("source", SourceRef), ("span", Span)):
        t = record.field(name).type
        assert {t.field(i).name for i in range(t.num_fields)} == set(model.model_fields), name
    caption = record.field("caption").type
    assert {caption.field(i).name for i in range(caption.num_fields)} == set(Caption.model_fields)
    scores = record.field("scores").type
    assert [scores.field(i).name for i in range(scores.num_fields)] == list(contract.SCORE_FIELDS)
    with pytest.raises(ValueError, match="SCORE_FIELDS"):
        contract.score_columns({"aesthetic": 5.0, "made_up": 1.0})
    assert contract.scores_of('{"aesthetic": 5.0}') == {"aesthetic": 5.0}  # outputs written before typed scores
