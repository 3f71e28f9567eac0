"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints, built locally, for tests and offline demos.

No model hub is reachable on the machines this project is tested on, so the captioner's real loading
code (transformers' `AutoProcessor` / `AutoModelForImageTextToText`, vLLM's `LLM` and its OpenAI
server) is exercised with a checkpoint built here: a ~1M-parameter model with the real architecture
and *random* weights, a byte-level BPE tokenizer trained locally with `tokenizers` (same
normaliser / pre-tokeniser / decoder as Qwen2's), the Qwen special tokens, the Qwen2-VL chat
template and the image / video processor configs, all written with `save_pretrained`.

Its output is meaningless text. It exists so that every code path that loads and runs a real
captioner runs here too, fast, on a CPU.

Builds are deterministic (fixed seeds, deterministic tokenizer training) and idempotent: a folder
whose marker file (written last) matches the current build spec is not rebuilt.

`tiny_corpus()` and the tokenizer trainers are shared with `training.text_encoder`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

MARKER = ".tiny_build_complete"
SEED = 1234
FAMILIES = ("qwen2_5_vl", "qwen2_vl")

# Bump when anything that changes the written files changes: complete folders with another
# version are rebuilt.
_BUILD_VERSION = 2

# --------------------------------------------------------------------------------------------------
# Built-in English text for tokenizer training (deterministic; no downloads).
# --------------------------------------------------------------------------------------------------

_PARAGRAPHS = """\
A video is a sequence of frames shown quickly enough that the eye sees motion. Each frame is an image
with a width, a height and three colour channels. Cameras record frames at a fixed or variable rate,
often twenty four, twenty five, thirty or sixty frames per second, and an encoder compresses them so
that the file stays small. The decoder reverses the process and returns the frames in presentation
order, each with a timestamp.
A caption describes what happens in a clip: who or what is visible, what they are doing, where the
scene takes place, how the camera moves, and what the light and colours look like. Good captions are
specific and short. They name the subject first, then the action, then the setting, and they avoid
guessing what cannot be seen.
A scene cut is a sudden change from one shot to another. A fade slowly darkens or brightens the
picture, and a dissolve blends two shots for a moment. Curation tools split long videos at cuts,
score each clip for motion, sharpness, text overlays and aesthetic quality, and keep the clips that
are useful for training a model.
Diffusion models learn to remove noise from data step by step. A video diffusion transformer cuts a
compressed latent video into small spacetime patches, adds noise, and learns to predict the noise or
the clean signal given a text prompt. At sampling time it starts from pure noise and denoises it into
a new video that follows the prompt.
The quick brown fox jumps over the lazy dog. A small red boat drifts across a calm lake at sunrise.
Two children run along a sandy beach while waves roll onto the shore. A chef slices vegetables on a
wooden board in a bright kitchen. Traffic moves slowly through a busy city street in the rain at night.
"""

_SUBJECTS = [
    "a man", "a woman", "a child", "an old man", "a young woman", "two people", "a group of friends",
    "a dog", "a cat", "a horse", "a bird", "a flock of birds", "a red car", "a white truck", "a train",
    "a cyclist", "a runner", "a chef", "a dancer", "a musician", "a surfer", "a skier", "a boat",
    "a drone", "a crowd", "a teacher", "a student", "a farmer", "a fisherman", "a painter",
]
_ACTIONS = [
    "walks", "runs", "jumps", "dances", "sings", "plays the guitar", "rides a bicycle", "drives",
    "swims", "climbs a hill", "reads a book", "cooks dinner", "paints a picture", "talks on the phone",
    "waves at the camera", "looks around", "sits quietly", "crosses the road", "flies", "turns left",
    "slows down", "speeds up", "laughs", "smiles", "points at something", "opens a door",
    "carries a box", "throws a ball", "catches a fish", "writes a letter",
]
_PLACES = [
    "in a park", "on a beach", "in a forest", "in a busy street", "in a small kitchen",
    "on a mountain road", "in a snowy field", "near a river", "inside an office", "on a stage",
    "in a garden", "at a train station", "under a bridge", "in a desert", "by the sea",
    "in a crowded market", "on a rooftop", "in a classroom", "in a stadium", "at the airport",
]
_CAMERA = [
    "The camera pans slowly to the right.", "The camera stays still.", "The camera zooms in.",
    "The camera follows the subject.", "The shot is handheld and shaky.", "The view is from above.",
    "The camera tilts up toward the sky.", "The shot is a close up.", "The shot is a wide angle view.",
    "The camera moves backward.",
]
_LIGHT = [
    "The light is warm and soft.", "It is a cloudy day.", "The scene is lit by bright sunlight.",
    "It is night and the street lights are on.", "The colours are vivid.", "The image is dark and grainy.",
    "The sky is blue and clear.", "Rain falls steadily.", "Fog covers the background.",
    "The picture is slightly blurred.",
]


def tiny_corpus(n_sentences: int = 3000, seed: int = SEED) -> list[str]:
    """Deterministic English text for tokenizer training: fixed paragraphs, templated caption-like
    sentences and, where the interpreter ships it, the English prose of the Python language
    reference bundled with the standard library (`pydoc_data.topics`), which gives a BPE enough
    distinct words for a vocabulary of a few thousand tokens."""
    rng = random.Random(seed)
    lines = [line for line in _PARAGRAPHS.splitlines() if line.strip()]
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the built-in text alone still works
        topics = {}
    for key in sorted(topics):
        lines.extend(line.strip() for line in topics[key].splitlines() if line.strip())
    for i in range(n_sentences):
        subject = rng.choice(_SUBJECTS)
        caption = f"{subject[0].upper()}{subject[1:]} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}. "
        caption += f"{rng.choice(_CAMERA)} {rng.choice(_LIGHT)}"
        if i % 7 == 0:
            caption += f" The clip lasts {rng.randint(2, 60)} seconds at {rng.choice([24, 25, 30, 60])} fps."
        lines.append(caption)
    return lines


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------

# Qwen2's pre-tokeniser split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX).
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2-VL / Qwen2.5-VL special tokens, in their real order (real ids start at 151643). Here they
# are appended right after the trained vocabulary, in the same order.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL / Qwen2.5-VL chat template (text, image and video content parts).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_byte_level_bpe(texts: list[str], vocab_size: int = 3000):
    """Train a byte-level BPE `tokenizers.Tokenizer` with Qwen2's normaliser, pre-tokeniser and
    decoder. Returns (vocab: dict[str, int], merges: list[tuple[str, str]])."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def train_unigram(texts: list[str], vocab_size: int = 2000, special_tokens: list[str] | None = None):
    """A SentencePiece-style Unigram vocabulary (Metaspace pre-tokenisation, like T5's), built
    deterministically: the pieces are those of a BPE trained with `tokenizers` on `texts`, and each
    piece's score is the log of its relative frequency when the BPE tokenises `texts`.

    (`tokenizers`' own UnigramTrainer is not reproducible from run to run: its scores, and so the
    saved files, change with Rust's per-process hash seeds.)

    Returns [(piece, log_prob)], the special tokens first in the given order (score 0.0)."""
    import math
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    special_tokens = special_tokens or ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens), min_frequency=2, show_progress=False, special_tokens=[]
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    counts = Counter(t for enc in tok.encode_batch(texts) for t in enc.tokens)
    pieces = sorted(tok.get_vocab(), key=lambda p: (-counts[p], p))
    total = sum(counts.values()) + len(pieces)
    vocab = [(t, 0.0) for t in special_tokens]
    vocab += [(p, math.log((counts[p] + 1) / total)) for p in pieces if p not in special_tokens]
    return vocab


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


# --------------------------------------------------------------------------------------------------
# Build helpers shared by the tiny builders
# --------------------------------------------------------------------------------------------------


def spec_digest(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def is_complete(out_dir: Path, spec: dict) -> bool:
    marker = Path(out_dir) / MARKER
    try:
        return json.loads(marker.read_text()).get("digest") == spec_digest(spec)
    except (OSError, ValueError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_atomically(out_dir: Path, spec: dict, write_files) -> Path:
    """Run `write_files(tmp_dir)` in a fresh sibling folder, then move its files into `out_dir` and
    write the marker last. Files in `out_dir` that the build does not write are left alone."""
    out_dir = Path(out_dir).expanduser().resolve()
    if is_complete(out_dir, spec):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_files(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER).unlink(missing_ok=True)
        for src in sorted(tmp.rglob("*")):
            if src.is_file():
                dst = out_dir / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(src, 0o644 & ~_umask())  # some writers create 0600 files
                os.replace(src, dst)
        (out_dir / MARKER).write_text(json.dumps({"digest": spec_digest(spec), "spec": spec}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------------
# The tiny VLM
# --------------------------------------------------------------------------------------------------

# Small pixel budgets keep CPU inference fast: an image is at most 112x112 px (16 LLM tokens),
# a video frame at most 56x56 px (4 LLM tokens per 2 frames).
IMAGE_MIN_PIXELS = 28 * 28 * 4
IMAGE_MAX_PIXELS = 28 * 28 * 16
VIDEO_MIN_PIXELS = 28 * 28 * 4
VIDEO_MAX_PIXELS = 28 * 28 * 4
VIDEO_MAX_FRAMES = 32


def _vlm_spec(family: str) -> dict:
    return {
        "kind": "tiny_vlm",
        "family": family,
        "version": _BUILD_VERSION,
        "seed": SEED,
        "bpe_vocab_size": 3000,
    }


def _text_config(vocab_size: int, ids: dict[str, int]) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the smallest head size vLLM's CPU attention supports
        num_key_value_heads=1,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=2,
        # mrope sections sum to head_dim / 2 (real models: [16, 24, 24] for head_dim 128)
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        initializer_range=0.02,
    )


def _model_config(family: str, vocab_size: int, ids: dict[str, int]):
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text = _text_config(vocab_size, ids)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            hidden_act="silu",
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=112,
            out_hidden_size=text["hidden_size"],
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=text["hidden_size"],
            hidden_act="quick_gelu",
            mlp_ratio=2,
            num_heads=2,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    raise ValueError(f"unknown tiny VLM family {family!r}; expected one of {FAMILIES}")


_MODEL_CARD = """\
# Tiny random {arch} (spacetime test stand-in)

**This is NOT a trained model.** Its weights are random (seed {seed}); it produces meaningless text.

It was built locally by `spacetime.standins.tiny_vlm.build_tiny_vlm(out_dir, family="{family}")` so that the
code that loads and runs real captioners (transformers `AutoProcessor` /
`AutoModelForImageTextToText`, vLLM's `LLM` and OpenAI-compatible server) can be exercised offline on
a CPU, without downloading real weights.

- architecture: `{arch_class}` ({n_params:,} parameters): text 2 layers, hidden 64, 2 heads of 32;
  vision tower 2 blocks, hidden 32; patch 14, temporal patch 2, spatial merge 2 (the real defaults)
- tokenizer: `Qwen2Tokenizer`, a byte-level BPE of {n_bpe} tokens (Qwen2's pre-tokeniser) trained
  with the `tokenizers` library on built-in English text, followed by the Qwen special tokens
  ({special_ids}); the model's vocabulary is padded to {vocab_size} (a multiple of 64)
- chat template: the Qwen2-VL template (text, image and video content parts)
- processor: images {img_min}-{img_max} pixels, video frames {vid_min}-{vid_max} pixels (kept small
  so CPU inference is fast)
"""


def build_tiny_vlm(out_dir: Path, family: str = "qwen2_5_vl") -> Path:
    """Build (or reuse) a tiny random Qwen2.5-VL / Qwen2-VL checkpoint in `out_dir`; returns its path.

    The folder loads offline with `AutoProcessor.from_pretrained`,
    `AutoModelForImageTextToText.from_pretrained` and `vllm.LLM(model=out_dir)`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; expected one of {FAMILIES}")
    spec = _vlm_spec(family)
    return build_atomically(Path(out_dir), spec, lambda tmp: _write_tiny_vlm(tmp, family, spec))


def _write_tiny_vlm(out: Path, family: str, spec: dict) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    # 1. tokenizer: trained BPE, then the Qwen special tokens appended in their real order
    vocab, merges = train_byte_level_bpe(tiny_corpus(), vocab_size=spec["bpe_vocab_size"])
    n_bpe = len(vocab)
    ids = {}
    for tok in QWEN_SPECIAL_TOKENS:
        ids[tok] = len(vocab)
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in merges],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=4096,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    for tok, i in ids.items():
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != i:
            raise RuntimeError(f"special token {tok} got id {got}, expected {i}")
    vocab_size = _round_up(len(vocab), 64)

    # 2. model: random weights from the config, seeded
    config = _model_config(family, vocab_size, ids)
    # Real Qwen-VL checkpoints are bfloat16; so is this one (vLLM's CPU backend runs bf16 anyway).
    config.dtype = "bfloat16"
    torch.manual_seed(SEED)
    with torch.no_grad():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).to(torch.bfloat16)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())

    # 3. processor: tokenizer + image and video processors with small pixel budgets
    image_processor = Qwen2VLImageProcessor(
        min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=VIDEO_MIN_PIXELS,
        max_pixels=VIDEO_MAX_PIXELS,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        min_frames=2,
        max_frames=VIDEO_MAX_FRAMES,
        cap_pixels_per_frame=True,
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLProcessor as Processor
    processor = Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Recent transformers keep the sub-processor settings in processor_config.json; releases before
    # v5 (and other tools) read the standalone files that real checkpoints ship.
    image_processor.save_pretrained(out)
    video_processor.save_pretrained(out)

    (out / "README.md").write_text(
        _MODEL_CARD.format(
            arch=family.replace("_", "-"),
            arch_class=type(model).__name__,
            family=family,
            seed=SEED,
            n_params=n_params,
            n_bpe=n_bpe,
            special_ids=", ".join(f"`{t}`={i}" for t, i in ids.items() if t in (
                "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|video_pad|>")),
            vocab_size=vocab_size,
            img_min=IMAGE_MIN_PIXELS,
            img_max=IMAGE_MAX_PIXELS,
            vid_min=VIDEO_MIN_PIXELS,
            vid_max=VIDEO_MAX_PIXELS,
        )
    )
    shutil.copyfile(out / "README.md", out / "TINY_MODEL_CARD.md")
