"""Diffusion transformer on spacetime latent patches (the whole model, one file).

    model = DiT(DiTConfig(), in_channels=16, text_dim=4096)
    v = model(x, t, text, text_mask)   # x [B, C, T, H, W] latents at noise level t [B] in [0, 1],
                                       # text [B, L, D] embeddings, text_mask [B, L] bool -> [B, C, T, H, W]

A latent video is cut into patches of (pt, ph, pw) latent voxels (padded up to a multiple at the
end of each axis, cropped again at the output), each patch is one token, so ANY grid size works:
images are 1-frame videos and the sampler makes noise of the grid it wants. Positions are 3D
rotary embeddings over the (t, h, w) patch indices, computed for the grid at hand. Each block is
self-attention (QK-norm, rotary) -> cross-attention to the text tokens (masked) -> MLP, with
adaLN-Zero modulation (shift, scale, gate) from the timestep embedding; the final layer is adaLN +
linear, zero-initialised, as in facebookresearch/DiT.

Packed sequences (NaViT's Patch n' Pack, `loader.packing`): given a LIST of latents of any sizes,
    v = model([x_1, ..., x_S], t, text, text_mask)   # x_i [C, T_i, H_i, W_i], t [S], text [S, L, D]
the samples' tokens are concatenated into ONE sequence [1, sum N_i, D] (`Packing` describes where
each lies). Each token keeps its own sample's 3D rotary positions, timestep modulation (adaLN, computed
per sample, then given to its tokens) and captions (cross-attention to its own sample's text only);
self-attention is block-diagonal: no token attends across samples (`Packing.self_attention`:
flex_attention with a block mask on GPU, one SDPA per sample elsewhere). So a packed batch computes
what the same samples do one by one (tests/test_dit.py checks loss and gradients), with no padding
between them. Returns the list of velocities [C, T_i, H_i, W_i].

The model does not know how it is parallelised: training/parallel.py shards, checkpoints and
compiles `model.blocks` from outside. For context parallelism it sets `model.context` (a
training.parallel.ContextParallel: the token axis is sharded after the patch embedding and gathered
after the final layer) and each self-attention's `attend` (attention over the sharded sequence). `flops_per_token` documents the FLOP count used for MFU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from spacetime.config import StrictModel


class DiTConfig(StrictModel):
    """Sizes of the DiT. in_channels (from the VAE) and text_dim (from the text encoder) are given at
    build time. Defaults are DiT-XL: 28 layers, hidden 1152, 16 heads."""

    hidden: int = Field(1152, gt=0)
    depth: int = Field(28, gt=0)
    heads: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) latent voxels per token
    qk_norm: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    # rotary dims per axis (t, h, w): even, summing to the head dim; None: h = w = 2 * (head_dim // 6),
    # t gets the rest (24/24/24 for a head dim of 72)
    rope_dims: tuple[int, int, int] | None = None
    timestep_dim: int = Field(256, gt=0)  # sinusoidal features of t before the timestep MLP
    eps: float = 1e-6

    @model_validator(mode="after")
    def _check(self) -> "DiTConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        if any(p <= 0 for p in self.patch):
            raise ValueError(f"patch {self.patch}: every size must be > 0")
        dims = self.axis_dims()
        if any(d % 2 or d < 0 for d in dims) or sum(dims) != self.head_dim:
            raise ValueError(f"rope_dims {dims}: need even sizes summing to the head dim {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    def axis_dims(self) -> tuple[int, int, int]:
        if self.rope_dims is not None:
            return tuple(self.rope_dims)
        s = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * s, s, s)


# ----------------------------------------------------------------------------------- helpers
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift  # x [B, N, D], shift/scale [B, 1, D]


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """[B, C, T, H, W] -> ([B, N, C*pt*ph*pw], grid (t, h, w)), N = t*h*w; axes padded at the end."""
    pt, ph, pw = patch
    b, c, t, h, w = x.shape
    x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
    gt, gh, gw = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
    x = x.reshape(b, c, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, gt, gh, gw, C, pt, ph, pw]
    return x.reshape(b, gt * gh * gw, c * pt * ph * pw), (gt, gh, gw)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int,
               size: tuple[int, int, int]) -> torch.Tensor:
    """[B, N, C*pt*ph*pw] -> [B, C, T, H, W], cropped to `size` (T, H, W)."""
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    b = x.shape[0]
    x = x.reshape(b, gt, gh, gw, channels, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    x = x.reshape(b, channels, gt * pt, gh * ph, gw * pw)  # [B, C, T_pad, H_pad, W_pad]
    return x[:, :, : size[0], : size[1], : size[2]]


def rope_3d(grid: tuple[int, int, int], dims: tuple[int, int, int], theta: float,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles of a (t, h, w) patch grid: (cos, sin), each [N, head_dim / 2], N = t*h*w in
    row-major (t, h, w) order. Axis a rotates dims[a] / 2 pairs of channels by pos_a * theta^(-2i/dims[a])."""
    parts = []
    for axis, (n, d) in enumerate(zip(grid, dims)):
        if d == 0:
            continue
        freqs = theta ** (-torch.arange(0, d, 2, device=device, dtype=torch.float64) / d)  # [d/2]
        ang = torch.arange(n, device=device, dtype=torch.float64)[:, None] * freqs  # [n, d/2]
        view = [1, 1, 1, d // 2]
        view[axis] = n
        parts.append(ang.view(view).expand(*grid, d // 2))  # [t, h, w, d/2]
    ang = torch.cat(parts, dim=-1).reshape(math.prod(grid), -1)  # [N, head_dim / 2]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x [B, heads, N, head_dim] by the angles of (cos, sin) [N, head_dim/2]."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, heads, N, head_dim/2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


# ---------------------------------------------------------------------------------- packing
_FLEX: dict = {}


def _flex(device: torch.device | None = None):
    """(flex_attention, create_block_mask), imported on first use: GPU runs (and tests) only. On CUDA
    flex_attention is compiled once (eager, it runs a reference that materialises the scores: the
    forward-only check on CPU in tests/test_dit.py uses that)."""
    cuda = device is not None and device.type == "cuda"
    if cuda not in _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _FLEX[cuda] = (torch.compile(flex_attention, dynamic=False) if cuda else flex_attention, create_block_mask)
    return _FLEX[cuda]


class Packing:
    """Where the samples of a packed sequence lie: sample i holds tokens [offsets[i], offsets[i+1]).

    `lengths` may end with a sample-less segment (the padding a context-parallel group adds): it
    attends only to itself, and its outputs are dropped. `seg` [n] is the sample of each token this
    process holds (all of them, or a context-parallel rank's share: `shard`), for the per-token
    gathers of modulation and text; a padding token maps to the last sample (its output is dropped).
    `impl`: "auto" (flex_attention on CUDA, per-sample SDPA elsewhere), "flex" or "loop".
    `prepare` builds what attention needs (block masks, or the per-sample runs) once per forward,
    outside the blocks, so that compiled blocks only read it."""

    def __init__(self, lengths: list[int], samples: int, device, impl: str = "auto"):
        self.lengths, self.samples, self.impl = list(lengths), samples, impl
        ids = torch.arange(len(self.lengths), device=device).clamp(max=samples - 1)
        self.seg = torch.repeat_interleave(ids, torch.tensor(self.lengths, device=device))
        self.flex = impl == "flex" or (impl == "auto" and torch.device(device).type == "cuda")
        self.self_mask = self.cross_mask = self.runs = None

    @classmethod
    def of(cls, lengths: list[int], device, impl: str = "auto") -> "Packing":
        return cls(lengths, len(lengths), device, impl)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def padded(self, total: int) -> "Packing":
        """The same samples in a sequence of `total` >= self.total tokens (a padding segment at the end)."""
        extra = total - self.total
        return Packing(self.lengths + ([extra] if extra else []), self.samples, self.seg.device, self.impl)

    def shard(self, seg: torch.Tensor) -> "Packing":
        """This layout, holding only the tokens whose samples `seg` names (a context-parallel share)."""
        local = Packing(self.lengths, self.samples, seg.device, self.impl)
        local.seg = seg
        return local

    def prepare(self, text_mask: torch.Tensor) -> "Packing":
        """Build the attention masks (flex) or the per-sample runs of this process's tokens (loop)
        for text of mask [S, L]."""
        samples, counts = torch.unique_consecutive(self.seg, return_counts=True)
        self.runs = (samples.tolist(), counts.tolist())
        if self.flex:
            _, make = _flex()
            device, (s, length) = self.seg.device, text_mask.shape
            doc = torch.repeat_interleave(torch.arange(len(self.lengths), device=device),
                                          torch.tensor(self.lengths, device=device))
            self.self_mask = make(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, self.total, self.total,
                                  device=device)
            seg, valid = self.seg, text_mask.reshape(-1)
            self.cross_mask = make(lambda b, h, qi, ki: (seg[qi] == ki // length) & valid[ki], None, None,
                                   len(seg), s * length, device=device)
        return self

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        """[S, ...] per sample -> [1, n, ...] per token of this process."""
        return x.index_select(0, self.seg)[None]

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block-diagonal attention over the WHOLE sequence: q, k, v [1, heads, total, hd]."""
        if not self.flex:
            parts = zip(*(x.split(self.lengths, dim=2) for x in (q, k, v)))
            return torch.cat([F.scaled_dot_product_attention(a, b, c) for a, b, c in parts], dim=2)
        return _flex(q.device)[0](q, k, v, block_mask=self.self_mask)

    def cross_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each token of q [1, heads, n, hd] (this process's) attends to its own sample's text: k, v
        [S, heads, L, hd], mask [S, L] (True: a token to attend to)."""
        if not self.flex:  # tokens are grouped by sample, in order
            samples, counts = self.runs
            return torch.cat([F.scaled_dot_product_attention(part, k[i:i + 1], v[i:i + 1], attn_mask=mask[i, None, None, None])
                              for i, part in zip(samples, q.split(counts, dim=2))], dim=2)
        s, heads, length, _ = k.shape
        flat = [x.transpose(0, 1).reshape(1, heads, s * length, -1) for x in (k, v)]  # [1, heads, S*L, hd]
        return _flex(q.device)[0](q, *flat, block_mask=self.cross_mask)


def pack_tokens(xs: list[torch.Tensor], patch: tuple[int, int, int]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """Latents [C, T_i, H_i, W_i] -> (their tokens, concatenated: [1, sum N_i, C*pt*ph*pw], each grid)."""
    tokens, grids = zip(*(patchify(x[None], patch) for x in xs))
    return torch.cat(tokens, dim=1), list(grids)


def unpack_tokens(out: torch.Tensor, grids: list, patch: tuple[int, int, int], channels: int,
                  sizes: list) -> list[torch.Tensor]:
    """[1, sum N_i, C*pt*ph*pw] -> [C, T_i, H_i, W_i] per sample (cropped to its size)."""
    parts = out.split([math.prod(g) for g in grids], dim=1)
    return [unpatchify(p, g, patch, channels, size)[0] for p, g, size in zip(parts, grids, sizes)]


# ------------------------------------------------------------------------------------ modules
class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [B, hidden]: sinusoidal features of 1000 t, then an MLP."""

    def __init__(self, hidden: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # [B, half]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: Packing | None = None) -> torch.Tensor:
    """Self-attention of [B, heads, N, hd] q, k, v: plain SDPA, or block-diagonal over a packed sequence."""
    return F.scaled_dot_product_attention(q, k, v) if pack is None else pack.self_attention(q, k, v)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.attend = attention  # replaced under context parallelism

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], pack: Packing | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each [B, heads, N, hd]
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        out = self.attend(q, k, v) if pack is None else self.attend(q, k, v, pack=pack)  # [B, heads, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.kv = nn.Linear(cfg.hidden, 2 * cfg.hidden)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, pack: Packing | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q(x).view(b, n, self.heads, -1).transpose(1, 2))  # [B, heads, N, hd]
        s = text.shape[0]  # B, or the S samples of a packed sequence
        k, v = self.kv(text).view(s, text.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # [B|S, heads, L, hd]
        if pack is None:
            out = F.scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=mask[:, None, None, :])
        else:
            out = pack.cross_attention(q, self.k_norm(k), v, mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """x + gate * SelfAttn(adaLN(x)); x + CrossAttn(LN(x), text); x + gate * MLP(adaLN(x))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, elementwise_affine=True, eps=cfg.eps)
        self.cross = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=cfg.eps)
        self.mlp = MLP(cfg.hidden, cfg.mlp_hidden)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 6 * cfg.hidden))

    def forward(self, x, c, text, mask, rope, pack: Packing | None = None):
        # x [B, N, D], c [B, D], text [B, L, D], mask [B, L]; packed: B = 1, c, text and mask per sample [S, ...]
        mod = self.modulation(c)
        mod = mod[:, None] if pack is None else pack.per_token(mod)  # [B, 1, 6D] or [1, N, 6D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope, pack)
        x = x + self.cross(self.norm2(x), text, mask, pack)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden, elementwise_affine=False, eps=cfg.eps)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.linear = nn.Linear(cfg.hidden, out)

    def forward(self, x: torch.Tensor, c: torch.Tensor, pack: Packing | None = None) -> torch.Tensor:
        mod = self.modulation(c)
        shift, scale = (mod[:, None] if pack is None else pack.per_token(mod)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # [B, N, C*pt*ph*pw]


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig, in_channels: int, text_dim: int):
        super().__init__()
        self.cfg, self.in_channels, self.text_dim = cfg, in_channels, text_dim
        patch_dim = in_channels * math.prod(cfg.patch)
        self.x_embed = nn.Linear(patch_dim, cfg.hidden)  # a Conv3d with stride = kernel = patch
        self.t_embed = TimestepEmbedder(cfg.hidden, cfg.timestep_dim)
        self.text_embed = MLP(text_dim, cfg.hidden, cfg.hidden)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg, patch_dim)
        self.context = None  # a training.parallel.ContextParallel, set from outside
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears, N(0, 0.02) timestep MLP, zero adaLN modulations and output (adaLN-Zero):
        at init every block is the identity and the model predicts 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.t_embed.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for m in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor | list[torch.Tensor], t: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor, attention: str = "auto") -> torch.Tensor | list[torch.Tensor]:
        """x [B, C, T, H, W], t [B] (noise level in [0, 1]), text [B, L, text_dim], text_mask [B, L] bool
        -> velocity [B, C, T, H, W]. Packed (module docstring): x a list of S latents [C, T_i, H_i, W_i]
        of any sizes, t [S], text [S, L, text_dim], text_mask [S, L] -> a list of S velocities.
        `attention`: a packed sequence's implementation (Packing.impl)."""
        packed = isinstance(x, (list, tuple))
        if packed:
            tokens, grids = pack_tokens(x, self.cfg.patch)  # [1, sum N_i, C*pt*ph*pw]
            pack = Packing.of([math.prod(g) for g in grids], x[0].device, attention)
            rope = tuple(torch.cat(parts) for parts in zip(*(rope_3d(g, self.cfg.axis_dims(), self.cfg.rope_theta,
                                                                       x[0].device) for g in grids)))
        else:
            size = x.shape[2:]
            tokens, grid = patchify(x, self.cfg.patch)  # [B, N, C*pt*ph*pw]
            pack = None
            rope = rope_3d(grid, self.cfg.axis_dims(), self.cfg.rope_theta, x.device)  # ([N, hd/2], [N, hd/2])
        h = self.x_embed(tokens)  # [B, N, D]
        c = self.t_embed(t)  # [B, D]
        ctx = self.text_embed(text)  # [B, L, D]
        # a caption with no valid token (none should reach here: T5 always emits </s>) would make
        # softmax over nothing NaN; let such rows attend to every (zeroed) position instead
        mask = text_mask.bool() | ~text_mask.bool().any(dim=1, keepdim=True)
        if self.context is not None:  # this rank's share of the tokens (and of their positions)
            self.context.begin(h.shape[1])
            h, rope = self.context.shard(h), tuple(self.context.shard(r, dim=0) for r in rope)
            if pack is not None:  # attention sees the whole padded sequence, per-token gathers the share
                pack = pack.padded(self.context.padded)
                pack = pack.shard(self.context.shard(pack.seg[:, None], dim=0)[:, 0])
        if pack is not None:
            pack.prepare(mask)
        for block in self.blocks:
            h = block(h, c, ctx, mask, rope, pack)
        out = self.final(h, c, pack)  # [B, N, C*pt*ph*pw]
        if self.context is not None:
            out = self.context.gather(out)
        if packed:
            return unpack_tokens(out, grids, self.cfg.patch, self.in_channels, [xi.shape[1:] for xi in x])
        return unpatchify(out, grid, self.cfg.patch, self.in_channels, size)  # [B, C, T, H, W]


# ------------------------------------------------------------------------------- FLOP counter
def forward_flops(cfg: DiTConfig, in_channels: int, text_dim: int, tokens: int, text_tokens: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of ONE forward pass on ONE sample of `tokens` latent patches
    and `text_tokens` text tokens, by part. Elementwise work (norms, activations, softmax, rotary,
    modulation arithmetic) is not counted, as in torchtitan/PaLM MFU.

        per token and block: self-attention projections 8 D^2 (qkv 6 D^2, out 2 D^2)
                             attention scores + values   4 N D  (QK^T and AV over N keys)
                             cross-attention q and out   4 D^2, scores + values 4 L D
                             MLP                         4 D M  (M = mlp_ratio D)
        per text token and block: cross-attention k, v   4 D^2
        per sample and block: adaLN modulation           12 D^2 (6 D outputs from D)
        once: patch embedding and output 2 P D per token each (P = C pt ph pw); text MLP
              2 L (text_dim D + D^2); timestep MLP 2 (timestep_dim D + D^2); final adaLN 4 D^2
    """
    d, m, n, L = cfg.hidden, cfg.mlp_hidden, tokens, text_tokens
    p = in_channels * math.prod(cfg.patch)
    per_block = {
        "self_attn_proj": n * 8 * d * d,
        "self_attn_sdpa": n * 4 * n * d,
        "cross_attn_proj": n * 4 * d * d + L * 4 * d * d,
        "cross_attn_sdpa": n * 4 * L * d,
        "mlp": n * 4 * d * m,
        "modulation": 12 * d * d,
    }
    out = {k: float(cfg.depth * v) for k, v in per_block.items()}
    out["embed_and_final"] = float(n * 2 * p * d * 2 + 2 * L * (text_dim * d + d * d)
                                   + 2 * (cfg.timestep_dim * d + d * d) + 4 * d * d)
    return out


def flops_per_token(cfg: DiTConfig, in_channels: int, text_dim: int, tokens: int, text_tokens: int) -> float:
    """TRAINING FLOPs per latent token: 3 x forward (backward = 2 x forward: gradients of inputs and
    of weights), the usual MFU convention; activation-checkpointing recomputation is NOT counted
    (model FLOPs, not hardware FLOPs). Per-sample terms are spread over the sample's `tokens`.
    MFU = flops_per_token x tokens/s / (peak FLOP/s x devices)."""
    return 3.0 * sum(forward_flops(cfg, in_channels, text_dim, tokens, text_tokens).values()) / tokens


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
