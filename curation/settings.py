"""Typed config of `spacetime curate` (configs/curate/*.yaml). Unknown keys are errors."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from captioner.config import CaptionConfig
from spacetime.config import ActorResources, S3Config, StrictModel, TaskResources


class RayConfig(StrictModel):
    affects_results: ClassVar[bool] = False  # where and how wide it runs, not what it makes
    address: str | None = None  # None: $RAY_ADDRESS, else a local embedded Ray
    num_cpus: int | None = None  # local Ray only; None: cores x cpus_per_core
    object_store_memory: int | None = 512 * 1024**2  # local Ray only (bytes)
    progress_bars: bool = False  # Ray's own bars; spacetime shows one bar per run
    # local Ray only: start Ray's dashboard on 127.0.0.1 (port 8265, or the next free one) and log its
    # URL; `spacetime curate --dashboard` sets it
    dashboard: bool = False
    # local Ray only, when num_cpus is None: Ray's CPU slots per core. Task stages take 1 slot each
    # and Ray Data reserves slots per operator so that every stage keeps streaming; with one slot per
    # core that held the source tasks to 1 of 2 cores while the extract stage's reserved slot idled
    # (65% CPU; 134 s on the benchmark set). Two per core: 97% CPU, 97 s, still streaming
    # (benchmarks/curation_vs_decode.py, curation_scale.py). Turning Ray Data's reservation off
    # instead fills the cores too, but the sources then only complete at the end: no streaming.
    # A cluster's nodes declare their own slots: start them with `ray start --num-cpus` = 2 x cores.
    cpus_per_core: float = Field(2.0, gt=0)


class SourcesConfig(StrictModel):
    extensions: list[str] = Field(default_factory=lambda: [
        ".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".ts", ".mpg", ".mpeg", ".flv", ".3gp",
        ".png", ".jpg", ".jpeg", ".webp"])  # images are 1-frame videos
    s3: S3Config = Field(default_factory=S3Config)


class ProbeConfig(StrictModel):
    max_pixels: int = 8192 * 8192  # a header claiming more is refused before any decode
    max_duration: float = 6 * 3600.0  # seconds
    vfr_packets: int = 240  # packets inspected for variable frame rate
    # A digest of the video stream's packets (codec, extradata, rotation, every payload): a remux of a
    # source (another container, other metadata, the same coded pictures) is a duplicate of it, found
    # at probe. One demux of the file (no decode); off: duplicates are byte-identical files only.
    stream_digest: bool = True
    resources: TaskResources = Field(default_factory=TaskResources)


class AnalyzeConfig(StrictModel):
    height: int = 144  # decode height of the analysis pass (width keeps the aspect, even)
    threads: int = 0  # decoder threads, 0 = FFmpeg auto
    # Skip the codec's in-loop deblocking in this pass: ~20% faster H.264 decode (measured 319 ->
    # 385 fps at 1080p). The pass works at low resolution, where the small drift this causes within
    # a GOP is below the coding noise; extraction always decodes normally. Turn off for tiny,
    # heavily compressed sources whose sampled frames are not downscaled.
    skip_loop_filter: bool = True
    # Shot boundaries: `content` / `adaptive` (scenedetect's hard cuts, plus the dissolve detector
    # below), `transnetv2` (the learned model, hard cuts and gradual transitions; ~37 predicted frames
    # per CPU-second at 48x27 in float32, about twice that in bfloat16: ~25x / 13x a small file's
    # decode) or `combined` (both, merged by `combine`; under `agree` the model runs only around the
    # classic transitions). The default is `content`: the same F1 as transnetv2 alone on our set, at
    # 1.5x decode; `combined` + `agree` is the best F1 (benchmarks/split_vs_pyscenedetect.py).
    detector: Literal["content", "adaptive", "transnetv2", "combined"] = "content"
    transnet_threshold: float = 0.5  # TransNetV2 single-frame probability of a transition
    transnet_device: str = "cpu"  # "cuda" with resources.num_gpus > 0 (a fraction is fine)
    # "bfloat16": TransNetV2 under autocast, ~2x faster on CPUs with AVX-512 BF16 or AMX (and on GPUs),
    # probabilities within ~2e-3 of float32: the same transitions on every file of
    # benchmarks/split_vs_pyscenedetect.py. "auto": bfloat16 where the device runs it natively.
    transnet_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # combined: `agree` keeps the transitions both found (measured best: F1 1.000 vs transnetv2 and
    # content 0.982, benchmarks/split_vs_pyscenedetect.py; each one's false cuts on exposure steps and
    # fast pans differ); `union` every transition either found; `learned_plus_dissolves`
    # TransNetV2's plus the classic dissolves/fades it missed (never recalls less than transnetv2)
    combine: Literal["agree", "union", "learned_plus_dissolves"] = "agree"
    combine_tolerance: int = 2  # frames: transitions this close are one
    # Corrections to every detector's transitions (curation.analyze.CleanTransitions): a hard cut
    # across which the picture returns within flash_frames (a flash) is dropped; transitions separated
    # only by dark frames (a fade through black) are merged.
    clean_transitions: bool = True
    flash_frames: int = Field(3, ge=0)  # 0: keep every flash cut
    flash_diff: float = 20.0  # mean abs luma (0-255) of 48x36 thumbnails: below = the picture came back
    fade_gap: int = Field(15, ge=0)  # most frames between a fade out and a fade in ...
    dark_luma: float = 24.0  # ... of which one at least is dark (mean luma 0-255 below this)
    content_threshold: float = 27.0  # scenedetect ContentDetector default
    adaptive_threshold: float = 3.0  # scenedetect AdaptiveDetector default
    min_scene_frames: int = 8  # scenedetect min_scene_len
    # Gradual transitions (dissolves/fades): windows whose frames are blends of the frames around
    # them (curation.analyze.DissolveDetector).
    dissolve: bool = True
    dissolve_high: float = 25.0  # mean abs luma difference (0-255) of the frames around the window
    dissolve_min_frames: int = 4
    dissolve_max_frames: int = 60
    dissolve_blend_error: float = 0.25  # residual of the blend fit / end-to-end difference
    sample_fps: float = 2.0  # frames kept per second for filters and captioning
    sample_height: int = 224  # their height (never upscaled; width keeps the aspect)
    max_sampled_per_clip: int = 16
    resources: TaskResources = Field(default_factory=TaskResources)


class SplitConfig(StrictModel):
    min_duration: float = 1.0  # seconds; shorter clips are rejected as too_short
    # seconds; longer shots are split into windows of at most this. 60 s: a minute-long shot stays one
    # clip (frame tiers reach 60 s at 24/30/60 fps); set it lower for short-clip datasets
    max_duration: float = 60.0
    trim_frames: int = 1  # frames dropped next to a transition on each side
    # ...except at a hard cut whose first frame is a source keyframe: the encoder's own scene-change
    # keyframe confirms the cut lies exactly there, and untrimmed clips can be copied, not re-encoded
    keyframe_cuts: bool = True
    resources: TaskResources = Field(default_factory=TaskResources)


class ExtractConfig(StrictModel):
    stream_copy: bool = True  # copy the span's packets where they decode to exactly its frames
    partial: bool = True  # H.264: re-encode only the frames before the span's first keyframe (and the
    # last few B-frames whose reference lies past its end), copy the rest; off: such spans are re-encoded whole
    # Opt-in, changes what a clip file holds: every clip that needs no crop or rotation is copied from
    # the keyframe at or before its span, never re-encoded; its record's skip_frames says how many
    # leading frames a reader drops (spacetime's loader does; stock readers see them: see README).
    copy_only: bool = False
    codec: str = "libx264"
    crf: int = 18
    preset: str = "veryfast"
    pix_fmt: str = "yuv420p"
    threads: int = 2  # fixed, so re-encodes are byte-identical across machines and runs
    resources: TaskResources = Field(default_factory=TaskResources)


class ProgressConfig(StrictModel):
    affects_results: ClassVar[bool] = False
    log_every_s: float = 30.0  # a progress line (sources, clips, video-hours per wall/core-hour) this often; 0: never


class WriterResources(StrictModel):
    """The processes that write units (curation.units.ShardWriter actors, started with the run). A unit
    goes to them in turn; each copies staged clips into tars (I/O), so by default it holds no core."""

    affects_results: ClassVar[bool] = False

    num_cpus: float = 0.0
    actors: int = Field(1, ge=1)  # more where one cannot keep up with the cluster's units
    calls_per_actor: int = Field(2, ge=1)  # units each actor writes at once (threads)


class WriteConfig(StrictModel):
    shard_size_mb: float = 256.0  # target tar size per shard (a unit's clips of one bucket may make fewer)
    # Sources per work unit: the sorted inputs are cut into units whose shards depend on their own
    # sources only and are written as soon as the unit (and every earlier one) completes. Smaller
    # units: earlier first shard, smaller tars; it changes the shard layout, so it is part of a run's identity.
    unit_sources: int = Field(16, ge=1)
    resources: WriterResources = Field(default_factory=WriterResources)


# ------------------------------------------------------------------------------------- filters
# Every filter scores EVERY candidate clip (kept or not: calibration needs all scores) from the
# frames the analysis pass kept; only a clip still a candidate can be rejected.
class BordersConfig(StrictModel):
    enabled: bool = True
    dark_luma: float = 24.0  # a bar row/column is darker than this (0-255) in every sampled frame
    max_std: float = 6.0  # ... and nearly uniform across the row/column
    min_bar_fraction: float = 0.02  # thinner bands are ignored (compression ringing at edges)
    min_area: float = 0.5  # reject a clip whose picture inside the bars is below this fraction
    resources: TaskResources = Field(default_factory=TaskResources)


class TextConfig(StrictModel):
    """Burned-in text (subtitles, logos) by PP-OCR detection on the sampled frames (curation.ocr):
    `text_area` is the fraction of the frame covered by text that persists across frames."""

    enabled: bool = True
    side: int = Field(640, ge=32, le=960)  # longest side detection runs at (frames are never upscaled)
    frames: int = Field(8, ge=1)  # sampled frames scored, evenly spaced (~0.03 s each at 224 px high)
    persist: float = Field(0.5, gt=0, le=1)  # fraction of the frames a text cell must be covered in
    grid: int = Field(16, ge=4)  # cells over the frame height
    min_box_frac: float = 0.0005  # boxes below this fraction of the frame are ignored
    max_area: float = 0.01  # reject above (clean real footage 0.000, logos >= 0.02, subtitles >= 0.03)
    band: float = Field(0.25, ge=0, le=0.5)  # text confined to this strip at the bottom or top ...
    crop_band: bool = True  # ... is cropped away at extraction (like letterbox bars), not rejected
    recognize: bool = True  # read the persistent text into the record's `ocr_text` (0.07-0.2 s a clip)
    rec_frames: int = Field(3, ge=0)  # frames whose text is read
    threads: int = Field(1, ge=1)  # onnxruntime intra-op threads
    resources: TaskResources = Field(default_factory=TaskResources)


class ExposureConfig(StrictModel):
    enabled: bool = True
    min_luma: float = 30.0  # mean luma (0-255): below = too dark
    max_luma: float = 225.0
    max_clipped: float = 0.5  # fraction of pixels <= 5 or >= 250
    resources: TaskResources = Field(default_factory=TaskResources)


class SharpnessConfig(StrictModel):
    enabled: bool = True
    height: int = 224  # frames are scaled to this height first, so the score is size-independent
    min_sharpness: float = 20.0  # median variance of the Laplacian (blurred test clip 8.5, sharp 279, motion-blurred real footage 29-55)
    resources: TaskResources = Field(default_factory=TaskResources)


class MotionConfig(StrictModel):
    enabled: bool = True
    width: int = 160  # optical flow (OpenCV DIS, ultrafast preset) on frames this wide
    min_motion: float = 0.003  # mean flow, frame widths per second: below = static (still 0.0001, talking head 0.007)
    max_shake: float = 0.6  # change of global motion between frame pairs, widths/s: above = shaky
    resources: TaskResources = Field(default_factory=TaskResources)


class AestheticConfig(StrictModel):
    enabled: bool = True
    model: str = "ViT-L-14"  # open_clip architecture (or tiny:clip.model_name)
    pretrained: str | None = "openai"  # open_clip tag, local path, or tiny:clip.pretrained
    config_dir: str | None = None  # extra open_clip model configs (tiny:clip.config_dir)
    # LAION "improved aesthetic predictor" head on L2-normalised CLIP ViT-L/14 embeddings
    head: str = "hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"
    frames: int = 4  # sampled frames scored per clip (evenly spaced)
    aggregate: Literal["min", "mean"] = "mean"
    min_score: float = 4.5  # ~1-10 scale
    device: str = "cpu"
    resources: ActorResources = Field(default_factory=lambda: ActorResources(batch_size=16))


class DedupConfig(StrictModel):
    """Near-duplicate clips (curation.dedup): a DCT fingerprint of each clip's sampled frames (after
    the borders/text crops); decided unit by unit by the dedup gate, before the expensive stages,
    against the clips of every earlier unit and dataset version (curation.duplicates.DedupGate).
    Within a unit, the best clip of a group by `keep` stays; a clip that matches an earlier unit's
    clip is the duplicate (published clips are never withdrawn). `keep: aesthetic` moves the gate
    after the aesthetic stage, which then scores the duplicates too."""

    enabled: bool = True
    max_distance: int = Field(10, ge=0, le=64)  # Hamming distance at which two frames match
    min_similarity: float = Field(0.5, gt=0, le=1)  # fraction of the shorter clip's frames with a match
    bands: int = Field(4, ge=1, le=64)  # LSH bands of the 64-bit frame codes (candidates share one)
    min_band_hits: int = Field(1, ge=1)  # band matches before a clip is verified; 2 above ~1e5 clips (~30x fewer checks, -2% recall)
    keep: str = "resolution"  # the clip kept in a group: `resolution` (w x h, then duration), `duration`, or a score name
    resources: TaskResources = Field(default_factory=TaskResources)


class AlignmentConfig(StrictModel):
    """Caption-video alignment (curation.filters.Alignment): the cosine similarity of the dense and the
    short caption to the clip's sampled frames, by the CLIP of `filters.aesthetic` (its model, weights
    and device), recorded as `scores.caption_alignment` and `scores.short_caption_alignment`. The frame
    embedding is the aesthetic stage's (no frame embedded twice). CLIP reads 77 tokens: a dense caption
    is judged on its opening. Runs only when captions are on."""

    enabled: bool = True
    min_score: float | None = Field(None, ge=-1.0, le=1.0)  # reject a caption whose dense similarity is below
    min_short_score: float | None = Field(None, ge=-1.0, le=1.0)  # the same for the short caption
    frames: int = Field(4, ge=1)  # sampled frames embedded per clip when the aesthetic stage is off
    resources: ActorResources = Field(default_factory=lambda: ActorResources(batch_size=16))


class FiltersConfig(StrictModel):
    borders: BordersConfig = Field(default_factory=BordersConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    exposure: ExposureConfig = Field(default_factory=ExposureConfig)
    sharpness: SharpnessConfig = Field(default_factory=SharpnessConfig)
    motion: MotionConfig = Field(default_factory=MotionConfig)
    aesthetic: AestheticConfig = Field(default_factory=AestheticConfig)
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig)  # of the captions, when captioned


class GroundingConfig(StrictModel):
    """Caption grounding (curation.grounding): each checkable caption field against what the filters
    measured. Speeds are the motion filter's (frame widths per second), luma the exposure filter's."""

    enabled: bool = True
    # per field: flag (kept, the check recorded), reject (a contradiction rejects the clip) or recaption
    # (asked once more with the measured facts; what the new caption still contradicts is flagged)
    policy: dict[Literal["camera_motion", "on_screen_text", "lighting", "shots"],
                 Literal["flag", "reject", "recaption"]] = Field(
        default_factory=lambda: {"camera_motion": "flag", "on_screen_text": "flag", "lighting": "flag", "shots": "flag"})
    still_speed: float = Field(0.015, ge=0.0)  # |global flow| below: the camera is still
    still_zoom: float = Field(0.01, ge=0.0)
    moving_speed: float = Field(0.05, gt=0.0)  # |global flow| from: the camera pans / tilts
    moving_zoom: float = Field(0.03, gt=0.0)
    min_text_area: float = Field(0.002, ge=0.0)  # persistent text area from which text is on screen
    dark_luma: float = Field(60.0, ge=0.0, le=255.0)  # mean luma below: a dark clip
    bright_luma: float = Field(110.0, ge=0.0, le=255.0)  # mean luma from: a bright clip

    @model_validator(mode="after")
    def _check(self) -> "GroundingConfig":
        if self.still_speed >= self.moving_speed or self.dark_luma >= self.bright_luma:
            raise ValueError("grounding: still_speed must be < moving_speed and dark_luma < bright_luma")
        return self


class CurateConfig(StrictModel):
    ray: RayConfig = Field(default_factory=RayConfig)
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    analyze: AnalyzeConfig = Field(default_factory=AnalyzeConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    caption: CaptionConfig | None = None  # None: no captioning stage (shards get empty .txt)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)  # of the captions, when captioned
    write: WriteConfig = Field(default_factory=WriteConfig)
    progress: ProgressConfig = Field(default_factory=ProgressConfig)
