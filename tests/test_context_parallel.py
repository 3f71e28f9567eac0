"""Context parallelism (training.parallel.ContextParallel, parallel.context): two gloo processes that
split one sample's tokens give the loss and gradients of one process holding them all, also when the
token count is not a multiple of the group (padding); `spacetime train dit` under torchrun with
parallel.context 2, with DDP and with FSDP2, follows the one-process run; mistakes are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.helpers import CONFIGS, ROOT, free_port
from tests.train_data import make_dataset
from training.checkpoint import latest_checkpoint
from training.dit import DiT, DiTConfig
from training.flow import FlowConfig, flow_loss
from training.parallel import Dist, apply_context_parallel

CFG = DiTConfig(hidden=48, depth=2, heads=4, patch=(1, 1, 1))
SHAPE = (2, 4, 3, 3, 3)  # [B, C, T, H, W]: 27 tokens, not a multiple of 2


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(SHAPE, generator=g)
    text = torch.randn(SHAPE[0], 5, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return x0, text, mask


# A packed sequence: samples of other sizes, 12 + 27 + 4 = 43 tokens (padded to 44 on 2 ranks), the
# middle sample split across the ranks.
PACKED = [(1, 3, 4), (3, 3, 3), (1, 2, 2)]


def loss_and_grads(model: DiT, packed: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """The flow loss of a fixed batch (noise and timesteps from a fixed generator) and its gradients."""
    from training.flow import flow_loss_packed

    x0, text, mask = _inputs()
    if packed:
        g = torch.Generator().manual_seed(3)
        x0 = [torch.randn(4, *shape, generator=g) for shape in PACKED]
        text, mask = torch.cat([text, text[:1]]), torch.cat([mask, mask[1:]])
        loss = flow_loss_packed(model, x0, text, mask, [27] * 3, FlowConfig(), torch.Generator().manual_seed(2)).mean()
    else:
        loss = flow_loss(model, x0, text, mask, 27, FlowConfig(), torch.Generator().manual_seed(2)).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _model() -> DiT:
    torch.manual_seed(0)
    model = DiT(CFG, in_channels=4, text_dim=16)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: perturb, so attention matters
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _worker(rank: int, world: int, port: int, out: str, packed: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        model = _model()
        apply_context_parallel(model, Dist(rank, world, 0, torch.device("cpu"), False, world, group))
        loss, grads = loss_and_grads(model, packed)
        for g in grads.values():  # what DDP / FSDP2 do: the mean over the world
            dist.all_reduce(g)
            g /= world
        torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_two_ranks_give_the_loss_and_gradients_of_one(tmp_path, packed):
    """Also for a packed sequence of samples of other sizes (loader.packing): the sample boundaries hold
    across the ranks' shares (Ulysses gathers the whole sequence per head group)."""
    torch.set_num_threads(1)
    loss, grads = loss_and_grads(_model(), packed)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), packed), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(loss, rel=1e-6)
        assert set(got["grads"]) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    attn = grads["blocks.0.attn.qkv.weight"]
    assert attn.abs().sum() > 0  # attention (the part that communicates) has a gradient to compare


def test_a_context_that_does_not_divide_the_heads_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="does not divide the DiT's 4 heads"):
        apply_context_parallel(model, Dist(0, 3, 0, torch.device("cpu"), False, 3, None))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-packed"])
def test_torchrun_with_context_2_trains_like_one_process(tmp_path, tiny_models, mode):
    """fsdp-packed: loader.packing on clips of mixed shapes, each packed sequence's tokens split over
    the 2 ranks of the group."""
    from tests.test_train import MIXED

    packed = mode.endswith("-packed")
    mode = mode.removesuffix("-packed")
    data = make_dataset(tmp_path / "data", **(dict(videos=6, images=3, sizes=MIXED) if packed else {}))
    env = {**os.environ, "SPACETIME_TINY_MODELS": tiny_models["root"], "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = ["-m", "spacetime", "train", "dit", "--config", str(CONFIGS / "train/tiny.yaml"), "--data", str(data),
            "--max-steps", "6", "--set", "log.progress=false", "--set", "log.every=1", "--set", "checkpoint.every=6",
            *(["--set", "loader.packing=true"] if packed else [])]
    runs = {"one": [sys.executable, *args], "cp2": [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), *args[1:], "--set", "parallel.context=2", "--set", f"parallel.mode={mode}"]}
    for name, cmd in runs.items():
        proc = subprocess.run([*cmd, "--output", str(tmp_path / name)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    records = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in runs}
    losses = {n: [r["loss"] for r in rs] for n, rs in records.items()}
    assert len(losses["one"]) == 6
    # measured: bitwise equal on this machine; the tolerance covers summation orders elsewhere
    np.testing.assert_allclose(losses["cp2"], losses["one"], rtol=1e-5)
    one = load_file(latest_checkpoint(tmp_path / "one") / "model.safetensors")
    cp2 = model_weights(latest_checkpoint(tmp_path / "cp2"))  # FSDP2: a sharded checkpoint
    for k in one:
        torch.testing.assert_close(cp2[k], one[k], rtol=1e-4, atol=1e-6)
    # one group of 2 ranks reads ONE batch stream: the same samples per step as the single process
    assert [r.get("tokens_per_s", 0) > 0 for r in records["cp2"]] == [True] * 6
    if packed:
        assert [r["padding"] for r in records["cp2"]] == [r["padding"] for r in records["one"]]


def model_weights(ckpt) -> dict:
    from training.checkpoint import load_model_weights

    args = json.loads((ckpt / "meta.json").read_text())["model_args"]
    model = DiT(DiTConfig.model_validate(args["dit"]), args["in_channels"], args["text_dim"])
    load_model_weights(ckpt, model, ema=False)
    return model.state_dict()


def test_a_context_that_does_not_divide_the_world_is_refused(tmp_path, tiny_models):
    env = {**os.environ, "SPACETIME_TINY_MODELS": tiny_models["root"], "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "WORLD_SIZE": "1"}
    data = make_dataset(tmp_path / "data", videos=2, images=0)
    proc = subprocess.run([sys.executable, "-m", "spacetime", "train", "dit", "--config", str(CONFIGS / "train/tiny.yaml"),
                           "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps", "1",
                           "--set", "parallel.context=2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "parallel.context 2 does not divide the 1 processes" in proc.stderr
    assert "Traceback" not in proc.stderr
