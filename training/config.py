"""Typed config sections of the trainer (pydantic; unknown keys are errors, see spacetime.config).

`LoaderConfig` is the `loader:` section of a training config; `training.data` documents what each
field does to the batches.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spacetime.config import StrictModel
from spacetime.config import S3Config


class LoaderConfig(StrictModel):
    """The bucketed, resumable loader (training.data.loader.BucketLoader)."""

    # Curation output directories (what `spacetime curate --output` wrote): local paths or
    # s3://bucket/prefix. Each holds shards/index.parquet and the shards it lists.
    data: list[str] = Field(default_factory=list)
    s3: S3Config = Field(default_factory=S3Config)
    seed: int = Field(0, ge=0)

    # Batch size per bucket from a token budget: latent tokens PER RANK per step.
    token_budget: int = Field(16384, gt=0)
    max_batch_size: int | None = Field(None, gt=0)  # cap (e.g. image buckets on a small budget)
    vae_temporal: int = Field(4, gt=0)  # causal first frame: latent frames = 1 + (frames - 1) // 4
    vae_spatial: int = Field(8, gt=0)
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent patch of the DiT

    # Native resolution (NaViT's Patch n' Pack; training.data.packing): every clip at its own size,
    # packed into sequences of token_budget tokens per rank (first-fit-decreasing over `pack_window`
    # samples), instead of resized to its bucket's size and batched with its bucket. A sample keeps
    # its aspect ratio and size (rounded down to vae_spatial x patch), its frames are its frame tier
    # (at most max_frames) rounded down to the VAE's temporal grid; only a sample above
    # max_tokens_per_sample (default token_budget) is scaled down, never up. Bucket weights do not apply.
    packing: bool = False
    max_tokens_per_sample: int | None = Field(None, gt=0)
    max_frames: int | None = Field(None, gt=0)
    pack_window: int = Field(256, gt=0)  # samples the packer looks ahead over

    # Sampling, stated in tokens. A bucket's weight multiplies its natural token mass (its samples x
    # tokens per sample) in an epoch; keys are fnmatch patterns on bucket names, the LAST matching
    # one wins ({"*_1f": 0.5} halves the image tokens; {"*": 0, "16x9_*": 1} keeps 16x9 only).
    bucket_weights: dict[str, float] = Field(default_factory=dict)
    # If set, the share of an epoch's tokens that come from image buckets (frame tier 1); the
    # weighted video buckets keep their mass and image buckets are scaled to match.
    image_token_fraction: float | None = Field(None, ge=0.0, le=1.0)

    # Frames: the first (frame tier) frames at the clip's fps; with target_fps, every
    # round(fps / target_fps)-th frame (never a stride that runs past the clip's end).
    target_fps: float | None = Field(None, gt=0.0)
    interpolation: Literal["area", "bilinear", "bicubic", "lanczos"] = "area"
    decode_threads: int = Field(1, ge=0)  # FFmpeg threads per decode; 0 = auto. Workers parallelise.
    # Of batch["video"] (values in [-1, 1]). "uint8" hands over the raw 0..255 pixels instead (4x less
    # memory and copying; the trainer then does video.to(device).float() / 127.5 - 1 on the device).
    dtype: Literal["float32", "bfloat16", "float16", "uint8"] = "float32"

    # Captions: the dense caption (<key>.txt) unless, deterministically per (seed, epoch, clip id),
    # the short caption (record["caption"]["short"], when present) or the empty caption (CFG).
    short_caption_prob: float = Field(0.0, ge=0.0, le=1.0)
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)

    # torch DataLoader
    num_workers: int = Field(4, ge=0)
    prefetch_factor: int = Field(2, gt=0)
    pin_memory: bool = True  # applied only where an accelerator is present
    multiprocessing_context: Literal["fork", "spawn", "forkserver"] | None = None

    max_substitutes: int = Field(8, ge=0)  # other samples tried when a whole per-rank batch is corrupt
    log_every: int = Field(100, ge=0)  # steps between INFO lines (0: never)

    @model_validator(mode="after")
    def _check(self) -> "LoaderConfig":
        if self.short_caption_prob + self.caption_dropout > 1.0:
            raise ValueError("short_caption_prob + caption_dropout must be <= 1")
        if any(p <= 0 for p in self.patch):
            raise ValueError(f"patch {self.patch}: every size must be > 0")
        if any(w < 0 for w in self.bucket_weights.values()):
            raise ValueError("bucket_weights must be >= 0")
        if self.max_tokens_per_sample and self.max_tokens_per_sample > self.token_budget:
            raise ValueError(f"max_tokens_per_sample {self.max_tokens_per_sample} > token_budget {self.token_budget}: "
                             "a sample must fit one packed sequence")
        return self
