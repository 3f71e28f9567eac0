"""Causal 3D-convolution video VAE: T frames -> 1 + (T - 1) // 4 latent frames, 8x smaller, 16 channels.

    vae = VideoVAE(VAEArch())                        # or load_vae(path) / load_diffusers_vae(hf_id)
    z = vae.encode(video)                            # [B, 3, T, H, W] in [-1, 1] -> [B, C, T', H', W']
    video = vae.decode(z)                            # -> [B, 3, 1 + (T' - 1) * 4, 8 H', 8 W']

Causality. Every convolution pads time on the LEFT only (the first frame replicated), and every
normalisation is per frame, so latent frame j depends on pixel frames <= its last one and never on
later ones (tests/test_vae.py checks it). Time is halved by stride-2 causal convolutions, which map
T -> 1 + (T - 1) // 2: the first frame is encoded on its own (an image is a 1-frame video with one
latent frame) and each further latent frame covers `temporal_compression` frames: latent 0 <- frame
0, latent j >= 1 <- frames (j - 1) * 4 + 1 ... j * 4. A clip of T frames is encoded as its first
1 + (T - 1) // 4 * 4 frames (the loader's 16-frame tier gives 4 latent frames from frames 0..12);
the decoder maps T' latent frames back to 1 + (T' - 1) * 4 frames. Sizes that are not multiples of
the spatial compression are rounded up (ceil) in the latent and cropped by the caller.

Patch fold (`VAEArch.patch_size` p > 1): each frame's p x p pixel patches are folded into channels
before the first convolution and unfolded after the last (pixel unshuffle/shuffle, as in LTX-Video's
VAE), so every convolution runs on p^2 times fewer positions and the levels go from 8 / p down to
8x. On 2 CPU cores a training step of p = 2 with channels (16, 32, 64) took 1.9 s against 2.6 s for
p = 1 with (8, 16, 32, 32), at 144x256x13 and batch 2 (configs/train/learn_cpu.yaml uses p = 2).

Shortcuts (`VAEArch.shortcuts`, the residual autoencoding of DC-AE): parameter-free paths carry the
video's causal 4x8x8 block averages into the latent mean and their copies back out of the decoder
(`average_down`, `duplicate_up`), and the same at every down- and upsampling, so the convolutions learn
what the block averages miss. In memory on 2 cores (learn_cpu.yaml's VAE, 240 s of training each), held-out
PSNR went from 18.7 dB without them to 21.7 dB with them, at the same cost per step.
`VAEArch.shortcut_basis: dct` replaces the latent path's block averages (averages of 48 arbitrary
folded values for 16 channels) with an orthogonal projection on each block's lowest 4-D DCT
frequencies (`dct_basis`, `dct_down`, `dct_up`): on held-out real footage that projection alone keeps
27.1 dB against 19.9 dB, and benchmarks/learns.py's VAE reached 30.0 dB held-out (SSIM 0.92) instead of
24.6 dB (0.77) in the same 900 steps.

Latents handed to the DiT are normalised: (z - shift_factor) * scaling_factor (`VAEArch`), one number
or one per channel. `spacetime train vae` writes these from the statistics of the posterior means it saw
last: over all channels, or per channel with `vae_loss.latent_norm: channel`.

Weights: `save_vae(vae, folder)` writes config.json + model.safetensors, `load_vae(folder)` reads
them (a .safetensors / .pt file also loads, with the architecture given). `load_diffusers_vae(id)`
wraps a public video VAE (e.g. Wan's or CogVideoX's) through diffusers, IF diffusers is installed;
this environment does not have it, so that path is guarded and untested here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from spacetime.config import StrictModel
from spacetime.errors import MissingInput, UserError
from spacetime.io import atomic_path, atomic_write


class VAEArch(StrictModel):
    """Architecture of a VideoVAE (stored with its weights as config.json)."""

    in_channels: int = Field(3, gt=0)
    latent_channels: int = Field(16, gt=0)
    temporal_compression: int = 4  # a power of 2: 1, 2, 4, ...
    spatial_compression: int = 8  # a power of 2
    # Pixels folded into channels before the first convolution (pixel unshuffle, as LTX-Video's VAE
    # does) and unfolded after the last: p x p patches become 3 p^2 channels, so the convolutions run
    # on p^2 times fewer positions. 1: none. A power of 2, at most spatial_compression.
    patch_size: int = 1
    # Channels per resolution level, the patch grid first; log2(spatial_compression / patch_size) + 1 levels.
    channels: tuple[int, ...] = (128, 256, 512, 512)
    blocks_per_level: int = Field(2, ge=1)
    # Non-parametric shortcuts (the residual autoencoding of DC-AE, Chen et al. 2025; Wan2.2's VAE has
    # the same AvgDown3D / DupUp3D): each downsampling adds the average of the values it folds together,
    # each upsampling adds the copies it spreads, the latent mean adds the video's block averages
    # (in_channels * temporal * spatial^2 folded values, averaged in latent_channels groups) and the
    # decoder's output adds their copies back. The networks then learn the residual of a block-average
    # codec instead of an identity through every layer. No weights: False is the VAE saved before it.
    shortcuts: bool = False
    # The pixel <-> latent shortcut's basis: "average" (the block averages above) or "dct": the latent
    # mean adds the latent_channels lowest-frequency coefficients of the 4-D DCT of each (colour, time,
    # row, column) block and the decoder adds back their inverse, an orthogonal projection (`dct_basis`).
    # At init, on held-out real footage at 4x8x8 and 16 channels: 27.1 dB against 19.9 dB for "average".
    shortcut_basis: Literal["average", "dct"] = "average"
    # Latent normalisation for the DiT, (z - shift_factor) * scaling_factor: one number, or one per latent
    # channel (as Wan's latents_mean / latents_std; `spacetime train vae` writes those with
    # vae_loss.latent_norm: channel)
    scaling_factor: float | list[float] = 1.0
    shift_factor: float | list[float] = 0.0

    @model_validator(mode="after")
    def _check(self) -> "VAEArch":
        for name in ("temporal_compression", "spatial_compression", "patch_size"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} {v}: must be a power of 2")
        for name in ("scaling_factor", "shift_factor"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != self.latent_channels:
                raise ValueError(f"{name}: {len(v)} values for {self.latent_channels} latent channels (give one "
                                 f"number, or one per channel)")
        if self.patch_size > self.spatial_compression:
            raise ValueError(f"patch_size {self.patch_size} exceeds spatial_compression {self.spatial_compression}")
        if len(self.channels) != self.spatial_levels + 1:
            raise ValueError(f"channels {list(self.channels)}: need log2(spatial_compression / patch_size) + 1 = "
                             f"{self.spatial_levels + 1} entries (one per resolution level)")
        if self.temporal_levels > self.spatial_levels:
            raise ValueError("temporal_compression may not exceed spatial_compression / patch_size (time is "
                             "halved at the spatial downsamplings)")
        folded = self.in_channels * self.temporal_compression * self.spatial_compression ** 2
        if self.shortcuts and self.shortcut_basis == "dct" and self.latent_channels > folded:
            raise ValueError(f"shortcut_basis dct: latent_channels {self.latent_channels} exceeds in_channels x "
                             f"temporal x spatial^2 = {folded} (one DCT coefficient per latent channel)")
        if self.shortcuts and self.shortcut_basis == "average" and folded % self.latent_channels:
            raise ValueError(f"shortcuts: latent_channels {self.latent_channels} must divide in_channels x "
                             f"temporal x spatial^2 = {folded} (the block averages are grouped per latent channel)")
        return self

    @property
    def spatial_levels(self) -> int:
        """Downsamplings by 2 after the patch fold."""
        return int(math.log2(self.spatial_compression // self.patch_size))

    @property
    def temporal_levels(self) -> int:
        return int(math.log2(self.temporal_compression))

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.temporal_compression

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        s = self.spatial_compression
        return math.ceil(height / s), math.ceil(width / s)

    def decoded_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_compression


# ------------------------------------------------------------------------------------- layers
def _groups(channels: int) -> int:
    return max(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class FrameNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame separately: statistics never mix frames (causality)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W]
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Conv3d padded (kt - 1) frames on the left (first frame replicated), kh // 2 zeros in space."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.time_pad, self.space_pad = kernel - 1, kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=(0, self.space_pad, self.space_pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(_groups(cin), cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = FrameNorm(_groups(cout), cout), CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def block_fold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """[B, C, 1 + k ft, H, W] -> [B, C ft fs^2, 1 + k, ceil(H / fs), ceil(W / fs)], causally: frame 0 is
    replicated ft - 1 times in front (so it forms a block of its own, as the causal encoder treats it) and
    the right and bottom edges up to a multiple of fs. Channel order (c, time, row, column)."""
    if ft > 1:
        x = torch.cat([x[:, :, :1].expand(-1, -1, ft - 1, -1, -1), x], dim=2)
    b, c, t, h, w = x.shape
    ph, pw = -h % fs, -w % fs
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph, 0, 0), mode="replicate")
    t, h, w = t // ft, (h + ph) // fs, (w + pw) // fs
    x = x.reshape(b, c, t, ft, h, fs, w, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * ft * fs * fs, t, h, w)


def block_unfold(x: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """The inverse of block_fold (without its padding): [B, C ft fs^2, T, H, W] -> [B, C, 1 + (T - 1) ft,
    fs H, fs W]."""
    b, n, t, h, w = x.shape
    c = n // (ft * fs * fs)
    x = x.reshape(b, c, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, t * ft, h * fs, w * fs)[:, :, ft - 1:]


def average_down(x: torch.Tensor, ft: int, fs: int, channels: int) -> torch.Tensor:
    """The shortcut of a downsampling by (ft, fs, fs) to `channels`: block_fold, then each run of
    C ft fs^2 / channels folded channels averaged (DC-AE's space-to-channel shortcut, causal in time)."""
    x = block_fold(x, ft, fs)
    b, n, t, h, w = x.shape
    return x.reshape(b, channels, n // channels, t, h, w).mean(dim=2)


def duplicate_up(x: torch.Tensor, ft: int, fs: int, channels: int) -> torch.Tensor:
    """The shortcut of an upsampling by (ft, fs, fs) to `channels`, average_down's adjoint: each channel
    copied to the folded channels it averaged, then block_unfold."""
    return block_unfold(x.repeat_interleave(channels * ft * fs * fs // x.shape[1], dim=1), ft, fs)


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II of length n: [n frequencies, n samples]."""
    k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None]
    d = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def dct_basis(channels: int, ft: int, fs: int, k: int) -> torch.Tensor:
    """[k, channels ft fs^2]: the k lowest-frequency atoms of the 4-D DCT-II of a (channel, time, row,
    column) block, in block_fold's channel order. Over 3 colours the channel DCT is an orthonormal
    luma / two-chroma transform. Frequencies (c, t, h, w) are ranked by c + 2t + h + w, ties in that
    order (time counts twice: the frames of a 4-frame block differ less than 8 px apart do; ranked
    this way the projection kept the most of the real footage among the orders tried, 26.6-27.7 dB at
    4x8x8 and 16 channels, against 19.9-21.8 dB for the block averages). The rows are orthonormal,
    scaled by sqrt(channels / (channels ft fs^2)): the first coefficient is sqrt(channels) x the
    block's mean (over 3 colours, the mean luma x sqrt(3))."""
    ranked = sorted(((c, t, h, w) for c in range(channels) for t in range(ft) for h in range(fs) for w in range(fs)),
                    key=lambda f: (f[0] + 2 * f[1] + f[2] + f[3], f))[:k]
    dc, dt, ds = dct_matrix(channels), dct_matrix(ft), dct_matrix(fs)
    atoms = torch.stack([torch.einsum("c,t,h,w->cthw", dc[c], dt[t], ds[h], ds[w]).reshape(-1) for c, t, h, w in ranked])
    return (atoms / (ft * fs * fs) ** 0.5).float()


def dct_down(x: torch.Tensor, basis: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """The pixel -> latent shortcut of shortcut_basis "dct": [B, C, T, H, W] -> [B, k, T', H', W']."""
    return torch.einsum("kn,bnthw->bkthw", basis, block_fold(x, ft, fs))


def dct_up(z: torch.Tensor, basis: torch.Tensor, ft: int, fs: int) -> torch.Tensor:
    """dct_down's inverse on its span: dct_up(dct_down(x)) is x's orthogonal projection on the basis."""
    return block_unfold(torch.einsum("kn,bkthw->bnthw", basis * (ft * fs * fs), z), ft, fs)  # x 1 / rows' norm^2


class Downsample(nn.Module):
    """[B, C, T, H, W] -> [B, C, 1 + (T - 1) // 2 if time else T, ceil(H / 2), ceil(W / 2)]."""

    def __init__(self, channels: int, time: bool, shortcut: bool = False):
        super().__init__()
        self.time, self.shortcut = time, shortcut
        self.conv = CausalConv3d(channels, channels, 3, stride=(2 if time else 1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut:
            return self.conv(x) + average_down(x, 2 if self.time else 1, 2, x.shape[1])
        return self.conv(x)


class Upsample(nn.Module):
    """[B, C, T, H, W] -> [B, C, 2T - 1 if time else T, 2H, 2W]: frame 0 stays one frame (causal)."""

    def __init__(self, channels: int, time: bool, shortcut: bool = False):
        super().__init__()
        self.time, self.shortcut = time, shortcut
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time:
            x = x.repeat_interleave(2, dim=2)[:, :, 1:]
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        # the copies (duplicate_up, which is what the line above computes) plus what the conv adds
        return x + self.conv(x) if self.shortcut else self.conv(x)


def patch_fold(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, C p^2, T, ceil(H / p), ceil(W / p)]: each p x p patch of a frame becomes
    channels (the right and bottom edges replicated up to a multiple of p first): block_fold in space only."""
    return x if p == 1 else block_fold(x, 1, p)


def patch_unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of patch_fold (without its edge padding): [B, C p^2, T, H, W] -> [B, C, T, p H, p W]."""
    return x if p == 1 else block_unfold(x, 1, p)


# ------------------------------------------------------------------------------ encoder/decoder
class Encoder(nn.Module):
    def __init__(self, arch: VAEArch):
        super().__init__()
        ch = arch.channels
        self.patch = arch.patch_size
        self.conv_in = CausalConv3d(arch.in_channels * self.patch ** 2, ch[0])
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            level = nn.Module()
            level.blocks = nn.ModuleList(
                ResBlock(ch[max(i - 1, 0)] if j == 0 else c, c) for j in range(arch.blocks_per_level))
            # time is halved at the first temporal_levels downsamplings (the cheapest place to shrink it)
            level.down = (Downsample(c, time=i < arch.temporal_levels, shortcut=arch.shortcuts)
                          if i < len(ch) - 1 else nn.Identity())
            self.levels.append(level)
        self.mid = nn.Sequential(ResBlock(ch[-1], ch[-1]), ResBlock(ch[-1], ch[-1]))
        self.norm_out = FrameNorm(_groups(ch[-1]), ch[-1])
        self.conv_out = CausalConv3d(ch[-1], 2 * arch.latent_channels)
        self.arch = arch
        if arch.shortcuts and arch.shortcut_basis == "dct":  # not saved: a function of the arch
            self.register_buffer("basis", dct_basis(arch.in_channels, arch.temporal_compression,
                                                    arch.spatial_compression, arch.latent_channels), persistent=False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # [B, 3, T, H, W] -> [B, 2C, T', H', W']
        x = self.conv_in(patch_fold(video, self.patch))
        for level in self.levels:
            for block in level.blocks:
                x = block(x)
            x = level.down(x)
        x = self.mid(x)
        moments = self.conv_out(F.silu(self.norm_out(x)))
        if not self.arch.shortcuts:
            return moments
        a, c = self.arch, self.arch.latent_channels
        if a.shortcut_basis == "dct":
            mean = moments[:, :c] + dct_down(video, self.basis, a.temporal_compression, a.spatial_compression)
        else:
            mean = moments[:, :c] + average_down(video, a.temporal_compression, a.spatial_compression, c)
        return torch.cat([mean, moments[:, c:]], dim=1)


class Decoder(nn.Module):
    def __init__(self, arch: VAEArch):
        super().__init__()
        ch = arch.channels
        n = len(ch)
        self.conv_in = CausalConv3d(arch.latent_channels, ch[-1])
        self.mid = nn.Sequential(ResBlock(ch[-1], ch[-1]), ResBlock(ch[-1], ch[-1]))
        self.levels = nn.ModuleList()
        for i in reversed(range(n)):  # lowest resolution first
            level = nn.Module()
            cin = ch[min(i + 1, n - 1)]
            level.blocks = nn.ModuleList(ResBlock(cin if j == 0 else ch[i], ch[i])
                                         for j in range(arch.blocks_per_level))
            # mirror of the encoder: time doubles at the last temporal_levels upsamplings
            level.up = (Upsample(ch[i], time=i - 1 < arch.temporal_levels, shortcut=arch.shortcuts)
                        if i > 0 else nn.Identity())
            self.levels.append(level)
        self.norm_out = FrameNorm(_groups(ch[0]), ch[0])
        self.patch = arch.patch_size
        self.conv_out = CausalConv3d(ch[0], arch.in_channels * self.patch ** 2)
        self.arch = arch
        if arch.shortcuts and arch.shortcut_basis == "dct":  # not saved: a function of the arch
            self.register_buffer("basis", dct_basis(arch.in_channels, arch.temporal_compression,
                                                    arch.spatial_compression, arch.latent_channels), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, C, T', H', W'] -> [B, 3, T, H, W]
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            for block in level.blocks:
                x = block(x)
            x = level.up(x)
        video = patch_unfold(self.conv_out(F.silu(self.norm_out(x))), self.patch)
        if not self.arch.shortcuts:
            return video
        a = self.arch
        if a.shortcut_basis == "dct":
            return video + dct_up(z, self.basis, a.temporal_compression, a.spatial_compression)
        return video + duplicate_up(z, a.temporal_compression, a.spatial_compression, a.in_channels)


class VideoVAE(nn.Module):
    """KL autoencoder of videos [B, 3, T, H, W] in [-1, 1]; see the module docstring."""

    def __init__(self, arch: VAEArch):
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)

    @property
    def temporal_compression(self) -> int:
        return self.arch.temporal_compression

    @property
    def spatial_compression(self) -> int:
        return self.arch.spatial_compression

    @property
    def latent_channels(self) -> int:
        return self.arch.latent_channels

    def trim(self, video: torch.Tensor) -> torch.Tensor:
        """The frames the encoder uses: the first 1 + (T - 1) // ct * ct."""
        t = video.shape[2]
        return video[:, :, : 1 + (t - 1) // self.arch.temporal_compression * self.arch.temporal_compression]

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z | video), each [B, C, T', H', W'], UNnormalised."""
        moments = self.encoder(self.trim(video))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def _per_channel(self, v: float | list[float], z: torch.Tensor) -> float | torch.Tensor:
        """A normalisation constant as a number, or a [C, 1, 1, 1] tensor for per-channel ones."""
        return torch.tensor(v, dtype=z.dtype, device=z.device).view(-1, 1, 1, 1) if isinstance(v, list) else v

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        a = self.arch
        return (z - self._per_channel(a.shift_factor, z)) * self._per_channel(a.scaling_factor, z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        a = self.arch
        return z / self._per_channel(a.scaling_factor, z) + self._per_channel(a.shift_factor, z)

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """[B, 3, T, H, W] -> normalised latents [B, C, 1 + (T-1)//ct, ceil(H/cs), ceil(W/cs)]: the
        posterior mean, or a draw from it (`sample`, using `generator`)."""
        return self.latent(*self.posterior(video), sample=sample, generator=generator)

    def latent(self, mean: torch.Tensor, logvar: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents from the posterior (what `encode` does after the encoder; training from
        a latent cache starts here)."""
        return self.normalize(posterior_draw(mean, logvar, sample, generator))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, T', H', W'] -> video [B, 3, 1 + (T'-1)*ct, cs*H', cs*W'] (not clamped)."""
        return self.decoder(self.denormalize(z))

    def reconstruct(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(trim(video), its reconstruction): the decoder on the posterior mean, unnormalised (as the
        decoder is trained), not clamped. What validation and the VAE's samples measure."""
        target = self.trim(video)
        return target, self.decoder(self.posterior(target)[0])

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None):
        """Training pass: (reconstruction of trim(video), mean, logvar), with z drawn from q(z | video)."""
        mean, logvar = self.posterior(video)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decoder(mean + torch.exp(0.5 * logvar) * eps), mean, logvar


# -------------------------------------------------------------------------------------- losses
def random_window(video: torch.Tensor, frames: int | None, size: tuple[int, int] | None,
                  generator: torch.Generator) -> torch.Tensor:
    """A random window of `frames` frames and `size` (height, width) pixels of the batch [B, 3, T, H,
    W], the same for every clip, its corner drawn from `generator`. A dimension that is None, or not
    larger than the window, is kept whole. (vae_loss.crop_frames, crop_size)"""
    for dim, length in zip((2, 3, 4), (frames, *(size or (None, None)))):
        if length is not None and video.shape[dim] > length:
            start = torch.randint(video.shape[dim] - length + 1, (1,), generator=generator, device=generator.device)
            video = video.narrow(dim, int(start), length)
    return video


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)), averaged over latent elements (so kl_weight does not depend on size)."""
    return 0.5 * (mean.float().square() + logvar.float().exp() - 1.0 - logvar.float()).mean()


class PerceptualLoss(nn.Module):
    """LPIPS-style distance without learned heads: mean squared difference of unit-normalised VGG16
    features (relu1_2, relu2_2, relu3_3, relu4_3) of every frame.

    Only used when its weights are available: `weights` is a local file with the state dict of
    torchvision's `vgg16().features` (or of a whole vgg16, whose `features.` entries are taken);
    nothing is downloaded. Frozen; frames are resized to at least 32 px.
    """

    LAYERS = (3, 8, 15, 22)  # indices of relu1_2, relu2_2, relu3_3, relu4_3 in vgg16().features

    def __init__(self, weights: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16().features[: self.LAYERS[-1] + 1]
        state = _read_state_dict(Path(weights))
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        state = {k: v for k, v in state.items() if int(k.split(".")[0]) <= self.LAYERS[-1]}
        features.load_state_dict(state)
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # videos [B, 3, T, H, W] in [-1, 1]
        def frames(v):
            v = v.transpose(1, 2).flatten(0, 1)  # [B*T, 3, H, W]
            if min(v.shape[-2:]) < 32:
                v = F.interpolate(v, scale_factor=32 / min(v.shape[-2:]), mode="bilinear", align_corners=False)
            return ((v + 1) / 2 - self.mean) / self.std

        x, y, total = frames(a), frames(b), 0.0
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i in self.LAYERS:
                total = total + (F.normalize(x, dim=1) - F.normalize(y, dim=1)).square().sum(1).mean()
        return total / len(self.LAYERS)


# ------------------------------------------------------------------------------------- weights
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def save_vae(vae: VideoVAE, folder: str | Path, note: str | None = None) -> Path:
    """Write config.json (the VAEArch) + model.safetensors to `folder` (temp names, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    config = {"arch": vae.arch.model_dump(mode="json"), "note": note}
    atomic_write(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def load_vae(path: str | Path, arch: VAEArch | None = None) -> VideoVAE:
    """A VideoVAE from a folder written by `save_vae` (its config.json gives the architecture), or
    from a .safetensors / .pt state-dict file with `arch` given."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).exists():
            raise MissingInput(f"{path}: no {CONFIG_FILE}; is it a folder written by `spacetime train vae`?")
        arch = VAEArch.model_validate(json.loads((path / CONFIG_FILE).read_text())["arch"])
        path = path / WEIGHTS_FILE
    elif not path.exists():
        raise MissingInput(f"{path}: VAE weights not found")
    elif arch is None:
        raise ValueError(f"{path}: a weights file needs the architecture (vae.arch) to load into")
    vae = VideoVAE(arch)
    try:
        vae.load_state_dict(_read_state_dict(path))
    except RuntimeError as err:  # missing / unexpected keys, shape mismatches
        raise ValueError(f"{path}: weights do not fit the architecture {arch.model_dump()}: "
                         f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
    return vae


def posterior_draw(mean: torch.Tensor, logvar: torch.Tensor, sample: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """The posterior's mean, or a draw mean + exp(logvar / 2) * eps with eps ~ N(0, 1) from `generator`."""
    if not sample:
        return mean
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


class DiffusersVAE(nn.Module):
    """A diffusers video VAE behind the VideoVAE interface (encode/decode normalised latents).

    Compression factors come from the diffusers config (`temporal_compression_ratio` /
    `scale_factor_temporal`, `spatial_compression_ratio` / `scale_factor_spatial`); normalisation
    from per-channel `latents_mean` / `latents_std` (Wan) or `scaling_factor` (CogVideoX).
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        cfg = model.config
        self.temporal_compression = int(getattr(cfg, "temporal_compression_ratio", None)
                                        or getattr(cfg, "scale_factor_temporal", 4))
        self.spatial_compression = int(getattr(cfg, "spatial_compression_ratio", None)
                                       or getattr(cfg, "scale_factor_spatial", 8))
        self.latent_channels = int(getattr(cfg, "latent_channels", None) or cfg.z_dim)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
            self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)
        else:
            self.register_buffer("mean", torch.zeros(1), persistent=False)
            self.register_buffer("inv_std", torch.tensor(float(getattr(cfg, "scaling_factor", 1.0))),
                                 persistent=False)

    def trim(self, video: torch.Tensor) -> torch.Tensor:
        t = video.shape[2]
        return video[:, :, : 1 + (t - 1) // self.temporal_compression * self.temporal_compression]

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.model.encode(self.trim(video)).latent_dist
        return dist.mean, dist.logvar

    def encode(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        return self.latent(*self.posterior(video), sample=sample, generator=generator)

    def latent(self, mean: torch.Tensor, logvar: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """diffusers' DiagonalGaussianDistribution: mode() is the mean, sample() mean + std * eps."""
        return (posterior_draw(mean, logvar, sample, generator) - self.mean) * self.inv_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z / self.inv_std + self.mean).sample


def load_diffusers_vae(hf_id: str, subfolder: str | None = "vae", dtype: torch.dtype = torch.float32) -> DiffusersVAE:
    """A public video VAE by Hugging Face id (or local diffusers folder) through diffusers.AutoModel.

    Needs `pip install diffusers` (not installed in this project's environment) and the weights."""
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        raise UserError(f"vae {hf_id!r} (source: diffusers) needs the `diffusers` package, which is not "
                        "installed: pip install diffusers, or use a VAE saved by `spacetime train vae`")
    from diffusers import AutoModel

    model = AutoModel.from_pretrained(hf_id, subfolder=subfolder, torch_dtype=dtype)
    return DiffusersVAE(model.eval().requires_grad_(False))
