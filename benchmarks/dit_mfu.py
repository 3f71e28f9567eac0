"""MFU of a DiT-XL-size model training on a long-video bucket, bf16, one GPU.

    .venv/bin/python benchmarks/dit_mfu.py [--bucket 16x9_360p_128f] [--batch 1] [--steps 10]
                                           [--ac config|auto|on|off] [--compile config|on|off] [--peak-tflops 989]

By default it measures the DEFAULT training path of the config: its activation-checkpointing
policy (dit_xl.yaml: auto, the fewest blocks the bucket needs on this GPU by training.memory) and
its compile setting; --ac / --compile override them for comparisons.

One training step as `spacetime train dit` takes it (training.flow.flow_loss on random latents and
text embeddings of the bucket's shape -> backward -> clip -> AdamW), with the model sizes of
configs/train/dit_xl.yaml (28 layers, hidden 1152, 16 heads, patch 1x2x2; 16 latent channels,
4x/8x VAE, T5-XXL's 4096-d text of 120 tokens), bf16 autocast over fp32 master weights, block-level
activation checkpointing (on by default: a 128-frame 360p bucket is 28,160 tokens per sample) and
optionally torch.compile per block, applied by training.parallel like the trainer does.

FLOPs per token come from training.dit.flops_per_token (3 x the forward matmul FLOPs, attention
included; recomputation under activation checkpointing is NOT counted: model FLOPs). Prints the
device, tokens/s, achieved TFLOP/s and MFU = achieved / peak, with the peak used (dense bf16 of the
GPU: training.metrics.PEAK_TFLOPS by device name, or --peak-tflops).

On a machine without a GPU it runs a small config on the CPU in fp32 so the script itself is
exercised; that figure is NOT a meaningful MFU and is labelled so.
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
from training.flow import FlowConfig, flow_loss
from training.parallel import Dist, parallelize
from training.metrics import PEAK_TFLOPS, peak_tflops
from training.train_config import ParallelConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def latent_shape(bucket: Bucket, channels: int, temporal: int, spatial: int) -> tuple[int, int, int, int]:
    width, height = bucket.target_size()
    return channels, 1 + (bucket.frames - 1) // temporal, math.ceil(height / spatial), math.ceil(width / spatial)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/train/dit_xl.yaml")
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
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(TrainConfig, args.config)
    dit_cfg, bucket = cfg.dit, Bucket.parse(args.bucket)
    channels = cfg.vae.arch.latent_channels
    if not cuda:  # exercise the script; the number means nothing on a CPU
        dit_cfg = DiTConfig(hidden=128, depth=2, heads=4, patch=dit_cfg.patch)
        bucket, args.text_dim, args.text_tokens = Bucket("1x1", 144, 16), 64, 16
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    c, t, h, w = latent_shape(bucket, channels, cfg.vae.arch.temporal_compression, cfg.vae.arch.spatial_compression)
    tokens = math.prod(math.ceil(n / p) for n, p in zip((t, h, w), dit_cfg.patch))

    torch.manual_seed(0)
    model = DiT(dit_cfg, in_channels=c, text_dim=args.text_dim).to(device)
    ac = "off" if args.no_ac else args.ac
    policy = cfg.parallel.activation_checkpointing if ac == "config" else {"auto": "auto", "on": True, "off": False}[ac]
    compile_ = cfg.parallel.compile if args.compile == "config" else args.compile == "on"
    if not cuda:
        policy, compile_ = False, False
    units = None
    if policy == "auto":
        from training.memory import blocks_to_checkpoint

        units = blocks_to_checkpoint(dit_cfg, num_params(model), tokens, args.batch,
                                     torch.cuda.get_device_properties(device).total_memory)
    recomputed = units if policy == "auto" else (dit_cfg.depth if policy else 0)
    parallel = ParallelConfig(mode="none", activation_checkpointing=policy, compile=compile_)
    forward = parallelize(model, parallel, Dist(0, 1, 0, device, False), checkpoint_units=units)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    x0 = torch.randn(args.batch, c, t, h, w, device=device)
    text = torch.randn(args.batch, args.text_tokens, args.text_dim, device=device)
    mask = torch.ones(args.batch, args.text_tokens, dtype=torch.bool, device=device)
    flow = FlowConfig()

    def step() -> None:
        with amp:
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

    per_token = flops_per_token(dit_cfg, c, args.text_dim, tokens, args.text_tokens)
    tokens_per_s = args.batch * tokens / seconds
    achieved = per_token * tokens_per_s / 1e12
    peak = peak_tflops(args.peak_tflops, device)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"device: {name}" + ("" if cuda else "  (no GPU: small config in fp32, the MFU figure is NOT meaningful)"))
    print(f"model: {num_params(model) / 1e6:.1f}M parameters, hidden {dit_cfg.hidden}, depth {dit_cfg.depth}, "
          f"heads {dit_cfg.heads}, patch {tuple(dit_cfg.patch)}; activation checkpointing "
          f"{policy} ({recomputed} of {dit_cfg.depth} blocks recomputed), compile {'on' if compile_ else 'off'}")
    print(f"bucket: {bucket.name} -> latents {c}x{t}x{h}x{w}, {tokens} tokens/sample, batch {args.batch}, "
          f"text {args.text_tokens} tokens")
    print(f"step: {seconds * 1e3:.1f} ms, tokens/s: {tokens_per_s:,.0f}, training FLOPs/token: {per_token / 1e9:.3g} G")
    print(f"achieved: {achieved:.3g} TFLOP/s")
    if not cuda:
        print("MFU: not reported on a CPU (no meaningful peak; run on a GPU)")
    elif peak:
        print(f"MFU: {achieved / peak:.1%} of a {peak:.0f} TFLOP/s dense bf16 peak"
              + ("" if args.peak_tflops else f" (training.metrics.PEAK_TFLOPS for {name})"))
    else:
        known = ", ".join(f"{k} {v:.0f}" for k, v in PEAK_TFLOPS.items())
        print(f"MFU: no peak known for {name} (give --peak-tflops; known GPUs: {known})")
    if cuda:
        print(f"max memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return {"device": name, "tokens_per_s": tokens_per_s, "tflops": achieved,
            "mfu": achieved / peak if peak else None, "peak_tflops": peak}


if __name__ == "__main__":
    main()
