"""The tiny random models load and run through the same code paths as real ones (offline, CPU)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch


def decode_rgb(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def test_build_all_writes_manifest_and_is_idempotent(tiny_models):
    from spacetime.standins.tiny_models import MANIFEST, build_all

    root = Path(tiny_models["root"])
    on_disk = json.loads((root / MANIFEST).read_text())
    assert on_disk["vlm"]["path"] == str(root / "vlm")
    assert on_disk["clip"]["pretrained"] == str(root / "clip" / "spacetime-tiny-ViT.safetensors")
    assert on_disk["text_encoder"]["path"] == str(root / "text_encoder")
    for part in ("vlm", "clip", "text_encoder"):
        card = (root / part / "README.md").read_text()
        assert "NOT" in card and "random" in card
    assert "random" in (root / "vlm" / "TINY_MODEL_CARD.md").read_text()

    before = _digests(root / "vlm")
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "vlm").iterdir()}
    again = build_all(root)
    assert {k: again[k] for k in on_disk} == on_disk
    assert all(s < 2.0 for s in again["build_seconds"].values()), again["build_seconds"]
    assert {p: p.stat().st_mtime_ns for p in (root / "vlm").iterdir()} == mtimes
    assert _digests(root / "vlm") == before


def test_vlm_build_is_deterministic(tiny_models, tmp_path):
    from spacetime.standins.tiny_vlm import build_tiny_vlm

    fresh = build_tiny_vlm(tmp_path / "vlm")
    assert _digests(fresh) == _digests(Path(tiny_models["vlm"]["path"]))


def test_default_tiny_dir(monkeypatch, tmp_path):
    from spacetime.standins.tiny_models import default_tiny_dir

    monkeypatch.setenv("SPACETIME_TINY_MODELS", str(tmp_path / "x"))
    assert default_tiny_dir() == tmp_path / "x"
    monkeypatch.delenv("SPACETIME_TINY_MODELS")
    assert default_tiny_dir() == Path.home() / ".cache" / "spacetime" / "tiny-models"


# --------------------------------------------------------------------------------------------------
# VLM through transformers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_models["vlm"]["path"]
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return processor, model


def test_vlm_config_tokenizer_and_processor_agree(vlm):
    processor, model = vlm
    tok, cfg = processor.tokenizer, model.config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == processor.image_token_id
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>") == processor.video_token_id
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert 2000 <= len(tok) <= cfg.text_config.vocab_size <= 4096
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 2_000_000
    vc = cfg.vision_config
    assert (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size) == (14, 2, 2)
    # the special tokens are atomic and ordinary text round-trips through the trained BPE
    text = "A red car drives along a mountain road at sunset."
    ids = tok(f"<|im_start|>user\n{text}<|im_end|>").input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == cfg.text_config.eos_token_id
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok(text).input_ids) < len(text) / 2  # real merges, not bytes


def _chat(processor, kind: str) -> str:
    messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": f"Describe this {kind}."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert f"<|vision_start|><|{kind}_pad|><|vision_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    return text


def test_vlm_generate_on_image(vlm):
    processor, model = vlm
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    inputs = processor(text=[_chat(processor, "image")], images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"][0]
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == int(grid.prod()) // 4 > 0
    assert int(grid.prod()) * 14 * 14 <= 28 * 28 * 16  # the small max_pixels of the tiny processor
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.shape == (6,)
    assert isinstance(processor.decode(new, skip_special_tokens=True), str)


def test_vlm_generate_on_decoded_video(vlm, synthetic_video):
    processor, model = vlm
    frames = decode_rgb(synthetic_video)
    assert len(frames) == 16 and frames[0].shape == (64, 96, 3)
    inputs = processor(text=[_chat(processor, "video")], videos=[frames], return_tensors="pt")
    grid = inputs["video_grid_thw"][0]
    assert int(grid[0]) == len(frames) // 2  # temporal patch 2
    n_video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video_tokens == int(grid.prod()) // 4 > 0
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        again = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    assert new.shape == (6,)
    assert torch.equal(out, again)  # greedy decoding is deterministic


def test_qwen2_vl_family_builds_and_loads(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from spacetime.standins.tiny_vlm import build_tiny_vlm

    path = build_tiny_vlm(tmp_path / "qwen2vl", family="qwen2_vl")
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    image = np.full((56, 56, 3), 128, np.uint8)
    inputs = processor(text=[_chat(processor, "image")], images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    with pytest.raises(ValueError, match="unknown tiny VLM family"):
        build_tiny_vlm(tmp_path / "nope", family="llava")


# --------------------------------------------------------------------------------------------------
# CLIP + aesthetic head
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tiny_models):
    from curation.clip_models import load_clip

    c = tiny_models["clip"]
    model, preprocess = load_clip(c["model_name"], c["pretrained"], config_dir=c["config_dir"])
    return model, preprocess


def test_clip_loads_saved_weights(tiny_models, clip):
    from safetensors.torch import load_file

    model, _ = clip
    saved = load_file(tiny_models["clip"]["pretrained"])
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)  # weights came from the file, not init


def test_embed_frames_unit_norm_and_distinct(tiny_models, clip, synthetic_video):
    from curation.clip_models import embed_frames

    model, preprocess = clip
    frames = decode_rgb(synthetic_video)[::5]  # 4 frames, the square in different places
    emb = embed_frames(model, preprocess, frames + [frames[0]])
    assert emb.shape == (5, tiny_models["clip"]["embed_dim"]) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[4], emb[0], atol=1e-6)  # same frame, same embedding
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(emb[i], emb[j], atol=1e-4), (i, j)
    assert embed_frames(model, preprocess, []).shape == (0, tiny_models["clip"]["embed_dim"])
    with pytest.raises(ValueError, match="uint8"):
        embed_frames(model, preprocess, [frames[0].astype(np.float32)])


def test_load_clip_missing_checkpoint_is_clear(tiny_models, tmp_path):
    from curation.clip_models import load_clip

    c = tiny_models["clip"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip(c["model_name"], str(tmp_path / "missing.safetensors"), config_dir=c["config_dir"])


def test_aesthetic_head_scores(tiny_models, clip, synthetic_video):
    from curation.clip_models import embed_frames, load_aesthetic_head

    model, preprocess = clip
    head = load_aesthetic_head(tiny_models["clip"]["aesthetic_head"])
    assert head.embed_dim == tiny_models["clip"]["embed_dim"]
    emb = embed_frames(model, preprocess, decode_rgb(synthetic_video)[:3])
    scores = head.score(emb)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert (1.0 < scores).all() and (scores < 10.0).all()
    with pytest.raises(ValueError, match="embeddings"):
        head.score(np.zeros((2, head.embed_dim + 1), np.float32))


def test_aesthetic_head_reads_laion_layout(tmp_path):
    """A file in the released predictor's layout (ViT-L-14: 768-1024-128-64-16-1) loads with its
    sizes read from the weights, and the loaded head computes what the saved one does."""
    from curation.clip_models import AestheticHead, load_aesthetic_head

    torch.manual_seed(0)
    laion = AestheticHead(768).eval()
    assert [k for k in laion.state_dict() if k.endswith("weight")] == [
        f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)
    ]
    torch.save(laion.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head = load_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert (head.embed_dim, head.hidden) == (768, (1024, 128, 64, 16))
    x = torch.nn.functional.normalize(torch.randn(4, 768), dim=-1)
    with torch.inference_mode():
        np.testing.assert_allclose(head.score(x.numpy()), laion(x).numpy(), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------


def test_text_encoder_shapes_and_mask(tiny_models):
    from training.text_encoder import encode_text, load_text_encoder

    tokenizer, model = load_text_encoder(tiny_models["text_encoder"]["path"])
    assert type(model).__name__ == "T5EncoderModel"
    assert not any(p.requires_grad for p in model.parameters())
    prompts = ["A dog runs along a sandy beach at sunrise.", "Rain.", "word " * 100]
    emb, mask = encode_text(tokenizer, model, prompts, max_length=24)
    assert emb.shape == (3, 24, model.config.d_model) and emb.dtype == torch.float32
    assert mask.shape == (3, 24) and mask.dtype == torch.bool
    lengths = [len(tokenizer(p).input_ids) for p in prompts[:2]]
    assert mask.sum(1).tolist() == [lengths[0], lengths[1], 24]  # the long prompt is truncated
    assert mask[:, 0].all() and not mask[1, lengths[1]:].any()
    assert torch.isfinite(emb).all()
    assert (emb[1, lengths[1]:] == 0).all() and emb[1, : lengths[1]].abs().sum() > 0
    assert not torch.allclose(emb[0, 0], emb[1, 0])  # different first tokens, different embeddings
    emb2, _ = encode_text(tokenizer, model, prompts[:1], max_length=24)
    torch.testing.assert_close(emb2[0], emb[0], rtol=1e-5, atol=1e-5)  # batching does not leak


def test_load_text_encoder_rejects_other_architectures(tiny_models):
    from training.text_encoder import load_text_encoder

    with pytest.raises(ValueError, match="unsupported text encoder model_type 'qwen2_5_vl'"):
        load_text_encoder(tiny_models["vlm"]["path"])


def test_build_tiny_cli(tmp_path):
    """`spacetime models build-tiny --out DIR` builds the stand-ins and says they are random."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = subprocess.run([sys.executable, "-m", "spacetime", "models", "build-tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "NOT real weights" in out.stdout
    manifest = json.loads((tmp_path / "tiny_models.json").read_text())
    for part in ("vlm", "clip", "text_encoder"):
        assert part in manifest
    assert (tmp_path / "vlm" / "config.json").exists()
