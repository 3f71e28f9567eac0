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

The tiny random stand-in for tests (`spacetime.standins.tiny_clip`) is loaded through the same two
functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

LAION_HIDDEN = (1024, 128, 64, 16)

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
