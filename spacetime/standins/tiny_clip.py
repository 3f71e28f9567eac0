"""A tiny RANDOM open_clip ViT and aesthetic head: untrained stand-ins for tests and offline demos.

Loaded through the real loading path (`curation.clip_models.load_clip` / `load_aesthetic_head`),
exactly as real weights are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from curation.clip_models import AestheticHead
from spacetime.standins.tiny_vlm import build_atomically

TINY_CLIP_NAME = "spacetime-tiny-ViT"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    # the vocabulary of open_clip's bundled BPE tokenizer, so `open_clip.get_tokenizer` works offline
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_SEED = 1234
_TINY_VERSION = 1


_TINY_CARD = """\
# Tiny random open_clip ViT + aesthetic head (spacetime test stand-ins)

**These are NOT trained models.** Their weights are random (seed {seed}); embeddings and scores carry
no meaning.

Built locally by `spacetime.standins.tiny_clip.build_tiny_clip(out_dir)` so that the code that loads real
CLIP models and the LAION aesthetic predictor (`load_clip`, `load_aesthetic_head`) runs offline on a
CPU without downloading weights.

- `{name}`: open_clip ViT, config `model_configs/{name}.json` (embed dim {embed_dim}, image size
  {image_size}, 2 vision + 2 text layers; text vocabulary = open_clip's bundled BPE), {n_params:,}
  parameters, weights `{weights}`. Load: `load_clip("{name}", "<weights>", config_dir="<model_configs>")`.
- `{head}`: aesthetic-predictor MLP {embed_dim}-{hidden}-1 (LAION layout), final bias 5 so random
  scores sit mid-scale. Load: `load_aesthetic_head("<head>")`.
"""


def build_tiny_clip(out_dir: str | Path) -> dict:
    """Write a tiny random open_clip ViT (config + safetensors weights) and a random aesthetic head
    into `out_dir` (skipped if already complete). Returns what `load_clip` / `load_aesthetic_head`
    need: {"model_name", "config_dir", "pretrained", "aesthetic_head", "embed_dim", "image_size"}."""
    out_dir = Path(out_dir).expanduser().resolve()
    head_hidden = (64, 32, 16, 8)
    spec = {"kind": "tiny_clip", "version": _TINY_VERSION, "seed": TINY_SEED, "config": TINY_CLIP_CONFIG,
            "head_hidden": head_hidden}
    weights_name = f"{TINY_CLIP_NAME}.safetensors"
    head_name = "aesthetic_head.pth"

    def write(tmp: Path) -> None:
        import open_clip
        from safetensors.torch import save_file

        config_dir = tmp / "model_configs"
        config_dir.mkdir()
        (config_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
        open_clip.add_model_config(config_dir)
        torch.manual_seed(TINY_SEED)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # "No pretrained weights loaded ... initialized randomly": intended
        try:
            model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
        finally:
            logging.disable(previous)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / weights_name), metadata={"format": "pt"})

        torch.manual_seed(TINY_SEED + 1)
        head = AestheticHead(TINY_CLIP_CONFIG["embed_dim"], head_hidden)
        with torch.no_grad():
            head.layers[-1].bias.fill_(5.0)
        torch.save(head.state_dict(), tmp / head_name)
        (tmp / "README.md").write_text(
            _TINY_CARD.format(
                seed=TINY_SEED,
                name=TINY_CLIP_NAME,
                embed_dim=TINY_CLIP_CONFIG["embed_dim"],
                image_size=TINY_CLIP_CONFIG["vision_cfg"]["image_size"],
                n_params=sum(p.numel() for p in model.parameters()),
                weights=weights_name,
                head=head_name,
                hidden="-".join(map(str, head_hidden)),
            )
        )

    build_atomically(out_dir, spec, write)
    return {
        "model_name": TINY_CLIP_NAME,
        "config_dir": str(out_dir / "model_configs"),
        "pretrained": str(out_dir / weights_name),
        "aesthetic_head": str(out_dir / head_name),
        "embed_dim": TINY_CLIP_CONFIG["embed_dim"],
        "image_size": TINY_CLIP_CONFIG["vision_cfg"]["image_size"],
    }
