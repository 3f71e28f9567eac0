"""One latent-cache entry (training.cache) -> what a DiT step needs: the cache's counterpart of
decode.py, used by the loader when loader.data names latent caches.

    latent, entry = read_entry(parts, spec, where)        # [2, C, T', H', W'] float32, CacheEntry
    rows = caption_rows(parts, entry, kind, null_text)    # kind from decode.caption_kind
    text, mask = pad_text(rows, max_length)               # [L, D] float32, [L] bool
"""

from __future__ import annotations

import io

import numpy as np

from spacetime import contract


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy bytes of `array` (no pickle; the same array always gives the same bytes)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def read_entry(parts: dict[str, bytes], size: tuple[int, int], frames: int,
               where: str) -> tuple[np.ndarray, contract.CacheEntry]:
    """The posterior and the entry of a cache sample, checked against the bucket the loader plans
    (`size`, `frames`): an entry made for another bucket spec is an error naming it."""
    entry = contract.CacheEntry.model_validate_json(parts[contract.ENTRY_EXT])
    if tuple(entry.size) != tuple(size) or entry.frames != frames:
        raise ValueError(f"{where}: entry {entry.clip_id} holds {entry.size[0]}x{entry.size[1]}x{entry.frames} "
                         f"latents, the loader plans {size[0]}x{size[1]}x{frames} for {entry.bucket}: rebuild "
                         "the cache with this code (spacetime train cache --rebuild)")
    latent = npy_load(parts[contract.LATENT_EXT])
    if latent.ndim != 5 or latent.shape[0] != 2:
        raise ValueError(f"{where}: entry {entry.clip_id}: latent of shape {latent.shape}, expected [2, C, T, H, W]")
    return latent, entry


def caption_rows(parts: dict[str, bytes], entry: contract.CacheEntry, kind: str,
                 null_text: np.ndarray) -> np.ndarray:
    """The encoder rows of the caption `kind` ("empty" | "short" | "dense") of an entry."""
    if kind == "empty":
        return null_text
    ext = contract.SHORT_TEXT_EXT if kind == "short" else contract.TEXT_EXT
    return npy_load(parts[ext])


def pad_text(rows: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, D] unmasked encoder rows -> ([L, D] with zero rows after n, [L] mask), as encode_text gives."""
    text = np.zeros((max_length, rows.shape[1]), np.float32)
    text[: len(rows)] = rows
    mask = np.zeros(max_length, bool)
    mask[: len(rows)] = True
    return text, mask
