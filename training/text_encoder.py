"""Frozen text encoders for DiT conditioning: T5 (and mT5 / UMT5) encoders or CLIP text towers.

`load_text_encoder` is the one loading path for real models (a Hugging Face id such as
"google/t5-v1_1-xxl" on a machine with the hub, or a local folder) and for the tiny random encoder
that `build_tiny_text_encoder` writes for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SEED = 1234
_TINY_VERSION = 1

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _encoder_class(model_type: str):
    import transformers

    if model_type == "t5":
        return transformers.T5EncoderModel
    if model_type == "mt5":
        return transformers.MT5EncoderModel
    if model_type == "umt5":
        return transformers.UMT5EncoderModel
    if model_type in ("clip", "clip_text_model"):
        return transformers.CLIPTextModel
    raise ValueError(
        f"unsupported text encoder model_type {model_type!r}: expected t5, mt5, umt5, clip or clip_text_model"
    )


def load_text_encoder(id_or_path: str, dtype: str | torch.dtype | None = None, device: str = "cpu"):
    """Load (tokenizer, encoder) from a Hugging Face id or a local folder.

    The encoder class follows the config's `model_type`: T5EncoderModel for "t5" (MT5/UMT5 encoders
    for "mt5"/"umt5"), CLIPTextModel for "clip"/"clip_text_model". Only the encoder weights are
    loaded (a full T5 checkpoint's decoder is skipped). The model is frozen and in eval mode.
    `dtype` defaults to float32."""
    from transformers import AutoConfig, AutoTokenizer

    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(id_or_path)
    cls = _encoder_class(config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(id_or_path)
    model = cls.from_pretrained(id_or_path, dtype=dtype).to(device)
    model.eval().requires_grad_(False)
    return tokenizer, model


@torch.inference_mode()
def encode_text(tokenizer, model, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts to (embeddings [B, L, D] float32, mask [B, L] bool), L == max_length.

    Prompts are padded / truncated to `max_length` tokens (T5 appends </s>; CLIP adds its start and
    end tokens). Embeddings at padded positions (mask False) are zeroed."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a string")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} exceeds the encoder's {limit} positions")
    batch = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).bool()
    hidden = model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state.float()
    hidden = hidden * mask.unsqueeze(-1)
    return hidden.cpu(), mask.cpu()


_TINY_CARD = """\
# Tiny random T5 encoder (spacetime test stand-in)

**This is NOT a trained model.** Its weights are random (seed {seed}); its embeddings carry no meaning.

Built locally by `training.text_encoder.build_tiny_text_encoder(out_dir)` so that the code that loads
real text encoders (`load_text_encoder`: AutoTokenizer + T5EncoderModel) runs offline on a CPU.

- `T5EncoderModel`: d_model 32, 2 layers, 2 heads, d_ff 64, gated-GELU ({n_params:,} parameters)
- tokenizer: `T5Tokenizer` (Unigram, Metaspace) with {vocab_size} pieces learnt from built-in English
  text with the `tokenizers` library; `<pad>`=0, `</s>`=1, `<unk>`=2 as in T5
"""


def build_tiny_text_encoder(out_dir: str | Path) -> Path:
    """Write a tiny random T5 encoder + locally trained tokenizer to `out_dir` (skipped if already
    complete) with save_pretrained; returns the folder, loadable with `load_text_encoder`."""
    from captioner.tiny_vlm import build_atomically, tiny_corpus, train_unigram

    vocab_size = 2000
    spec = {"kind": "tiny_text_encoder", "version": _TINY_VERSION, "seed": TINY_SEED, "vocab_size": vocab_size}

    def write(tmp: Path) -> None:
        from transformers import T5Config, T5EncoderModel, T5Tokenizer

        vocab = train_unigram(tiny_corpus(), vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"])
        tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
        config = T5Config(
            vocab_size=len(vocab),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=0,
            num_heads=2,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
            tie_word_embeddings=False,
        )
        config.dtype = "float32"
        torch.manual_seed(TINY_SEED)
        model = T5EncoderModel(config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            _TINY_CARD.format(seed=TINY_SEED, n_params=sum(p.numel() for p in model.parameters()),
                              vocab_size=len(vocab))
        )

    return build_atomically(Path(out_dir), spec, write)
