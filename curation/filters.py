"""Quality filters: borders, text, exposure, sharpness, motion, aesthetic, and the caption-video
alignment of captioned clips. Each is a pipeline stage.

Every filter works on the frames the analysis pass sampled (upright RGB, `analyze.sample_height`
high, `analyze.sample_fps`): no filter decodes the source again. Each records its scores for EVERY
clip that has frames, kept or not, so thresholds can be calibrated from the manifest
(`spacetime calibrate`); only a clip that is still a candidate is rejected, with the filter's name,
score and threshold as the reason. Borders runs first and crops the frames the later filters see;
text (burned-in subtitles and logos) runs next and crops a subtitle band the same way.
"""

from __future__ import annotations

import numpy as np

from spacetime.frames import decode_frames, encode_frames
from curation.stage import DEFERRED, RETAINED, BatchStage, Stage, fail, pack, unpack
from spacetime.faults import is_infrastructure
from curation.settings import (AestheticConfig, AlignmentConfig, BordersConfig, DedupConfig, ExposureConfig, MotionConfig,
                               SharpnessConfig, TextConfig)


def luma(frames: np.ndarray) -> np.ndarray:
    """[N,H,W,3] uint8 RGB -> [N,H,W] float32 BT.601 luma."""
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def reject(clip: dict, name: str, detail: str) -> None:
    if clip["status"] == "candidate":
        clip["status"], clip["reason"] = "rejected", f"{name}: {detail}"


# ----------------------------------------------------------------------------------- scoring
def border_box(frames: np.ndarray, cfg: BordersConfig) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the picture inside letterbox/pillarbox bars, in frame pixels: rows/columns
    from each edge that are dark and uniform in EVERY frame (stable bands, not a dark scene)."""
    y = luma(frames)
    n, h, w = y.shape

    def bands(axis_mean, axis_std, length):
        bar = (axis_mean.max(axis=0) < cfg.dark_luma) & (axis_std.max(axis=0) < cfg.max_std)
        lead = int(np.argmin(bar)) if not bar.all() else length
        trail = int(np.argmin(bar[::-1])) if not bar.all() else length
        minimum = int(np.ceil(cfg.min_bar_fraction * length))
        return (lead if lead >= minimum else 0), (trail if trail >= minimum else 0)

    top, bottom = bands(y.mean(axis=2), y.std(axis=2), h)
    left, right = bands(y.mean(axis=1), y.std(axis=1), w)
    if top + bottom >= h or left + right >= w:
        return 0, 0, 0, 0
    return left, top, w - left - right, h - top - bottom


def native_crop(box, frame_size, clip_size) -> list[int]:
    """A box in sampled-frame pixels -> the same box at the clip's native size, shrunk to even
    coordinates (yuv420p) so no bar pixel survives rounding."""
    (x, y, w, h), (fw, fh), (cw, ch) = box, frame_size, clip_size
    sx, sy = cw / fw, ch / fh
    x0, y0 = int(np.ceil(x * sx / 2) * 2), int(np.ceil(y * sy / 2) * 2)
    x1, y1 = int((x + w) * sx // 2 * 2), int((y + h) * sy // 2 * 2)
    return [x0, y0, max(0, x1 - x0), max(0, y1 - y0)]


def crop_within(clip: dict, box, frame_size) -> None:
    """Narrow the clip's native crop to `box` (x, y, w, h) of the frames the filters see now, which
    show the clip's current crop (or the whole upright frame)."""
    x0, y0, cw, ch = clip.get("crop") or [0, 0, clip["width"], clip["height"]]
    x, y, w, h = native_crop(box, frame_size, (cw, ch))
    clip["crop"] = [x0 + x, y0 + y, w, h]


def exposure(frames: np.ndarray) -> tuple[float, float]:
    """(mean luma 0-255, fraction of clipped pixels <= 5 or >= 250)."""
    y = luma(frames)
    return float(y.mean()), float(((y <= 5) | (y >= 250)).mean())


def sharpness(frames: np.ndarray, height: int) -> float:
    """Median over frames of the variance of the Laplacian, at a fixed height."""
    import cv2

    values = []
    for gray in luma(frames):
        if gray.shape[0] != height:
            gray = cv2.resize(gray, (max(1, round(gray.shape[1] * height / gray.shape[0])), height),
                              interpolation=cv2.INTER_AREA)
        values.append(cv2.Laplacian(gray, cv2.CV_32F).var())
    return float(np.median(values))


def motion(frames: np.ndarray, seconds: list[float], cfg: MotionConfig) -> dict[str, float]:
    """Dense optical flow (OpenCV DIS) between consecutive sampled frames, in frame widths per
    second: `motion` (mean magnitude, median over pairs), `shake` (mean change of the global
    motion between pairs) and camera statistics: pan (global x/y) and zoom (radial component)."""
    import cv2

    scale = cfg.width / frames.shape[2]
    size = (cfg.width, max(8, round(frames.shape[1] * scale)))
    grays = [cv2.resize(g, size, interpolation=cv2.INTER_AREA).astype(np.uint8) for g in luma(frames)]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rx, ry = xx - w / 2, yy - h / 2
    norm = np.maximum(np.hypot(rx, ry), 1.0)
    mags, globals_, zooms = [], [], []
    for a, b, dt in zip(grays, grays[1:], np.diff(seconds)):
        flow = dis.calc(a, b, None) / w / max(dt, 1e-3)  # widths per second
        mags.append(float(np.hypot(flow[..., 0], flow[..., 1]).mean()))
        globals_.append(np.median(flow.reshape(-1, 2), axis=0))
        zooms.append(float(((flow[..., 0] * rx + flow[..., 1] * ry) / norm).mean()))
    g = np.array(globals_)
    shake = float(np.abs(np.diff(g, axis=0)).sum(axis=1).mean()) if len(g) > 1 else 0.0
    return {"motion": float(np.median(mags)), "shake": shake, "camera_pan_x": float(g[:, 0].mean()),
            "camera_pan_y": float(g[:, 1].mean()), "camera_zoom": float(np.mean(zooms))}


# ------------------------------------------------------------------------------------ stages
class FilterStage(Stage):
    """Per-row filter built from its `filters.<name>` section: `score(clip, frames, cfg)` records
    scores, may reject, and returns new frames for the next stages (or None to keep them). A score
    that raises fails that clip, with the error as its reason; the run goes on."""

    def __call__(self, row: dict) -> dict:
        import time

        t0 = time.perf_counter()
        meta, sampled = unpack(row)
        clip = meta.get("clip")
        if clip and sampled and self.cfg.enabled and clip["status"] not in ("failed", DEFERRED, RETAINED):
            try:
                frames = decode_frames(sampled)
                new = self.score(clip, frames, self.cfg) if len(frames) else None
                if new is not None:
                    sampled = encode_frames(list(new))
            except Exception as err:
                fail(clip, self.name, err)
        return pack(self.timed(meta, t0), sampled)

    def score(self, clip: dict, frames: np.ndarray, cfg):
        raise NotImplementedError


class Borders(FilterStage):
    name = "borders"

    def score(self, clip, frames, cfg: BordersConfig):
        fh, fw = frames.shape[1:3]
        box = border_box(frames, cfg)
        area = box[2] * box[3] / (fw * fh)
        clip["scores"]["picture_area"] = round(area, 4)  # the share kept inside the bars
        if area < cfg.min_area:
            reject(clip, "borders", f"picture area {area:.2f} < filters.borders.min_area={cfg.min_area}")
            return None
        if box != (0, 0, fw, fh):
            crop_within(clip, box, (fw, fh))
            x, y, w, h = box
            return frames[:, y:y + h, x:x + w]
        return None


class Text(FilterStage):
    """Burned-in text by real PP-OCR detection (curation.ocr). Text confined to a bottom or top band
    (subtitles) is cropped away like letterbox bars where `crop_band`; other persistent text above
    `max_area` rejects the clip. The text read goes into the record (`ocr_text`): a captioner can use it."""

    name = "text"

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        if cfg.enabled:
            from curation.ocr import load_ocr

            self.engine = load_ocr(cfg.side, cfg.threads)

    def score(self, clip, frames, cfg: TextConfig):
        from curation.ocr import score_text

        found = score_text(self.engine, frames, persist=cfg.persist, grid=cfg.grid, min_box_frac=cfg.min_box_frac,
                           band=cfg.band, recognize=cfg.recognize, rec_frames=cfg.rec_frames, max_frames=cfg.frames)
        area, band = found["text_area"], found["band"]
        clip["scores"]["text_area"] = round(area, 4)
        if found["text"]:
            clip["ocr_text"] = found["text"]
        if area <= cfg.max_area:
            return None
        if band and cfg.crop_band and clip["status"] == "candidate":
            fh, fw = frames.shape[1:3]
            rows = int(np.ceil(band["rows"] * fh))
            clip["scores"]["text_band"] = band["rows"] if band["side"] == "bottom" else -band["rows"]
            box = (0, 0, fw, fh - rows) if band["side"] == "bottom" else (0, rows, fw, fh - rows)
            crop_within(clip, box, (fw, fh))
            return frames[:, box[1]:box[1] + box[3]]
        reject(clip, "text", f"burned-in text covers {area:.3f} > filters.text.max_area={cfg.max_area}")
        return None


class Exposure(FilterStage):
    name = "exposure"

    def score(self, clip, frames, cfg: ExposureConfig):
        mean, clipped = exposure(frames)
        clip["scores"].update(luma_mean=round(mean, 2), luma_clipped=round(clipped, 4))
        if mean < cfg.min_luma:
            reject(clip, "exposure", f"too dark: mean luma {mean:.1f} < filters.exposure.min_luma={cfg.min_luma}")
        elif mean > cfg.max_luma:
            reject(clip, "exposure", f"too bright: mean luma {mean:.1f} > filters.exposure.max_luma={cfg.max_luma}")
        elif clipped > cfg.max_clipped:
            reject(clip, "exposure", f"clipped fraction {clipped:.2f} > filters.exposure.max_clipped={cfg.max_clipped}")


class Sharpness(FilterStage):
    name = "sharpness"

    def score(self, clip, frames, cfg: SharpnessConfig):
        value = sharpness(frames, cfg.height)
        clip["scores"]["sharpness"] = round(value, 2)
        if value < cfg.min_sharpness:
            reject(clip, "sharpness", f"blurry: {value:.1f} < filters.sharpness.min_sharpness={cfg.min_sharpness}")


class Motion(FilterStage):
    name = "motion"

    def score(self, clip, frames, cfg: MotionConfig):
        if len(frames) < 2:  # images and very short clips: no motion to measure
            return
        fps = clip["fps"]
        seconds = [i / fps for i in clip["sampled_idx"]]
        stats = motion(frames, seconds, cfg)
        clip["scores"].update({k: round(v, 5) for k, v in stats.items()})
        if stats["motion"] < cfg.min_motion:
            reject(clip, "motion", f"static: {stats['motion']:.4f} < filters.motion.min_motion={cfg.min_motion}")
        elif stats["shake"] > cfg.max_shake:
            reject(clip, "motion", f"shaky: {stats['shake']:.3f} > filters.motion.max_shake={cfg.max_shake}")


class Fingerprint(FilterStage):
    """A perceptual fingerprint of the clip for near-duplicate removal (curation.dedup): one 64-bit
    DCT code per sampled frame, as the filters see them (bars and subtitle bands cropped). The
    decision is the dedup gate's, unit by unit (curation.duplicates.DedupGate)."""

    name = "fingerprint"

    def score(self, clip, frames, cfg: DedupConfig):
        from curation.dedup import frame_hashes

        clip["fingerprint"] = [int(h) for h in frame_hashes(frames)]


class Aesthetic(BatchStage):
    """open_clip embeddings of sampled frames + the aesthetic MLP head; frames are batched across
    the clips of a Ray batch. The model is loaded once per actor."""

    name = "aesthetic"
    only_candidates = False

    def __init__(self, cfg: AestheticConfig, keep_embedding: bool = False):
        """Only built when `cfg.enabled` (curation.pipeline.stages leaves the stage out otherwise).
        `keep_embedding`: leave each candidate's mean frame embedding in the clip (`frame_embedding`)
        for the alignment stage, which removes it."""
        super().__init__(cfg)
        from curation.clip_models import load_aesthetic_head

        self.keep_embedding = keep_embedding
        self.model, self.preprocess = _load_clip(cfg)
        self.head = load_aesthetic_head(resolve_model(self.cfg.head))

    def process(self, items):
        from curation.clip_models import embed_frames

        picked, owners = [], []
        for k, (meta, sampled) in enumerate(items):
            try:
                frames = decode_frames(sampled) if sampled else []
            except Exception as err:  # that clip fails; the batch goes on
                fail(meta["clip"], self.name, err)
                continue
            if len(frames):
                for j in np.unique(np.linspace(0, len(frames) - 1, self.cfg.frames).round().astype(int)):
                    picked.append(frames[j])
                    owners.append(k)
        if not picked:
            return
        try:
            embeddings = embed_frames(self.model, self.preprocess, picked)
            scores = self.head.score(embeddings)
        except Exception as err:
            mine = sorted(set(owners))
            if len(mine) > 1 and not is_infrastructure(err):  # find the clip at fault: each one alone
                for k in mine:
                    self.process([items[k]])
                return
            for k in mine:  # that clip fails; or, out of memory / a dead device, the batch waits for the rerun
                fail(items[k][0]["clip"], self.name, err)
            return
        owners = np.array(owners)
        for k, (meta, _) in enumerate(items):
            mine = scores[owners == k]
            if not len(mine):
                continue
            value = float(mine.min() if self.cfg.aggregate == "min" else mine.mean())
            clip = meta["clip"]
            clip["scores"]["aesthetic"] = round(value, 4)
            if value < self.cfg.min_score:
                reject(clip, "aesthetic", f"{value:.2f} < filters.aesthetic.min_score={self.cfg.min_score}")
            if self.keep_embedding and clip["status"] == "candidate":
                clip["frame_embedding"] = mean_embedding(embeddings[owners == k])


def resolve_model(ref):
    from spacetime.models import resolve

    return resolve(ref)


def _load_clip(cfg: AestheticConfig):
    from curation.clip_models import load_clip

    return load_clip(resolve_model(cfg.model), resolve_model(cfg.pretrained), resolve_model(cfg.config_dir),
                     device=cfg.device)


def mean_embedding(rows: np.ndarray) -> list[float]:
    """The unit-norm mean of L2-normalised frame embeddings [N, D], as a JSON-able list."""
    mean = np.asarray(rows, np.float64).mean(axis=0)
    return [round(float(v), 6) for v in mean / max(np.linalg.norm(mean), 1e-12)]


class Alignment(BatchStage):
    """Caption-video alignment (filters.alignment): the cosine similarity of the CLIP text embeddings
    of the dense and the short caption to the clip's mean frame embedding, by the CLIP configured in
    filters.aesthetic. The frame embedding is the aesthetic stage's when it ran (`frame_embedding`,
    removed here from every row); else `cfg.frames` sampled frames are embedded here. Runs after the
    caption stage, on captioned candidates; an optional threshold per caption rejects the clip."""

    name = "alignment"

    def __init__(self, cfg: AlignmentConfig, clip: AestheticConfig, embedded: bool = False):
        """`embedded`: the aesthetic stage leaves every candidate's frame embedding, so only the text
        tower is kept (the vision tower of ViT-L/14 is ~300M parameters)."""
        super().__init__(cfg)
        import open_clip

        self.model, self.preprocess = _load_clip(clip)
        self.tokenizer = open_clip.get_tokenizer(resolve_model(clip.model))
        if embedded:
            self.model.visual = None

    def tidy(self, meta: dict) -> None:
        """A clip rejected or failed after the aesthetic stage still carries its frame embedding."""
        (meta.get("clip") or {}).pop("frame_embedding", None)

    def process(self, items):
        import torch
        from curation.clip_models import embed_frames

        for meta, sampled in items:
            clip = meta["clip"]
            fields = clip.get("caption_fields") or {}
            if not clip.get("caption"):
                continue
            try:
                image = clip.pop("frame_embedding", None)
                if image is None and self.model.visual is None:
                    raise ValueError("no frame embedding from the aesthetic stage (filters.aesthetic)")
                if image is None:
                    frames = decode_frames(sampled) if sampled else []
                    if not len(frames):
                        continue
                    picks = np.unique(np.linspace(0, len(frames) - 1, self.cfg.frames).round().astype(int))
                    image = mean_embedding(embed_frames(self.model, self.preprocess, [frames[j] for j in picks]))
                texts = [clip["caption"]] + ([fields["short"]] if fields.get("short") else [])
                with torch.inference_mode():
                    tokens = self.tokenizer(texts).to(next(self.model.parameters()).device)
                    text = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()
                sims = text @ np.asarray(image, np.float32)
            except Exception as err:
                fail(clip, self.name, err)
                continue
            clip["scores"]["caption_alignment"] = round(float(sims[0]), 4)
            if len(sims) > 1:
                clip["scores"]["short_caption_alignment"] = round(float(sims[1]), 4)
            for key, i in (("min_score", 0), ("min_short_score", 1)):
                floor = getattr(self.cfg, key)
                if floor is not None and i < len(sims) and sims[i] < floor:
                    reject(clip, "alignment", f"caption-video similarity {sims[i]:.3f} < filters.alignment.{key}={floor}")
                    break
