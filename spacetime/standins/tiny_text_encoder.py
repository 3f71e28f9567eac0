"""A tiny RANDOM T5 encoder with a locally trained tokenizer: an untrained stand-in for tests.

Loaded through the real loading path (`training.text_encoder.load_text_encoder`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from spacetime.standins.tiny_vlm import build_atomically, tiny_corpus, train_unigram

TINY_SEED = 1234
_TINY_VERSION = 1


_TINY_CARD = """\
# Tiny random T5 encoder (spacetime test stand-in)

**This is NOT a trained model.** Its weights are random (seed {seed}); its embeddings carry no meaning.

Built locally by `spacetime.standins.tiny_text_encoder.build_tiny_text_encoder(out_dir)` so that the code that loads
real text encoders (`load_text_encoder`: AutoTokenizer + T5EncoderModel) runs offline on a CPU.

- `T5EncoderModel`: d_model 32, 2 layers, 2 heads, d_ff 64, gated-GELU ({n_params:,} parameters)
- tokenizer: `T5Tokenizer` (Unigram, Metaspace) with {vocab_size} pieces learnt from built-in English
  text with the `tokenizers` library; `<pad>`=0, `</s>`=1, `<unk>`=2 as in T5
"""


def build_tiny_text_encoder(out_dir: str | Path) -> Path:
    """Write a tiny random T5 encoder + locally trained tokenizer to `out_dir` (skipped if already
    complete) with save_pretrained; returns the folder, loadable with `load_text_encoder`."""
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
