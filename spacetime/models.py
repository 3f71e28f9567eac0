"""Model references in configs, resolved the same way everywhere.

    tiny:<key.path>        a tiny RANDOM stand-in built by `spacetime models build-tiny` into
                           $SPACETIME_TINY_MODELS or ~/.cache/spacetime/tiny-models; e.g.
                           tiny:clip.pretrained. For offline runs and tests only. The resolver never
                           builds them itself (the builders live in spacetime.standins, above the
                           wings): the CLI and the tests register a builder with
                           `register_tiny_builder`; without one a missing build is an error that
                           says how to build it.
    hf://<org>/<repo>/<file>  one file of a Hugging Face repository (downloaded to the HF cache)
    /a/local/path          used as is
    anything else          passed through (a Hugging Face id, an open_clip pretrained tag)

`preflight` checks, before any worker starts, that every hub reference can be had, so an offline
machine fails early with a message naming the model and the offline profile, not deep in an actor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from spacetime.errors import UserError

TINY_MANIFEST = "tiny_models.json"
_tiny_builder: Callable[[Path], dict] | None = None


class ModelUnavailable(UserError, RuntimeError):
    """A model reference that cannot be had here; the message names it and what to do."""


def default_tiny_dir() -> Path:
    """`$SPACETIME_TINY_MODELS`, else `~/.cache/spacetime/tiny-models`."""
    env = os.environ.get("SPACETIME_TINY_MODELS")
    return Path(env).expanduser() if env else Path("~/.cache/spacetime/tiny-models").expanduser()


def register_tiny_builder(builder: Callable[[Path], dict] | None) -> None:
    """Let `tiny:` references build the stand-ins on first use (`builder(folder)` writes them and
    TINY_MANIFEST). Called by the CLI and the tests; None switches it off."""
    global _tiny_builder
    _tiny_builder = builder


OFFLINE_HINT = ("this machine cannot fetch it (no hub access or HF_HUB_OFFLINE=1); put the weights in a "
                "local path and point the config at it, or use the offline profile "
                "--config configs/curate/tiny.yaml (tiny random stand-in models)")


def _tiny(key: str) -> str:
    root = default_tiny_dir()
    manifest_path = root / TINY_MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
    elif _tiny_builder is not None:
        manifest = _tiny_builder(root)
    else:
        raise ModelUnavailable(f"tiny:{key}: the tiny stand-in models are not built in {root}; run "
                               f"`spacetime models build-tiny --out {root}` (or set SPACETIME_TINY_MODELS)")
    value = manifest
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ModelUnavailable(f"tiny:{key}: no such entry in {manifest_path}")
        value = value[part]
    return str(value)


def _hub_file(ref: str) -> str:
    from huggingface_hub import hf_hub_download

    parts = ref[len("hf://"):].split("/")
    if len(parts) < 3:
        raise ModelUnavailable(f"{ref}: expected hf://<org>/<repo>/<file>")
    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as err:
        raise ModelUnavailable(f"model {ref}: {OFFLINE_HINT} ({type(err).__name__})") from None


def resolve(ref: str | None) -> str | None:
    """A config's model reference -> what loaders take (a path, id or tag)."""
    if ref is None:
        return None
    if ref.startswith("tiny:"):
        return _tiny(ref[len("tiny:"):])
    if ref.startswith("hf://"):
        return _hub_file(ref)
    return ref


def preflight_open_clip(model_name: str, pretrained: str | None) -> None:
    """An open_clip pretrained TAG (not a path) needs the hub: check it can be had."""
    if pretrained is None or os.path.exists(pretrained):
        return
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ModelUnavailable(f"open_clip has no pretrained tag {pretrained!r} for {model_name}")
    try:  # exactly what open_clip will load later, into its cache
        download_pretrained(cfg)
    except Exception as err:
        raise ModelUnavailable(f"open_clip model {model_name} ({pretrained}, {cfg.get('hf_hub') or cfg.get('url')}): "
                               f"{OFFLINE_HINT} ({type(err).__name__})") from None


def preflight_hf_model(ref: str) -> None:
    """A Hugging Face model id (not a local folder) must be fetchable: check its config.json."""
    if Path(ref).expanduser().exists():
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(ref, "config.json")
    except Exception as err:
        raise ModelUnavailable(f"model {ref}: {OFFLINE_HINT} ({type(err).__name__})") from None


def is_local(ref: str) -> bool:
    return Path(ref).exists()
