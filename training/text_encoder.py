"""Frozen text encoders for DiT conditioning: T5 (and mT5 / UMT5) encoders or CLIP text towers.

`load_text_encoder` is the one loading path for real models (a Hugging Face id such as
"google/t5-v1_1-xxl" on a machine with the hub, or a local folder) and for the tiny random stand-in
that tests build (`spacetime.standins.tiny_text_encoder`).
"""

from __future__ import annotations


import torch

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
