"""The clip record (<key>.json): one typed definition, strict on read, byte-stable on write."""

import json

import pytest

from spacetime.record import (CAPTION_FIELDS, SCHEMA_VERSION, Caption, ClipRecord, GroundingCheck, RecordError,
                              SourceRef, Span)


def full_record() -> ClipRecord:
    return ClipRecord(
        clip_id="0123456789abcdef0123", source=SourceRef(uri="s3://b/v.mp4", digest="ab" * 32, digest_kind="size-etag"),
        span=Span(start_frame=30, end_frame=76, start_time=1.2, end_time=3.04, start_pts=15360, end_pts=38912),
        fps=25.0, width=640, height=352, num_frames=46, duration=1.84, rotation=90, crop=[0, 4, 640, 352],
        bucket="16x9_240p_32f", extract_mode="reencode", sampled_idx=[30, 42, 54, 66],
        scores={"aesthetic": 5.1, "motion": 0.02}, provenance={"spacetime": "0.1.0"},
        caption=Caption(dense="A cyclist rides.", short="cyclist", subjects=["cyclist"], actions=["rides"],
                        scene="road", camera_motion="pan", shot_type="wide", lighting="day", style="real",
                        on_screen_text="", provenance={"model": "m", "prompt_hash": "h"}),
        grounding=[GroundingCheck(field="camera_motion", claim="pan", measured="pan_x 0.2, pan_y 0, zoom 0",
                                  verdict="agrees")])


def test_round_trip_is_exact_and_deterministic():
    record = full_record()
    data = record.to_json()
    assert ClipRecord.from_json(data) == record
    assert ClipRecord.from_json(data).to_json() == data
    tree = json.loads(data)
    assert tree["schema_version"] == SCHEMA_VERSION and list(tree) == sorted(tree)
    assert record.short_caption == "cyclist" and record.dense_caption == "A cyclist rides."


def test_caption_fields_are_the_stored_caption_fields():
    """The captioner answers with exactly the fields the record stores (captioner.schema builds on them)."""
    from captioner.schema import FIELDS, CaptionAnswer

    assert set(CAPTION_FIELDS) <= set(Caption.model_fields)
    assert FIELDS == CAPTION_FIELDS and set(CaptionAnswer.model_fields) == {"clip_id", *CAPTION_FIELDS}


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.update(schema_version=4), "schema_version 4, this spacetime reads 1, 2, 3: written by a newer"),
    (lambda t: t.update(grounding=[{"field": "lighting", "claim": "x", "measured": "y", "verdict": "maybe"}]),
     "grounding.0.verdict: Input should be 'agrees', 'contradicts' or 'unknown'"),
    (lambda t: t.pop("schema_version"), "schema_version None"),
    (lambda t: t.update(caption_fields={"short": "x"}), "caption_fields: Extra inputs are not permitted"),
    (lambda t: t["caption"].update(shrot="typo"), "caption.shrot: Extra inputs are not permitted"),
    (lambda t: t.pop("bucket"), "bucket: Field required"),
    (lambda t: t.update(width="wide"), "width: Input should be a valid integer"),
])
def test_bad_records_are_refused_with_the_reason(mutate, message):
    tree = json.loads(full_record().to_json())
    mutate(tree)
    with pytest.raises(RecordError, match="shard.tar:k.json: .*" + message.replace("(", r"\(")):
        ClipRecord.from_json(json.dumps(tree), where="shard.tar:k.json")


def test_not_json_is_a_record_error():
    with pytest.raises(RecordError, match="x.json: not JSON"):
        ClipRecord.from_json(b"\xff\x00", where="x.json")
    with pytest.raises(RecordError, match="expected a JSON object"):
        ClipRecord.from_json(b"[1, 2]", where="x.json")


def test_a_schema_1_record_and_manifest_read_under_todays_score_names():
    """Schema 1 named the share of the frame kept inside black bars `border_area` (which reads as the
    share cut away); schema 2 calls it `picture_area`. Older records and manifests read as schema 2."""
    import pyarrow as pa

    from spacetime import contract

    tree = json.loads(full_record().to_json())
    tree.update(schema_version=1, scores={"border_area": 0.82, "motion": 0.02})
    tree.pop("grounding")  # schemas 1 and 2 had none
    old = ClipRecord.from_json(json.dumps(tree))
    assert old.schema_version == SCHEMA_VERSION == 3 and old.scores == {"picture_area": 0.82, "motion": 0.02}
    assert old.grounding == []
    tree.update(schema_version=2, scores={"picture_area": 0.5})
    assert ClipRecord.from_json(json.dumps(tree)).grounding == []
    assert "border_area" not in contract.SCORE_FIELDS and "picture_area" in contract.SCORE_FIELDS
    legacy = pa.array([{"border_area": 0.82, "motion": None}], pa.struct([("border_area", pa.float64()),
                                                                          ("motion", pa.float64())]))
    assert contract.scores_of(legacy.to_pylist()[0]) == {"picture_area": 0.82}
    assert contract.scores_of('{"border_area": 1.0}') == {"picture_area": 1.0}
