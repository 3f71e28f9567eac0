"""The `transformers` reference engine (generate() under the same JSON schema, via llguidance) on the
tiny random Qwen2.5-VL: clips through the caption stage, and prompt upsampling."""

from __future__ import annotations


import pytest

from captioner.core import Captioner
from curation.caption import Caption
from captioner.upsample import upsample
from curation.pipeline import unpack
from tests.caption_support import TINY_LIMITS, caption_config, clips, stage_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cfg(tiny_models):
    return caption_config(tiny_models["vlm"]["path"], engine="transformers")


def test_transformers_engine_captions_clips(cfg, tmp_path):
    rows = [unpack(r) for r in stage_rows(clips(2))]
    with Captioner(cfg) as captioner:
        Caption(cfg, captioner=captioner).process(rows)
    for meta, _ in rows:
        clip = meta["clip"]
        assert clip["status"] == "candidate", clip.get("reason")
        assert 0 < len(clip["caption"]) <= TINY_LIMITS["dense_chars"]
        assert clip["caption_provenance"]["engine"] == "transformers"
        assert clip["caption_provenance"]["request"]["id"] == clip["clip_id"] + "-0"


def test_upsample_returns_a_dense_caption(cfg):
    dense = upsample("a cat on a skateboard", cfg, examples=["A dog runs along a beach at sunset."])
    assert isinstance(dense, str) and 0 < len(dense) <= TINY_LIMITS["dense_chars"]
    with pytest.raises(ValueError, match="empty prompt"):
        upsample("  ", cfg)
