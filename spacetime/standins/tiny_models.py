"""Builds every tiny random stand-in model the tests and offline demos need, in one folder.

    out_dir/
      vlm/            tiny random Qwen2.5-VL (tiny_vlm)                 -> transformers, vLLM
      clip/           tiny open_clip ViT + aesthetic head (tiny_clip)   -> curation.clip_models
      text_encoder/   tiny random T5 encoder (tiny_text_encoder)        -> training.text_encoder
      tiny_models.json  what is where (absolute paths), written last

Backs `spacetime models build-tiny --out DIR`. Idempotent: complete parts are not rebuilt. None of
these models is trained: they exist so that the real loading code runs without downloads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from spacetime.models import TINY_MANIFEST as MANIFEST
from spacetime.models import default_tiny_dir  # noqa: F401 (where `spacetime models build-tiny` writes)
from spacetime.io import atomic_write


def build_all(out_dir: Path, vlm_family: str = "qwen2_5_vl") -> dict:
    """Build (or reuse) the tiny VLM, CLIP + aesthetic head and text encoder under `out_dir` and
    write `out_dir/tiny_models.json`. Returns the manifest:

        {"root", "vlm": {"path", "family"},
         "clip": {"model_name", "config_dir", "pretrained", "aesthetic_head", "embed_dim", "image_size"},
         "text_encoder": {"path"}, "build_seconds": {...}}
    """
    from spacetime.standins.tiny_vlm import build_tiny_vlm
    from spacetime.standins.tiny_clip import build_tiny_clip
    from spacetime.standins.tiny_text_encoder import build_tiny_text_encoder

    root = Path(out_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    seconds = {}

    t = time.perf_counter()
    vlm = build_tiny_vlm(root / "vlm", family=vlm_family)
    seconds["vlm"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    clip = build_tiny_clip(root / "clip")
    seconds["clip"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    text_encoder = build_tiny_text_encoder(root / "text_encoder")
    seconds["text_encoder"] = round(time.perf_counter() - t, 3)

    manifest = {
        "note": "random, untrained stand-in models for tests; see each folder's README.md",
        "root": str(root),
        "vlm": {"path": str(vlm), "family": vlm_family},
        "clip": clip,
        "text_encoder": {"path": str(text_encoder)},
    }
    atomic_write(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "build_seconds": seconds}
