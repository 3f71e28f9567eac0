"""Typed config of `spacetime train dit|vae` (YAML -> pydantic; unknown keys are errors).

One file describes a run; `configs/train/tiny.yaml` (DiT, CPU, seconds), `vae_tiny.yaml` (VAE) and
`dit_xl.yaml` (a GPU-cluster example) are examples. Sections:

    seed, steps          run seed; total optimizer steps (--max-steps overrides)
    loader               training.config.LoaderConfig (data, token budget, caption dropout, workers);
                         its vae_temporal / vae_spatial / patch follow the models unless set
    text_encoder         path (HF id, local folder, or tiny:text_encoder.path), max_length, dtype
    vae                  the VAE: weights from `path`, or `untrained: true` for an UNTRAINED random
                         one (smoke runs, tests); `arch` for new VAEs; `source: diffusers` for HF ids
    dit                  training.dit.DiTConfig (sizes, patch, rotary, QK-norm)
    flow                 training.flow.FlowConfig (logit-normal timesteps, shift by token count)
    vae_loss             `spacetime train vae`: reconstruction, KL and (optional) perceptual weights
    optim                AdamW, warm-up, schedule, gradient clipping
    ema                  decay of the parameter EMA (saved in checkpoints, used by the sampler)
    parallel             none | ddp | fsdp (FSDP2), activation checkpointing, compile, precision
    checkpoint           every N steps, how many to keep
    cache                `spacetime train cache`: entries per shard, text-encoder batch
    log                  every N steps, progress bar, TensorBoard, peak FLOP/s for MFU
    eval                 held-out validation (training.validate): the sources held out, how often,
                         which timesteps, how many tokens
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from spacetime.config import StrictModel
from training.config import LoaderConfig
from training.dit import DiTConfig
from training.flow import FlowConfig
from training.vae import VAEArch


class TextEncoderConfig(StrictModel):
    # Hugging Face id (e.g. google/t5-v1_1-xxl), local folder, or tiny:text_encoder.path (a tiny
    # RANDOM T5 for tests, see spacetime.models.resolve)
    path: str = "google/t5-v1_1-xxl"
    max_length: int = Field(120, gt=0)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU


class VAEConfig(StrictModel):
    source: Literal["spacetime", "diffusers"] = "spacetime"
    # spacetime: a folder written by `spacetime train vae` (RUN/vae) or a weights file (+ arch);
    # diffusers: a Hugging Face id or diffusers folder (needs the diffusers package)
    path: str | None = None
    # no weights: an UNTRAINED random VAE (seeded by init_seed). Its latents are meaningless; for
    # smoke runs and tests only. DiT runs save it to RUN/vae so their samples decode the same.
    untrained: bool = False
    init_seed: int = 0
    arch: VAEArch = Field(default_factory=VAEArch)  # for new VAEs; a saved VAE brings its own
    sample_posterior: bool = False  # DiT training: z ~ q(z | video) instead of its mean
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # the frozen VAE in DiT runs

    @model_validator(mode="after")
    def _check(self) -> "VAEConfig":
        if self.source == "diffusers" and not self.path:
            raise ValueError("vae.source diffusers needs vae.path (a Hugging Face id or diffusers folder)")
        if self.untrained and self.path:
            raise ValueError("vae.untrained and vae.path exclude each other")
        return self


class VAELossConfig(StrictModel):
    recon: Literal["l1", "mse"] = "l1"
    kl_weight: float = Field(1e-4, ge=0)  # times the KL averaged over latent elements
    # Perceptual term: only with local VGG16 weights (`perceptual_weights`: a state dict of
    # torchvision's vgg16 or vgg16().features); nothing is downloaded. 0 / None: off.
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual_weights: str | None = None
    # scaling_factor / shift_factor of the exported VAE: 1 / std and mean of the posterior means
    # over the last `stats_steps` steps, over all channels ("global") or per latent channel ("channel", as
    # Wan's latents_mean / latents_std). Per channel, every channel gets the same signal-to-noise ratio
    # at each flow timestep; globally, low-power channels (a DCT shortcut's high frequencies) are
    # drowned first and resolved last, as high frequencies are in pixel space. benchmarks/learns.py: the
    # DiT's held-out loss fell 73% (global) and 28% (channel) on the same VAE; the losses are in different
    # units, and which samples better is not measured here.
    stats_steps: int = Field(50, gt=0)
    latent_norm: Literal["channel", "global"] = "global"
    # Train on random windows of each clip instead of the whole clip: `crop_frames` frames (1 + k x
    # the temporal compression: the first latent frame alone plus k groups) and `crop_size` [height,
    # width] pixels, drawn from the step's generator (so a resumed run draws the same). The VAE is
    # fully convolutional, so what it learns from windows holds for whole clips, and a window costs a
    # fraction of a clip: more, and more varied, samples per second (benchmarks/learns.py). A clip
    # smaller than the window is used whole in that dimension. null: whole clips.
    crop_frames: int | None = Field(None, gt=0)
    crop_size: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _check(self) -> "VAELossConfig":
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError("vae_loss.perceptual_weight > 0 needs vae_loss.perceptual_weights (a local "
                             "VGG16 state dict); set the weight to 0 to train without the perceptual term")
        if self.crop_size is not None and min(self.crop_size) <= 0:
            raise ValueError(f"vae_loss.crop_size {list(self.crop_size)}: give [height, width] in pixels, both > 0")
        return self


class OptimConfig(StrictModel):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)  # on matrices only (not biases, norms)
    warmup_steps: int = Field(1000, ge=0)  # linear from 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine: final lr / lr
    decay_steps: int | None = Field(None, gt=0)  # cosine: steps after warm-up to decay over (None: steps)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; None: no clipping
    # loader batches per optimizer step: their gradients are averaged (gradient sync on the last
    # only), so the effective batch is grad_accum x the bucket's batch x data-parallel ranks
    grad_accum: int = Field(1, ge=1)
    fused: bool | None = None  # AdamW fused kernels (None: on GPU)


class EMAConfig(StrictModel):
    decay: float = Field(0.9999, ge=0, lt=1)


class ParallelConfig(StrictModel):
    mode: Literal["none", "ddp", "fsdp"] = "ddp"  # none: one process only
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU
    # recompute blocks in backward: false | true (every block) | auto (on a GPU, the fewest blocks
    # the largest bucket needs to fit its memory, by training.memory's model; CPU: none)
    activation_checkpointing: bool | Literal["auto"] = False
    compile: bool = False  # torch.compile each block
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    reshard_after_forward: bool = True  # FSDP2: free gathered params after forward (ZeRO-3)
    # context (sequence) parallelism: ranks per group sharing one sample's tokens (Ulysses
    # all-to-all; must divide the world size and the DiT's heads); composes with ddp and fsdp
    context: int = Field(1, ge=1)


class CheckpointConfig(StrictModel):
    every: int = Field(1000, gt=0)  # steps between checkpoints (and one at the last step)
    keep: int = Field(3, ge=0)  # newest checkpoints kept (0: all)
    # full: rank 0 gathers and writes whole tensors (safetensors); sharded: torch.distributed.checkpoint,
    # every rank writes its shards, resumable onto another world size; auto: sharded under FSDP2
    # with several processes
    format: Literal["auto", "full", "sharded"] = "auto"


class CacheConfig(StrictModel):
    """`spacetime train cache` (training.cache). Part of the cache's identity: a cache is resumed
    only with the same entries_per_shard."""

    entries_per_shard: int = Field(64, gt=0)  # clips per shard (and per work unit)
    text_batch: int = Field(16, gt=0)  # captions per text-encoder call


class LogConfig(StrictModel):
    every: int = Field(10, gt=0)  # steps between metric records
    progress: bool = True  # tqdm bar on rank 0 (off when stderr is not a terminal)
    tensorboard: bool = True  # RUN/tensorboard if the tensorboard package is installed
    # dense bf16 peak of ONE device in TFLOP/s for MFU; None: looked up from the GPU's name
    # (training.metrics.PEAK_TFLOPS), no MFU on CPU
    peak_tflops: float | None = Field(None, gt=0)


class EvalConfig(StrictModel):
    """Validation on held-out data (training.validate), during `spacetime train` and by `spacetime eval`."""

    # the share of loader.data's SOURCES held out: never trained on (training.data.index.held_out)
    fraction: float = Field(0.0, ge=0, lt=1)
    data: list[str] = Field(default_factory=list)  # more outputs (or caches) used only for validation
    every: int = Field(0, ge=0)  # steps between evaluations, plus step 0 and the last step (0: never)
    # DiT: the flow loss at this many fixed timesteps, the evenly spaced quantiles of the training
    # timestep distribution (logit-normal, shifted for each clip's token count)
    timesteps: int = Field(8, gt=0)
    tokens: int = Field(4096, gt=0)  # latent tokens of held-out clips evaluated (at least one clip)
    seed: int = Field(0, ge=0)  # the fixed noise (and posterior draws) of every held-out clip
    raw: bool = False  # also evaluate the raw weights (the EMA's always are)
    # DiT samples (training.eval_samples) every N steps, a multiple of checkpoint.every (0: none):
    # `prompts` at `sample_size` ([width, height, frames]; default the first evaluated held-out clip's
    # bucket), or else the captions of the first `sample_count` evaluated held-out clips at their size.
    # A VAE run writes its first `sample_count` evaluated held-out clips beside their reconstructions.
    sample_every: int = Field(0, ge=0)
    prompts: list[str] = Field(default_factory=list)
    sample_size: tuple[int, int, int] | None = None
    sample_count: int = Field(2, gt=0)
    sample_steps: int = Field(20, gt=0)  # Euler steps
    sample_cfg: float = Field(5.0, ge=1.0)  # classifier-free guidance scale
    sample_fps: float = Field(8.0, gt=0)  # of the MP4s of `prompts` (a held-out clip's own otherwise)

    @model_validator(mode="after")
    def _check(self) -> "EvalConfig":
        if (self.every or self.sample_every) and not (self.fraction or self.data):
            raise ValueError("eval.every and eval.sample_every need held-out data: set eval.fraction (a share of "
                             "loader.data's sources) or eval.data (outputs used only for validation)")
        return self


class TrainConfig(StrictModel):
    seed: int = 0
    steps: int = Field(100_000, gt=0)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    dit: DiTConfig = Field(default_factory=DiTConfig)
    flow: FlowConfig = Field(default_factory=FlowConfig)
    vae_loss: VAELossConfig = Field(default_factory=VAELossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.eval.sample_every % self.checkpoint.every:
            raise ValueError(f"eval.sample_every {self.eval.sample_every} is not a multiple of checkpoint.every "
                             f"{self.checkpoint.every}: samples are drawn from the checkpoints")
        return self
