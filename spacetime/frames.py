"""Frame helpers shared by the wings: display rotation, frames as bytes, decoding that survives damage.

Frames are HxWx3 uint8 RGB numpy arrays. `encode_frames`/`decode_frames` carry a stack of them as
npy bytes (one value in a Ray row; no tensor-extension quirks).
"""

from __future__ import annotations

import io
import logging
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)


def encode_frames(frames: list[np.ndarray]) -> bytes:
    """[N] HxWx3 uint8 frames -> npy bytes."""
    buf = io.BytesIO()
    np.save(buf, np.stack(frames) if len(frames) else np.zeros((0, 0, 0, 3), np.uint8), allow_pickle=False)
    return buf.getvalue()


def decode_frames(data: bytes) -> np.ndarray:
    """npy bytes of `encode_frames` -> [N, H, W, 3] uint8."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate pixels as a player would for the stream's display matrix (PyAV: counter-clockwise)."""
    return np.ascontiguousarray(np.rot90(frame, k=(rotation // 90) % 4)) if rotation else frame


def decode_all(container, stream, errors: list | None = None) -> Iterator:
    """Decode every frame of a PyAV `stream`, surviving corrupt packets: `container.decode()` stops
    at the first bad packet, so packets are demuxed and each decoded in its own try/except. Each
    packet whose decode raised is appended to `errors` (its PTS), if given."""
    import av

    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError as err:
            log.debug("skipping undecodable packet at pts %s: %s", packet.pts, err)
            if errors is not None:
                errors.append(packet.pts)
