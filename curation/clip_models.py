"""CLIP image embeddings and the LAION aesthetic predictor, loaded through open_clip.

`load_clip` is the one loading path for real and tiny models:

    load_clip("ViT-L-14", "openai")                              # a tag (weights fetched by open_clip)
    load_clip("ViT-L-14", "/models/open_clip_model.safetensors") # a local checkpoint file
    load_clip("spacetime-tiny-ViT", ".../tiny.safetensors", config_dir=".../model_configs")

`AestheticHead` is the MLP of LAION's "improved aesthetic predictor"
(github.com/christophschuhmann/improved-aesthetic-predictor): it takes the L2-normalised CLIP image
embedding and returns a score on a roughly 1-10 scale. Its state-dict keys (`layers.0`, `layers.2`,
`layers.4`, `layers.6`, `layers.7`) match the released files (e.g. `sac+logos+ava1-l14-linearMSE.pth`
for ViT-L-14, input 768), so those load with `load_aesthetic_head` unchanged; the layer sizes are
read from the file.

`build_tiny_clip` writes a tiny random open_clip ViT and a random head for tests; they are loaded
through the same two functions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

LAION_HIDDEN = (1024, 128, 64, 16)

TINY_CLIP_NAME = "spacetime-tiny-ViT"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    # the vocabulary of open_clip's bundled BPE tokenizer, so `open_clip.get_tokenizer` works offline
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_SEED = 1234
_TINY_VERSION = 1


def load_clip(model_name: str, pretrained: str | None, config_dir: str | None = None, device: str = "cpu"):
    """Create an open_clip model and its inference transform.

    `pretrained` is an open_clip tag (e.g. "openai", "laion2b_s32b_b82k"), a path to a checkpoint file
    (.safetensors / .bin / .pt), or None for random weights. `config_dir` (a folder of open_clip model
    config JSONs, or one JSON file) is registered first, for architectures open_clip does not ship.

    Returns (model in eval mode, preprocess) where preprocess maps a PIL image to a [3, H, W] tensor.
    """
    import open_clip

    if config_dir is not None:
        path = Path(config_dir)
        if not path.exists():
            raise FileNotFoundError(f"open_clip config dir not found: {path}")
        open_clip.add_model_config(path)
    if pretrained is not None and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise FileNotFoundError(f"CLIP checkpoint not found: {pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    model.eval()
    return model, preprocess


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or "\\" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


@torch.inference_mode()
def embed_frames(model, preprocess, frames: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Embed RGB frames (H x W x 3 uint8 arrays) with a CLIP image tower.

    Returns a float32 array [N, D] whose rows have unit L2 norm (the convention of CLIP retrieval
    and of the LAION aesthetic head)."""
    from PIL import Image

    embed_dim = getattr(model, "embed_dim", None) or model.visual.output_dim
    if len(frames) == 0:
        return np.zeros((0, embed_dim), dtype=np.float32)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    out = []
    for start in range(0, len(frames), batch_size):
        batch = []
        for frame in frames[start : start + batch_size]:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"expected H x W x 3 uint8 frames, got {frame.shape} {frame.dtype}")
            batch.append(preprocess(Image.fromarray(frame)))
        pixels = torch.stack(batch).to(device=device, dtype=dtype)
        features = model.encode_image(pixels).float()
        out.append(torch.nn.functional.normalize(features, dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32, copy=False)


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor MLP: Linear(D,1024) Dropout Linear(1024,128) Dropout
    Linear(128,64) Dropout Linear(64,16) Linear(16,1). Input: L2-normalised CLIP image embeddings."""

    def __init__(self, embed_dim: int = 768, hidden: Sequence[int] = LAION_HIDDEN):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.embed_dim = embed_dim
        self.hidden = tuple(hidden)
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    @torch.inference_mode()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores [N] for L2-normalised embeddings [N, D]."""
        x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"expected embeddings [N, {self.embed_dim}], got {tuple(x.shape)}")
        return self(x).numpy()


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """Load an aesthetic head from a state dict (.pth / .pt / .bin via torch.load, or .safetensors);
    the input and hidden sizes are read from the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    try:
        embed_dim = state["layers.0.weight"].shape[1]
        hidden = [state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6)]
    except KeyError as err:
        raise ValueError(f"{path} is not an aesthetic-predictor state dict (missing {err})") from None
    head = AestheticHead(embed_dim, hidden)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    head.eval()
    return head


_TINY_CARD = """\
# Tiny random open_clip ViT + aesthetic head (spacetime test stand-ins)

**These are NOT trained models.** Their weights are random (seed {seed}); embeddings and scores carry
no meaning.

Built locally by `curation.clip_models.build_tiny_clip(out_dir)` so that the code that loads real
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
    from captioner.tiny_vlm import build_atomically

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
