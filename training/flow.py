"""Rectified flow: the training objective, timestep sampling and shift, the Euler sampler core, EMA.

Convention (as in SD3): t = 0 is data, t = 1 is noise, on the straight line
    x_t = (1 - t) x_0 + t eps,        x_0 = VAE latents, eps ~ N(0, I)
and the model predicts the velocity along it,
    v = dx_t / dt = eps - x_0,        loss = mean || v_model(x_t, t, text) - (eps - x_0) ||^2.
Sampling integrates dx/dt = v from t = 1 (pure noise) down to t = 0 with Euler steps.

Timesteps. Training draws u from a logit-normal (u = sigmoid(m + s n), n ~ N(0, 1); SD3's
default m = 0, s = 1 puts most samples at mid noise levels) and shifts it. Shift by sequence
length: more tokens carry more redundant signal at a given noise level, so larger grids need
noisier timesteps. With s the shift, t = s u / (1 + (s - 1) u) (SD3's formula; s > 1 moves mass
towards noise), and s grows with the square root of the token count (SD3: alpha = sqrt(m / n)):
    s(tokens) = clamp(shift_base * sqrt(tokens / shift_base_tokens), shift_min, shift_max).
The sampler shifts its uniform time grid with the same s(tokens), so training and sampling agree.

Caption dropout for classifier-free guidance lives in ONE place: the loader
(`loader.caption_dropout`), which replaces a caption by "" deterministically per (seed, epoch,
clip id), so it survives an exact resume and needs no RNG here. The unconditional input is the text
encoder's embedding of "" in training and in sampling alike.
"""

from __future__ import annotations

import math
import re

import torch
from pydantic import Field, model_validator

from spacetime.config import StrictModel


class FlowConfig(StrictModel):
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift_base: float = Field(1.0, gt=0)  # the shift at shift_base_tokens
    shift_base_tokens: int = Field(1024, gt=0)
    shift_min: float = Field(1.0, gt=0)
    shift_max: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "FlowConfig":
        if self.shift_min > self.shift_max:
            raise ValueError(f"shift_min {self.shift_min} > shift_max {self.shift_max}")
        return self


def shift_for_tokens(tokens: int, cfg: FlowConfig) -> float:
    """The timestep shift s for a sample of `tokens` latent patches (module docstring)."""
    s = cfg.shift_base * math.sqrt(tokens / cfg.shift_base_tokens)
    return min(max(s, cfg.shift_min), cfg.shift_max)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t -> s t / (1 + (s - 1) t): a monotone map of [0, 1] onto itself; s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(batch: int, tokens: int, cfg: FlowConfig, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch] training timesteps: logit-normal, shifted for `tokens` latent patches per sample."""
    n = torch.randn(batch, generator=generator, device=device)
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * n)
    return time_shift(u, shift_for_tokens(tokens, cfg))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, t [B] broadcast over the other axes."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_loss(model, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, tokens: int,
              cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rectified-flow loss of one batch of clean latents x0 [B, C, T, H, W] (per-sample mean squared
    velocity error [B], float32; the caller averages and may group it by bucket)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = sample_timesteps(x0.shape[0], tokens, cfg, generator, x0.device)
    pred = model(interpolate(x0, noise, t), t, text, text_mask)
    return (pred.float() - (noise - x0).float()).square().flatten(1).mean(1)


def flow_loss_packed(model, x0: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor,
                     tokens: list[int], cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """flow_loss of S clean latents of any sizes, x0[i] [C, T_i, H_i, W_i], as ONE packed sequence
    (training.dit, "Packed sequences"): each sample draws its noise and its timestep (shifted for its
    own `tokens[i]`) in turn, with the same generator calls as flow_loss on that sample alone, so
    the result is the samples' losses one by one. Returns the per-sample losses [S] (float32)."""
    noise, t = [], []
    for x, n in zip(x0, tokens):
        noise.append(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        t.append(sample_timesteps(1, n, cfg, generator, x.device))
    t = torch.cat(t)
    xt = [interpolate(x[None], e[None], ti[None])[0] for x, e, ti in zip(x0, noise, t)]
    pred = model(xt, t, text, text_mask)
    return torch.stack([(p.float() - (e - x).float()).square().mean() for p, e, x in zip(pred, noise, x0)])


# ------------------------------------------------------------------------------------ sampling
def sampling_times(steps: int, tokens: int, cfg: FlowConfig, device=None) -> torch.Tensor:
    """[steps + 1] times from 1 down to 0, shifted for `tokens` (the same shift as in training)."""
    return time_shift(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64),
                      shift_for_tokens(tokens, cfg))


@torch.no_grad()
def euler_sample(velocity, noise: torch.Tensor, times: torch.Tensor, known: torch.Tensor | None = None,
                 release: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t [B]) from times[0] (= 1) to times[-1] (= 0), starting at `noise`.

    The ONE conditioning mechanism: `known` latents [B, C, T, H, W] and `release` [T] (per latent
    frame, in [0, 1]). While the current time t > release[j], latent frame j is replaced by the known
    frame noised to t with the SAME noise, (1 - t) known + t noise; below release[j] it evolves
    freely. release 0 holds a frame for the whole trajectory (it ends exactly equal to the known
    latent: image-to-video, extension, loops, interpolation); release 1 never holds it (free
    generation); release s in (0, 1) for every frame is SDEdit with strength s (the trajectory
    starts from the known video noised to the last grid time above s). Steps where every frame is held at both ends
    are skipped (no model call)."""
    x = noise
    if known is not None:
        if release is None:
            raise ValueError("known latents need a release time per latent frame")
        release = release.to(noise.device, torch.float64)

    def held_view(t: float) -> torch.Tensor:  # [1, 1, T, 1, 1]: frames still held at time t
        return (release < t).view(1, 1, -1, 1, 1)
    for i in range(len(times) - 1):
        t, t_next = float(times[i]), float(times[i + 1])
        if known is not None:
            x = torch.where(held_view(t), (1 - t) * known + t * noise, x)
            if bool(held_view(t_next).all()):
                continue  # overwritten again at the next step
        v = velocity(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32))
        x = x + (t_next - t) * v.to(x.dtype)
    if known is not None:
        x = torch.where((release <= 0).view(1, 1, -1, 1, 1), known, x)  # release 0: exactly the known latent
    return x


def guided_velocity(model, text: torch.Tensor, text_mask: torch.Tensor, null_text: torch.Tensor,
                    null_mask: torch.Tensor, cfg_scale: float):
    """velocity(x, t) with classifier-free guidance: v_null + cfg_scale (v_text - v_null), both in
    one batch; cfg_scale 1 is the plain conditional model (one pass)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if cfg_scale == 1.0:
            return model(x, t, text, text_mask).float()
        ctx = torch.cat([text, null_text.expand(b, -1, -1)])  # both encoded to the same max_length
        mask = torch.cat([text_mask, null_mask.expand(b, -1)])
        v_text, v_null = model(torch.cat([x, x]), torch.cat([t, t]), ctx, mask).float().chunk(2)
        return v_null + cfg_scale * (v_text - v_null)

    return velocity


# ------------------------------------------------------------------------------------------ EMA
_WRAPPER_PARTS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)(?=\.)")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes wrappers add (DDP module., compile _orig_mod., AC)."""
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


class EMA:
    """Exponential moving average of a model's parameters: ema <- decay ema + (1 - decay) param.

    Shadows live like the parameters they follow (same device, same sharding: DTensor shards under
    FSDP2, so memory per rank stays 1/world). `state_dict()` gathers full tensors (a collective
    under FSDP2: call it on every rank), keyed by the model's parameter names."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names, params = zip(*[(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad])
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: _full(s).cpu() for n, s in zip(self.names, self.shadow)}

    def sharded_state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows themselves (this rank's DTensor shards under FSDP2), for DCP to save or load in place."""
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")
        for name, s in zip(self.names, self.shadow):
            _copy_full_into(s, state[name])


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(dst, DTensor):
        dst.copy_(distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(full)
