"""MFU of the DiT training step on a long-video bucket, bf16, one GPU; optionally beside diffusers' Wan.

    .venv/bin/python benchmarks/dit_mfu.py [--shape xl|wan1.3b] [--bucket 16x9_360p_128f] [--batch 1]
        [--steps 10] [--ac config|auto|on|off] [--compile config|on|off] [--reference wan] [--peak-tflops 989]

One training step as `spacetime train dit` takes it (training.flow.flow_loss on random latents and
text embeddings of the bucket's shape -> backward -> clip -> fused AdamW), bf16 autocast over fp32
master weights. By default it measures the DEFAULT training path of configs/train/dit_xl.yaml: its
activation-checkpointing policy (auto: the fewest blocks the bucket needs on this GPU, by
training.memory) and its compile setting (per block); --ac / --compile override them.

Shapes: `xl` is the config's DiT (28 layers, hidden 1152, 16 heads, patch 1x2x2); `wan1.3b` is
Wan2.1-1.3B's (30 layers, hidden 1536, 12 heads, FFN 8960). 16 latent channels, 4x/8x VAE, T5-XXL's
4096-d text of 120 tokens.

--reference wan runs diffusers' WanTransformer3DModel at the same shape, in the same process, with
the same step, AC and compile policy (diffusers is a benchmark-only dependency: pip install
diffusers), and prints both and the ratio of tokens/s (ours / Wan).

FLOPs per token come from training.dit.flops_per_token (3 x the forward matmul FLOPs, attention
included; recomputation under activation checkpointing is NOT counted: model FLOPs), checked in the
run against torch's FlopCounterMode on one un-checkpointed forward + backward of the bucket's
first 2 latent frames (attention through SDPA's math backend, so the counter sees its matmuls). MFU = achieved /
peak (dense bf16 of the GPU: training.metrics.PEAK_TFLOPS by device name, or --peak-tflops).

--packed also runs the packed step (loader.packing, issue #34) in the same process: samples of mixed
shapes (vertical, square, the bucket's own, one-frame images) packed into ONE sequence of about the
bucket's tokens x batch, block-diagonal attention through flex_attention (compiled, block masks),
and prints both and the ratio of MFU (packed / bucketed; goal >= 0.95). The packed FLOPs count each
sample at its own length (attention is quadratic per sample, not over the sequence).

On a machine without a GPU it runs small configs on the CPU in fp32 so the script itself is
exercised; those figures are NOT meaningful MFU and are labelled so.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from spacetime.config import load_config
from spacetime.contract import Bucket
from training.dit import DiT, DiTConfig, flops_per_token, num_params
from training.flow import FlowConfig, flow_loss, flow_loss_packed
from training.metrics import PEAK_TFLOPS, peak_tflops
from training.parallel import Dist, parallelize
from training.train_config import ParallelConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
WAN_1_3B = DiTConfig(hidden=1536, depth=30, heads=12, mlp_ratio=8960 / 1536, patch=(1, 2, 2))


def latent_shape(bucket: Bucket, channels: int, temporal: int, spatial: int) -> tuple[int, int, int, int]:
    width, height = bucket.target_size()
    return channels, 1 + (bucket.frames - 1) // temporal, math.ceil(height / spatial), math.ceil(width / spatial)


class WanAsDiT(torch.nn.Module):
    """diffusers' WanTransformer3DModel behind our DiT's call: (x, t in [0, 1], text, mask) -> velocity.
    `blocks` is its block list, so training.parallel checkpoints and compiles it like ours."""

    def __init__(self, cfg: DiTConfig, channels: int, text_dim: int):
        super().__init__()
        from diffusers import WanTransformer3DModel

        self.model = WanTransformer3DModel(
            patch_size=tuple(cfg.patch), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
            in_channels=channels, out_channels=channels, text_dim=text_dim, ffn_dim=cfg.mlp_hidden,
            num_layers=cfg.depth)
        self.blocks = self.model.blocks

    def forward(self, x, t, text, mask):
        return self.model(x, t * 1000.0, text * mask[..., None], return_dict=False)[0]


def counted_flops_per_token(model, x0, text, mask, tokens: int) -> float:
    """Training FLOPs per token as torch's FlopCounterMode counts one forward + backward, attention
    through SDPA's math backend (plain matmuls, which every counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        flow_loss(model, x0, text, mask, tokens, FlowConfig()).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (x0.shape[0] * tokens)


def packed_shapes(shape, patch, target: int) -> list[tuple[int, int, int, int]]:
    """Latent shapes (C, T, H, W) of mixed samples whose tokens add up to at most `target`: in turn a
    vertical one (the bucket's sides swapped, half its frames), a square one (a quarter of its frames),
    the bucket's own shape at a quarter of its frames, and a one-frame image, until the next would not fit."""
    c, t, h, w = shape
    forms = [(max(1, t // 2), w, h), (max(1, t // 4), h, h), (max(1, t // 4), h, w), (1, h, w)]
    out, total = [], 0
    while True:
        for f in forms:
            n = math.prod(math.ceil(k / p) for k, p in zip(f, patch))
            if total + n > target:
                return out or [(c, *forms[-1])]
            out.append((c, *f))
            total += n


def measure(name: str, model: torch.nn.Module, args, device, policy, compile_: bool, tokens: int, shape,
            dit_cfg: DiTConfig, channels: int, packed: bool = False) -> dict:
    cuda = device.type == "cuda"
    units = None
    if policy == "auto":
        from training.memory import blocks_to_checkpoint

        units = blocks_to_checkpoint(dit_cfg, num_params(model), tokens, args.batch,
                                     torch.cuda.get_device_properties(device).total_memory)
    recomputed = units if policy == "auto" else (dit_cfg.depth if policy else 0)
    torch.manual_seed(0)
    x0 = torch.randn(args.batch, *shape, device=device)
    text = torch.randn(args.batch, args.text_tokens, args.text_dim, device=device)
    mask = torch.ones(args.batch, args.text_tokens, dtype=torch.bool, device=device)
    formula = flops_per_token(dit_cfg, channels, args.text_dim, tokens, args.text_tokens)
    counted = None
    if args.count_flops:  # on the first 2 latent frames: the math backend's attention matrix stays small
        small = x0[:1, :, :2]
        n = math.prod(math.ceil(k / p) for k, p in zip(small.shape[2:], dit_cfg.patch))
        with (torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)):
            counted = (counted_flops_per_token(model, small, text[:1], mask[:1], n),
                       flops_per_token(dit_cfg, channels, args.text_dim, n, args.text_tokens))
    parallel = ParallelConfig(mode="none", activation_checkpointing=policy, compile=compile_)
    forward = parallelize(model, parallel, Dist(0, 1, 0, device, False), checkpoint_units=units)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    flow = FlowConfig()
    if packed:  # one sequence of mixed samples, about the bucketed step's tokens
        shapes = packed_shapes(shape, dit_cfg.patch, tokens * args.batch)
        x0 = [torch.randn(*sh, device=device) for sh in shapes]
        sizes = [math.prod(math.ceil(k / p) for k, p in zip(sh[1:], dit_cfg.patch)) for sh in shapes]
        text = torch.randn(len(shapes), args.text_tokens, args.text_dim, device=device)
        mask = torch.ones(len(shapes), args.text_tokens, dtype=torch.bool, device=device)
        formula = sum(flops_per_token(dit_cfg, channels, args.text_dim, n, args.text_tokens) * n for n in sizes) / sum(sizes)
        counted = None

    def step() -> None:
        with amp:
            if packed:
                loss = flow_loss_packed(forward, x0, text, mask, sizes, flow).mean()
            else:
                loss = flow_loss(forward, x0, text, mask, tokens, flow).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    step_tokens = sum(sizes) if packed else args.batch * tokens
    tokens_per_s = step_tokens / seconds
    return {"name": name, "params": num_params(model), "recomputed": recomputed, "seconds": seconds,
            "tokens_per_s": tokens_per_s, "tflops": formula * tokens_per_s / 1e12, "formula": formula,
            "counted": counted, "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "samples": len(x0) if packed else args.batch, "step_tokens": step_tokens}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/train/dit_xl.yaml")
    parser.add_argument("--shape", choices=["xl", "wan1.3b"], default="xl")
    parser.add_argument("--bucket", default="16x9_360p_128f", help="bucket name (spacetime.contract)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--ac", choices=["config", "auto", "on", "off"], default="config",
                        help="activation checkpointing (default: the config's policy)")
    parser.add_argument("--no-ac", action="store_true", help="same as --ac off")
    parser.add_argument("--compile", choices=["config", "on", "off"], default="config",
                        help="torch.compile each block (default: the config's setting)")
    parser.add_argument("--reference", choices=["none", "wan"], default="none",
                        help="also run diffusers' WanTransformer3DModel at the same shape")
    parser.add_argument("--packed", action="store_true",
                        help="also the packed step: mixed samples in one sequence (loader.packing)")
    parser.add_argument("--no-count-flops", dest="count_flops", action="store_false",
                        help="skip the FlopCounterMode check of the FLOP formula")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = load_config(TrainConfig, args.config)
    dit_cfg = cfg.dit if args.shape == "xl" else WAN_1_3B
    bucket = Bucket.parse(args.bucket)
    channels = cfg.vae.arch.latent_channels
    if not cuda:  # exercise the script; the numbers mean nothing on a CPU
        dit_cfg = DiTConfig(hidden=128, depth=2, heads=4, mlp_ratio=dit_cfg.mlp_ratio, patch=dit_cfg.patch)
        bucket, args.text_dim, args.text_tokens = Bucket("1x1", 144, 16), 64, 16
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    shape = latent_shape(bucket, channels, cfg.vae.arch.temporal_compression, cfg.vae.arch.spatial_compression)
    tokens = math.prod(math.ceil(n / p) for n, p in zip(shape[1:], dit_cfg.patch))
    ac = "off" if args.no_ac else args.ac
    policy = cfg.parallel.activation_checkpointing if ac == "config" else {"auto": "auto", "on": True, "off": False}[ac]
    compile_ = cfg.parallel.compile if args.compile == "config" else args.compile == "on"
    if not cuda:
        policy, compile_ = False, False

    models = {"spacetime DiT": lambda: DiT(dit_cfg, in_channels=channels, text_dim=args.text_dim)}
    if args.reference == "wan":
        models["diffusers Wan"] = lambda: WanAsDiT(dit_cfg, channels, args.text_dim)
    runs = [(name, build, False) for name, build in models.items()]
    if args.packed:
        runs.append(("packed DiT", models["spacetime DiT"], True))
    results = []
    for name, build, packed in runs:
        torch.manual_seed(0)
        results.append(measure(name, build().to(device), args, device, policy, compile_, tokens, shape, dit_cfg,
                               channels, packed))
        if cuda:
            torch._dynamo.reset()
            torch.cuda.empty_cache()

    peak = peak_tflops(args.peak_tflops, device)
    dev = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {dev}" + ("" if cuda else "  (no GPU: small configs in fp32, the figures are NOT meaningful)"))
    print(f"shape {args.shape}: hidden {dit_cfg.hidden}, depth {dit_cfg.depth}, heads {dit_cfg.heads}, "
          f"FFN {dit_cfg.mlp_hidden}, patch {tuple(dit_cfg.patch)}; activation checkpointing {policy}, "
          f"compile {'on' if compile_ else 'off'}")
    print(f"bucket: {bucket.name} -> latents {'x'.join(map(str, shape))}, {tokens} tokens/sample, batch {args.batch}, "
          f"text {args.text_tokens} tokens")
    print(f"{'model':15s} {'params':>8s} {'AC blocks':>9s} {'step ms':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} {'GiB':>6s} {'FLOPs/token formula / counted (2 frames)':>40s}")
    for r in results:
        mfu = f"{r['tflops'] / peak:.1%}" if cuda and peak else "-"
        check = f"{r['counted'][1] / 1e9:.4g} G / {r['counted'][0] / 1e9:.4g} G" if r["counted"] else "-"
        gib = f"{r['memory_gib']:.1f}" if r["memory_gib"] is not None else "-"
        print(f"{r['name']:15s} {r['params'] / 1e6:7.1f}M {r['recomputed']:9d} {r['seconds'] * 1e3:8.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['tflops']:8.3g} {mfu:>6s} {gib:>6s} {check:>40s}")
    if args.packed:
        p, b = results[-1], results[0]
        print(f"packed: {p['samples']} samples, {p['step_tokens']} tokens in one sequence (bucketed: {b['step_tokens']}); "
              f"TFLOP/s packed / bucketed: {p['tflops'] / b['tflops']:.3f} (goal >= 0.95 on a GPU)")
    if args.reference == "wan":
        print(f"tokens/s ours / Wan: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x "
              "(the FLOP formula is ours: Wan's own count differs by its extra norms and projections)")
    if not cuda:
        print("MFU: not reported on a CPU (no meaningful peak; run on a GPU)")
    elif not peak:
        known = ", ".join(f"{k} {v:.0f}" for k, v in PEAK_TFLOPS.items())
        print(f"MFU: no peak known for {dev} (give --peak-tflops; known GPUs: {known})")
    first = results[0]
    return {"device": dev, "tokens_per_s": first["tokens_per_s"], "tflops": first["tflops"],
            "mfu": first["tflops"] / peak if cuda and peak else None, "peak_tflops": peak, "results": results}


if __name__ == "__main__":
    main()
