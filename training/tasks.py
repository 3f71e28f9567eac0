"""What a run trains: the models of each kind and the loss of one batch, behind one interface (Task).

    task = build_task("dit" | "vae", cfg, run_dir, d)
    cfg = sync_loader(cfg, *task.compression, task.patch)      # the loader's token math follows the models
    loss, parts, tokens = task.loss(forward_model, batch, generator, amp)   # every step
    extra = task.state(); ...; task.on_checkpoint(run_dir)      # every checkpoint
    task.load_state(trainer["extra"])                           # on resume

Kind dit: a bucket-homogeneous batch -> latents from the frozen VAE (computed on the fly) and text
embeddings from the frozen text encoder -> rectified-flow loss of the DiT (training.flow). The VAE
is the one vae.path names, or for vae.untrained an UNTRAINED random one, written to RUN/vae so that
samples decode with the same weights. When loader.data names latent caches (training.cache), the
batch brings the VAE posterior and the text embeddings: no text encoder is loaded and the VAE only
normalises (and draws from the posterior, with the same generator calls as encoding would); a cache
built with another VAE, text encoder or frame sampling than the config's is refused.

Kind vae: the VideoVAE itself learns reconstruction + KL (+ perceptual when its weights are
configured) and is exported to RUN/vae (config.json + model.safetensors, with the latent
normalisation measured over the last vae_loss.stats_steps steps) at every checkpoint, ready for
`vae.path`. The latent statistics are checkpointed as the task's extra state, so a resumed run
exports the same normalisation.

The training loop (training.train) knows only Task; the optimiser, EMA, checkpoints and metrics are
the same for every kind.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path

import torch
import torch.distributed as dist

from spacetime.config import ConfigError
from training.dit import DiT, flops_per_token
from training.flow import flow_loss
from training.parallel import Dist
from training.train_config import TrainConfig
from training.vae import PerceptualLoss, VideoVAE, kl_loss, load_diffusers_vae, load_vae, random_window, save_vae

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VAE_DIR = "vae"
UNTRAINED_NOTE = "UNTRAINED random VAE (vae.untrained: true): its latents are meaningless; smoke runs and tests only"


# -------------------------------------------------------------------------------------- interface
class Task(ABC):
    """One kind of training run, as the loop sees it.

    `model` is the module trained (the loop moves it to the device and parallelises it in place,
    so it stays this object); `compression` (temporal, spatial) and `patch` fix the loader's token
    math. Besides `meta` and `loss`, the hooks default to "nothing to do".
    """

    kind: str
    model: torch.nn.Module
    compression: tuple[int, int]
    patch: tuple[int, int, int]

    @abstractmethod
    def meta(self) -> dict:
        """What a checkpoint's meta.json holds about the models besides the config (the sampler's input)."""

    @abstractmethod
    def loss(self, forward_model, batch: dict, generator: torch.Generator, amp) -> tuple[torch.Tensor, dict, int]:
        """(loss to backpropagate, detached scalar parts to log, latent tokens of this rank's batch)."""

    def flops(self, tokens: int) -> float | None:
        """Training FLOPs per token of a sample of `tokens` tokens; None: no counter, no MFU."""
        return None

    def state(self) -> dict:
        """Extra state a checkpoint keeps for this task (trainer.pt "extra")."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore `state()` from a checkpoint."""

    def on_checkpoint(self, run_dir: Path) -> None:
        """Called on every rank after each checkpoint is written (may be a collective)."""


def _patch_tokens(latent_shape, patch) -> int:
    """Patches of one sample of a [B, C, T, H, W] latent (each side rounded up)."""
    return math.prod(math.ceil(n / p) for n, p in zip(latent_shape[2:], patch))


# -------------------------------------------------------------------------------------- models
def load_text_encoder_from(cfg: TrainConfig, device: torch.device):
    """(tokenizer, frozen encoder, embedding dim) from text_encoder.path (tiny: references resolved)."""
    from spacetime.models import resolve
    from training.text_encoder import load_text_encoder

    dtype = cfg.text_encoder.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    tokenizer, model = load_text_encoder(resolve(cfg.text_encoder.path), dtype=dtype, device=str(device))
    dim = getattr(model.config, "d_model", None) or model.config.hidden_size
    return tokenizer, model, int(dim)


def build_vae(cfg: TrainConfig, run_dir: Path, d: Dist, trainable: bool,
              save_untrained: bool = True) -> tuple[torch.nn.Module, dict]:
    """The VAE of a run and its reference for meta.json. Frozen (DiT runs) or trainable (VAE runs:
    vae.path, if given, holds the initial weights). An untrained frozen VAE is saved to RUN/vae
    (`save_untrained`) so that samples decode with it."""
    v = cfg.vae
    if v.source == "diffusers":
        if trainable:
            raise ConfigError("vae.source diffusers: training a diffusers VAE is not supported")
        return load_diffusers_vae(v.path), {"source": "diffusers", "path": v.path}
    if v.path:
        from spacetime.models import resolve

        path = str(Path(resolve(v.path)).expanduser().resolve())
        vae = load_vae(path, v.arch)
        return vae, {"source": "spacetime", "path": path}
    if not (v.untrained or trainable):
        raise ConfigError("vae.path is not set: give the folder a `spacetime train vae` run wrote (RUN/vae), "
                          "or set vae.untrained: true for an UNTRAINED random VAE (smoke runs and tests only)")
    with torch.random.fork_rng(devices=[]):  # global RNG (the DiT's init) as if the VAE had been loaded
        torch.manual_seed(v.init_seed)
        vae = VideoVAE(v.arch)
    if not trainable:
        log.warning("DiT training on an %s", UNTRAINED_NOTE)
        if save_untrained and d.is_main and not (run_dir / VAE_DIR / "model.safetensors").exists():
            save_vae(vae, run_dir / VAE_DIR, note=UNTRAINED_NOTE)
    return vae, {"source": "spacetime", "path": str((run_dir / VAE_DIR).resolve()), "run_relative": VAE_DIR,
                 "untrained": not trainable}


def sync_loader(cfg: TrainConfig, temporal: int, spatial: int, patch: tuple[int, int, int]) -> TrainConfig:
    """The loader's token math must use the models' compression and patch: copy them in, or refuse a
    config that set them to other values."""
    loader = cfg.loader
    want = {"vae_temporal": temporal, "vae_spatial": spatial, "patch": tuple(patch)}
    for key, value in want.items():
        got = getattr(loader, key)
        got = tuple(got) if isinstance(got, (list, tuple)) else got
        if key in loader.model_fields_set and got != value:
            raise ConfigError(f"loader.{key} = {got} but the models use {value}: remove loader.{key} "
                              "(it follows the VAE / DiT) or make them agree")
    return cfg.model_copy(update={"loader": loader.model_copy(update=want)})


# ---------------------------------------------------------------------------------------- dit
class DiTTask(Task):
    """Loss of a DiT step: frozen VAE latents + frozen text embeddings -> rectified flow."""

    kind = "dit"

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist):
        from training.cache import check_training_cache, training_cache

        self.cfg, self.d = cfg, d
        self.cache = training_cache(cfg)
        if self.cache is None:
            self.tokenizer, self.text_encoder, text_dim = load_text_encoder_from(cfg, d.device)
        else:  # embeddings come with the batches
            self.tokenizer, self.text_encoder, text_dim = None, None, int(self.cache["text_dim"])
        self.vae, self.vae_ref = build_vae(cfg, run_dir, d, trainable=False)
        if self.cache is not None:
            check_training_cache(self.cache, cfg, self.vae, cfg.loader.data[0])
        vae_dtype = cfg.vae.dtype if cfg.vae.dtype != "auto" else (
            "bfloat16" if d.device.type == "cuda" else "float32")
        self.vae_dtype = _DTYPES[vae_dtype]
        self.vae = self.vae.to(d.device, self.vae_dtype).eval().requires_grad_(False)
        if cfg.loader.caption_dropout == 0:
            log.warning("loader.caption_dropout is 0: the model never sees the empty caption, so classifier-"
                        "free guidance at sampling has no unconditional model to push away from")
        self.model = DiT(cfg.dit, in_channels=self.vae.latent_channels, text_dim=text_dim)
        self.model_args = {"dit": cfg.dit.model_dump(mode="json"), "in_channels": self.vae.latent_channels,
                           "text_dim": text_dim}
        self.compression = (self.vae.temporal_compression, self.vae.spatial_compression)
        self.patch = tuple(cfg.dit.patch)

    def meta(self) -> dict:
        return {"kind": self.kind, "model_args": self.model_args, "vae": self.vae_ref,
                "text_encoder": self.cfg.text_encoder.model_dump(mode="json"),
                "flow": self.cfg.flow.model_dump(mode="json")}

    def flops(self, tokens: int) -> float:
        a = self.model_args
        return flops_per_token(self.cfg.dit, a["in_channels"], a["text_dim"], tokens, self.cfg.text_encoder.max_length)

    def loss(self, forward_model, batch: dict, generator: torch.Generator, amp) -> tuple[torch.Tensor, dict, int]:
        if isinstance(batch.get("video", batch.get("latent")), list):  # loader.packing: samples of any sizes
            return self.packed_loss(forward_model, batch, generator, amp)
        x0, text, mask = self.inputs(batch, generator)
        tokens = _patch_tokens(x0.shape, self.patch)  # latent patches per sample
        with amp:
            per_sample = flow_loss(forward_model, x0, text, mask, tokens, self.cfg.flow, generator)
        loss = per_sample.mean()
        return loss, {}, tokens * x0.shape[0]

    def packed_loss(self, forward_model, batch: dict, generator: torch.Generator, amp) -> tuple[torch.Tensor, dict, int]:
        """A packed batch (training.data.packing): each video encoded at its own size, the DiT run on all
        of them as one sequence; the loss averaged per sample, then over samples, as unpacked."""
        from training.flow import flow_loss_packed
        from training.text_encoder import encode_text

        dev, sample = self.d.device, self.cfg.vae.sample_posterior
        if "latent" in batch:  # a latent cache built with loader.packing: native-size posteriors
            x0 = [self.vae.latent(p[None, 0].to(dev), p[None, 1].to(dev), sample=sample, generator=generator).float()[0]
                  for p in batch["latent"]]
            text, mask = batch["text"], batch["text_mask"]
        else:
            with torch.no_grad():
                x0 = [self.vae.encode(v[None].to(dev, self.vae_dtype, non_blocking=True), sample=sample,
                                      generator=generator).float()[0] for v in batch["video"]]
            text, mask = encode_text(self.tokenizer, self.text_encoder, batch["caption"],
                                     self.cfg.text_encoder.max_length)
        tokens = [_patch_tokens((1, *x.shape), self.patch) for x in x0]
        with amp:
            per_sample = flow_loss_packed(forward_model, x0, text.to(dev).clone(), mask.to(dev).clone(), tokens,
                                          self.cfg.flow, generator)
        padding = torch.tensor(float(batch["stats"]["padding"]), device=dev)  # logged: the sequence's unused share
        return per_sample.mean(), {"padding": padding}, sum(tokens)

    def inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised latents x0 [B, C, T', H', W'] float32, text [B, L, D], mask [B, L]) of a batch:
        from a latent cache's posterior and embeddings, or by encoding its videos and captions."""
        from training.text_encoder import encode_text

        dev, sample = self.d.device, self.cfg.vae.sample_posterior
        if "latent" in batch:
            posterior = batch["latent"].to(dev, non_blocking=True)  # [B, 2, C, T', H', W'] float32
            x0 = self.vae.latent(posterior[:, 0], posterior[:, 1], sample=sample, generator=generator).float()
            return x0, batch["text"].to(dev, non_blocking=True), batch["text_mask"].to(dev, non_blocking=True)
        if self.text_encoder is None:
            raise RuntimeError("a video batch reached a DiT task set up for a latent cache")
        video = batch["video"].to(dev, self.vae_dtype, non_blocking=True)  # [B, 3, T, H, W]
        with torch.no_grad():
            x0 = self.vae.encode(video, sample=sample, generator=generator).float()
        text, mask = encode_text(self.tokenizer, self.text_encoder, batch["caption"], self.cfg.text_encoder.max_length)
        return x0, text.to(dev).clone(), mask.to(dev).clone()  # clone: out of inference mode


# ---------------------------------------------------------------------------------------- vae
class VAETask(Task):
    """Loss of a VAE step: reconstruction + KL (+ perceptual); exports RUN/vae at every checkpoint."""

    kind = "vae"

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist):
        from training.cache import training_cache

        self.cfg, self.d = cfg, d
        if training_cache(cfg) is not None:
            raise ConfigError(f"loader.data {cfg.loader.data} is a latent cache: `train vae` learns from videos, "
                              "give the curation output")
        if cfg.loader.packing:
            raise ConfigError("loader.packing is for `train dit`: the VAE trains on bucketed clips (set loader.packing: false)")
        self.model, ref = build_vae(cfg, run_dir, d, trainable=True)
        self.init_ref = ref if cfg.vae.path else None
        self.perceptual = None
        if cfg.vae_loss.perceptual_weight > 0:
            from spacetime.models import resolve

            self.perceptual = PerceptualLoss(resolve(cfg.vae_loss.perceptual_weights)).to(d.device)
            log.info("perceptual term on (weight %s, VGG16 weights %s)", cfg.vae_loss.perceptual_weight,
                     cfg.vae_loss.perceptual_weights)
        self.compression = (self.model.temporal_compression, self.model.spatial_compression)
        self.patch = tuple(cfg.loader.patch)
        self.model_args = {"arch": self.model.arch.model_dump(mode="json")}
        self.latent_stats: deque = deque(maxlen=cfg.vae_loss.stats_steps)  # (mean, mean of squares) per step

    def meta(self) -> dict:
        return {"kind": self.kind, "model_args": self.model_args, "vae_init": self.init_ref}

    # no flops(): no FLOP counter for the VAE, MFU is reported for the DiT only

    def loss(self, forward_model, batch: dict, generator: torch.Generator, amp) -> tuple[torch.Tensor, dict, int]:
        lc = self.cfg.vae_loss
        video = random_window(batch["video"].to(self.d.device, non_blocking=True), lc.crop_frames, lc.crop_size,
                              generator)
        target = self.model.trim(video)  # the frames the encoder uses
        with amp:
            recon, mean, logvar = forward_model(video, generator=generator)
        diff = recon.float() - target.float()
        rec = diff.abs().mean() if lc.recon == "l1" else diff.square().mean()
        kl = kl_loss(mean, logvar)
        parts = {"recon": rec.detach(), "kl": kl.detach(), "mse": diff.detach().square().mean()}
        loss = rec + lc.kl_weight * kl
        if self.perceptual is not None:
            with amp:
                perc = self.perceptual(recon.float(), target.float()).float()
            loss = loss + lc.perceptual_weight * perc
            parts["perceptual"] = perc.detach()
        m = mean.detach().float()
        dims = (0, *range(2, m.dim()))  # per channel: [2, C]
        self.latent_stats.append(torch.stack([m.mean(dims), m.square().mean(dims)]))
        return loss, parts, _patch_tokens(mean.shape, self.patch) * mean.shape[0]

    def state(self) -> dict:
        return {"latent_stats": [t.cpu() for t in self.latent_stats]}

    def load_state(self, state: dict) -> None:
        self.latent_stats.clear()
        # a checkpoint from before per-channel statistics holds [2] entries: they are dropped (refilled
        # within stats_steps steps)
        self.latent_stats.extend(t.to(self.d.device) for t in state.get("latent_stats", []) if t.dim() == 2)

    def on_checkpoint(self, run_dir: Path) -> None:
        """Export RUN/vae: gathering the full weights is a collective, only rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self.export(run_dir, state if self.d.is_main else None)

    def export(self, run_dir: Path, model_state: dict | None) -> None:
        """Write RUN/vae with the current weights and latent normalisation (rank 0 passes the state)."""
        stats = torch.stack(list(self.latent_stats)).mean(0)
        if self.d.enabled:
            dist.all_reduce(stats)
            stats /= self.d.world_size
        if model_state is None:
            return
        if self.cfg.vae_loss.latent_norm == "global":  # every channel has as many elements: the mean of means
            stats = stats.mean(dim=1, keepdim=True)
        mean, sq = stats[0].double(), stats[1].double()
        std = (sq - mean * mean).clamp_min(1e-12).sqrt()
        scale, shift = (1.0 / std).tolist(), mean.tolist()
        if self.cfg.vae_loss.latent_norm == "global":
            scale, shift = scale[0], shift[0]
        arch = self.model.arch.model_copy(update={"scaling_factor": scale, "shift_factor": shift})
        vae = VideoVAE(arch)
        vae.load_state_dict(model_state)
        save_vae(vae, run_dir / VAE_DIR, note=f"trained by spacetime train vae ({run_dir})")


TASKS: dict[str, type[Task]] = {"dit": DiTTask, "vae": VAETask}


def build_task(kind: str, cfg: TrainConfig, run_dir: Path, d: Dist) -> Task:
    return TASKS[kind](cfg, run_dir, d)
