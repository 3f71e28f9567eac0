"""training.train: a real SIGKILL mid-run and a rerun give bitwise the parameters of an uninterrupted
run; checkpoints and metrics hold what they promise; two-process gloo runs under torchrun with DDP
and with FSDP2 train, checkpoint, resume, and agree with each other; config mistakes are errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spacetime.config import ConfigError, load_config
from tests.helpers import CONFIGS, ROOT, free_port
from tests.train_data import make_dataset
from training.checkpoint import latest_checkpoint, list_checkpoints
from training.train_config import TrainConfig

TINY = CONFIGS / "train/tiny.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("train") / "data")


@pytest.fixture(scope="module")
def env(tiny_models) -> dict:
    """Subprocess environment: the test session's tiny models, one thread per process (tiny models on a
    loaded 2-core machine), offline."""
    return {**os.environ, "SPACETIME_TINY_MODELS": tiny_models["root"], "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train_cmd(data: Path, run: Path, steps: int, *overrides: str) -> list[str]:
    sets = [x for o in ("log.progress=false", *overrides) for x in ("--set", o)]
    return [sys.executable, "-m", "spacetime", "train", "dit", "--config", str(TINY), "--data", str(data),
            "--output", str(run), "--max-steps", str(steps), *sets]


def torchrun_cmd(data: Path, run: Path, steps: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *train_cmd(data, run, steps, *overrides)[1:]]


def run_ok(cmd: list[str], env: dict, timeout: float = 240) -> str:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def final_state(run: Path) -> dict:
    ckpt = latest_checkpoint(run)
    return {"model": load_file(ckpt / "model.safetensors"), "ema": load_file(ckpt / "ema.safetensors"),
            "optimizer": torch.load(ckpt / "optimizer.pt", weights_only=False),
            "trainer": torch.load(ckpt / "trainer.pt", weights_only=False), "dir": ckpt}


def assert_bitwise_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


STEPS, EVERY = 16, 4
OVERRIDES = (f"checkpoint.every={EVERY}", "checkpoint.keep=0", "log.every=2")


@pytest.fixture(scope="module")
def straight(data, tiny_models, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (one thread, like the subprocesses: same arithmetic)."""
    from training.train import run_train

    run = tmp_path_factory.mktemp("straight") / "run"
    cfg = load_config(TrainConfig, TINY, ["log.progress=false", *OVERRIDES])
    threads, tiny_env = torch.get_num_threads(), os.environ.get("SPACETIME_TINY_MODELS")
    os.environ["SPACETIME_TINY_MODELS"] = tiny_models["root"]
    torch.set_num_threads(1)
    try:
        assert run_train("dit", cfg, data, run, max_steps=STEPS)["step"] == STEPS
    finally:
        torch.set_num_threads(threads)
        if tiny_env is None:
            os.environ.pop("SPACETIME_TINY_MODELS")
        else:
            os.environ["SPACETIME_TINY_MODELS"] = tiny_env
    return run


# ------------------------------------------------------------------------------------- resume
def test_sigkill_and_rerun_is_bitwise_an_uninterrupted_run(data, env, straight, tmp_path):
    run = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w+")
    proc = subprocess.Popen(train_cmd(data, run, STEPS, *OVERRIDES), env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list_checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the first checkpoint is written: kill the run in its stride
    proc.wait()
    log.seek(0)
    stderr = log.read()
    log.close()
    killed_at = [int(p.name.split("-")[1]) for p in list_checkpoints(run)]
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert killed_at and max(killed_at) < STEPS  # killed mid-run, after a checkpoint

    out = run_ok(train_cmd(data, run, STEPS, *OVERRIDES), env)
    assert f"resumed from {latest_checkpoint(run).parent / f'step-{max(killed_at):08d}'}" in out
    resumed, uninterrupted = final_state(run), final_state(straight)
    assert resumed["trainer"]["step"] == uninterrupted["trainer"]["step"] == STEPS
    for part in ("model", "ema", "optimizer"):
        assert_bitwise_equal(resumed[part], uninterrupted[part], part)
    assert resumed["trainer"]["loader"] == uninterrupted["trainer"]["loader"]
    assert_bitwise_equal(resumed["trainer"]["rng"][0]["generator"], uninterrupted["trainer"]["rng"][0]["generator"])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, STEPS + 1, 2))  # records of the killed stride replaced, none twice


def test_checkpoint_and_metrics_hold_everything(straight):
    ckpt = latest_checkpoint(straight)
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "ema.safetensors", "optimizer.pt",
                                                "trainer.pt", "meta.json"}
    assert [p.name for p in list_checkpoints(straight)] == [f"step-{s:08d}" for s in range(EVERY, STEPS + 1, EVERY)]
    assert not list((straight / "checkpoints").glob(".*"))  # no temp folders left
    trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert trainer["step"] == STEPS and trainer["scheduler"]["last_epoch"] == STEPS
    assert {"seed", "epoch", "step", "cursors", "dataset"} <= set(trainer["loader"])
    assert {"python", "numpy", "torch", "generator"} <= set(trainer["rng"][0])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kind"] == "dit" and meta["model_args"]["in_channels"] == 4 and meta["model_args"]["text_dim"] == 32
    assert meta["vae"]["untrained"] and (straight / "vae" / "model.safetensors").exists()
    optim = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert set(optim["state"]) == set(load_file(ckpt / "model.safetensors"))  # keyed by parameter name
    ema, model = load_file(ckpt / "ema.safetensors"), load_file(ckpt / "model.safetensors")
    assert set(ema) == set(model) and any(not torch.equal(ema[k], model[k]) for k in model)

    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "tflops_per_device", "mfu", "loader_wait_s",
                "loader_wait_fraction", "step_s"):
        assert key in last, key
    assert last["mfu"] is None  # no peak FLOP/s on CPU: MFU is not reported
    buckets = {k for r in records for k in r if k.startswith("loss/")}
    assert buckets == {"loss/1x1_0p_16f", "loss/1x1_0p_1f"}  # per bucket: videos and images
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in records)
    assert (straight / "config.yaml").exists()


# ------------------------------------------------------------------------ gradient accumulation
class _Regression:
    """A deterministic task (least squares of a linear model): accumulation is checked on exact math."""

    kind, compression, patch = "toy", (1, 1), (1, 1, 1)

    def __init__(self):
        self.model = torch.nn.Linear(3, 2)

    def loss(self, forward_model, batch, generator, amp):
        return (forward_model(batch["x"]) - batch["y"]).square().mean(), {"abs": batch["x"].abs().mean()}, len(batch["x"])

    def flops(self, tokens):
        return None


def test_accumulated_batches_make_the_step_of_their_union():
    from training.parallel import Dist
    from training.train import _Trainer

    cfg = load_config(TrainConfig, TINY, ["optim.warmup_steps=0", "optim.lr=0.1", "parallel.mode=none"])
    d = Dist(0, 1, 0, torch.device("cpu"), False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    trainers = []
    for _ in range(2):
        torch.manual_seed(3)
        trainers.append(_Trainer(_Regression(), cfg, d))
    whole, parts = trainers
    for _ in range(3):
        lw, pw, tw, nw, _ = whole.step([{"x": x, "y": y}])
        la, pa, ta, na, each = parts.step([{"x": x[:2], "y": y[:2]}, {"x": x[2:], "y": y[2:]}])
        assert len(each) == 2 and ta == tw == 4
        torch.testing.assert_close(la, lw)  # equal halves: the mean of the means is the mean
        torch.testing.assert_close(na, nw)
        torch.testing.assert_close(pa["abs"], pw["abs"])
    for a, b in zip(whole.model.parameters(), parts.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(whole.model.weight, _Regression().model.weight)


def test_grad_accum_consumes_that_many_loader_batches_per_step(data, env, tmp_path):
    run = tmp_path / "accum"
    run_ok(train_cmd(data, run, 4, "optim.grad_accum=2", "log.every=1", "checkpoint.every=4"), env)
    trainer = torch.load(latest_checkpoint(run) / "trainer.pt", weights_only=False)
    # 3 loader batches per epoch (2 of videos, 1 of images): 4 steps x 2 batches = epoch 2, step 2
    assert trainer["step"] == 4 and (trainer["loader"]["epoch"], trainer["loader"]["step"]) == (2, 2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["loss"] > 0 for r in records)


# -------------------------------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def two_process_runs(data, env, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    common = ("checkpoint.every=2", "checkpoint.keep=0", "log.every=1", "loader.max_batch_size=1")
    runs = {}
    for mode in ("ddp", "fsdp"):
        runs[mode] = root / mode
        runs[f"{mode}_out"] = run_ok(torchrun_cmd(data, runs[mode], 4, f"parallel.mode={mode}", *common), env)
    runs["fsdp_resumed_out"] = run_ok(torchrun_cmd(data, runs["fsdp"], 6, "parallel.mode=fsdp", *common), env)
    return runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_and_checkpoint(two_process_runs, mode):
    run = two_process_runs[mode]
    meta = json.loads((latest_checkpoint(run) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["parallel"]["mode"] == mode
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    loader = torch.load(latest_checkpoint(run) / "trainer.pt", weights_only=False)["loader"]
    assert loader["world_size"] == 2 and len(torch.load(latest_checkpoint(run) / "trainer.pt",
                                                        weights_only=False)["rng"]) == 2  # both ranks' RNG


def model_weights(ckpt: Path, ema: bool = False) -> dict:
    """A checkpoint's weights in one process, from either format (sharded ones through DCP)."""
    from training.checkpoint import load_model_weights
    from training.dit import DiT, DiTConfig

    args = json.loads((ckpt / "meta.json").read_text())["model_args"]
    model = DiT(DiTConfig.model_validate(args["dit"]), args["in_channels"], args["text_dim"])
    load_model_weights(ckpt, model, ema=ema)
    return model.state_dict()


def test_fsdp_matches_ddp_and_resumes(two_process_runs):
    """Same data split and per-rank noise: FSDP2's sharded steps equal DDP's up to reduction order
    (measured: 3e-8 apart after 4 steps); rerunning with --max-steps 6 resumes the sharded run. FSDP2
    checkpoints are sharded (DCP: each rank wrote its shards), read here by one process."""
    ddp = load_file(list_checkpoints(two_process_runs["ddp"])[-1] / "model.safetensors")
    sharded = two_process_runs["fsdp"] / "checkpoints/step-00000004"
    assert json.loads((sharded / "meta.json").read_text())["format"] == "sharded"
    assert not (sharded / "model.safetensors").exists() and len(list((sharded / "state").glob("*.distcp"))) == 2
    fsdp = model_weights(sharded)
    assert set(ddp) == set(fsdp)
    for k in ddp:
        assert torch.allclose(ddp[k], fsdp[k], atol=1e-5, rtol=1e-4), k
    assert [p.name for p in list_checkpoints(two_process_runs["fsdp"])][-1] == "step-00000006"
    assert "resumed from" in two_process_runs["fsdp_resumed_out"]
    steps = [json.loads(line)["step"] for line in (two_process_runs["fsdp"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_sharded_checkpoint_resumes_on_another_world_size(two_process_runs, data, env, tmp_path):
    """The 2-rank FSDP2 run's step-4 checkpoint continues in ONE process: DCP reshards model,
    optimizer and EMA (the data order continues from the loader state; noise is reseeded)."""
    import shutil

    run = tmp_path / "one"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_process_runs["fsdp"] / "checkpoints/step-00000004", run / "checkpoints/step-00000004")
    out = run_ok(train_cmd(data, run, 5, "parallel.mode=fsdp", "checkpoint.every=1", "loader.max_batch_size=1"), env)
    assert "resumed from" in out and "written by 2 processes, this run has 1" in out
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-00000005" and json.loads((ckpt / "meta.json").read_text())["format"] == "full"
    optim = torch.load(ckpt / "optimizer.pt", weights_only=False)
    steps = {int(v["step"]) for v in optim["state"].values()}
    assert steps == {5}  # AdamW's moments came from the sharded checkpoint (4 steps) + 1
    before, after = model_weights(run / "checkpoints/step-00000004"), load_file(ckpt / "model.safetensors")
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(torch.allclose(before[k], after[k], atol=0.05) for k in before)  # one more small step
    ema = model_weights(run / "checkpoints/step-00000004", ema=True)
    assert any(not torch.equal(ema[k], before[k]) for k in before)  # the EMA is its own tensors


def test_activation_checkpointing_is_applied_from_outside_and_changes_no_result():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from training.dit import DiT, DiTConfig
    from training.parallel import Dist, parallelize
    from training.train_config import ParallelConfig

    def grads(ac, units=None):
        torch.manual_seed(0)
        model = DiT(DiTConfig(hidden=32, depth=2, heads=2), in_channels=4, text_dim=8)
        forward = parallelize(model, ParallelConfig(mode="none", activation_checkpointing=ac),
                              Dist(0, 1, 0, torch.device("cpu"), False), checkpoint_units=units)
        x, text = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 3, 8)
        forward(x, torch.rand(2), text, torch.ones(2, 3, dtype=torch.bool)).square().mean().backward()
        return model, {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}

    plain, g_plain = grads(False)
    wrapped, g_ac = grads(True)
    assert type(wrapped.blocks[0]).__name__ == "CheckpointWrapper" and type(plain.blocks[0]).__name__ == "DiTBlock"
    assert set(get_model_state_dict(wrapped)) == set(plain.state_dict())  # checkpoints keep the model's names
    assert_bitwise_equal(g_ac, g_plain)
    partial, g_partial = grads("auto", units=1)  # what the planner asks for: the first block only
    assert [type(b).__name__ for b in partial.blocks] == ["CheckpointWrapper", "DiTBlock"]
    assert_bitwise_equal(g_partial, g_plain)
    none, _ = grads("auto", units=0)
    assert [type(b).__name__ for b in none.blocks] == ["DiTBlock", "DiTBlock"]


# ------------------------------------------------------------------------------------- config
def test_config_mistakes_are_errors_that_name_the_key(data, tmp_path, tiny_models, monkeypatch):
    from training.train import run_train

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    with pytest.raises(ConfigError, match="dit.hiddn"):
        load_config(TrainConfig, TINY, ["dit.hiddn=32"])
    with pytest.raises(ConfigError, match="multiple of heads"):
        load_config(TrainConfig, TINY, ["dit.hidden=30"])
    cfg = load_config(TrainConfig, TINY, ["loader.patch=[1,2,2]"])
    with pytest.raises(ConfigError, match="loader.patch"):  # the loader's token math must follow the DiT
        run_train("dit", cfg, data, tmp_path / "a", max_steps=1)
    cfg = load_config(TrainConfig, TINY, ["vae.untrained=false"])
    with pytest.raises(ConfigError, match="vae.untrained: true"):
        run_train("dit", cfg, data, tmp_path / "b", max_steps=1)
    for path in sorted((CONFIGS / "train").glob("*.yaml")):  # every shipped profile validates
        load_config(TrainConfig, path)
    assert len(list((CONFIGS / "train").glob("*.yaml"))) >= 4


# ------------------------------------------------------------------------- packing (native size)
MIXED = [(32, 32), (48, 32), (32, 48), (64, 32), (40, 24)]  # square, 3:2, vertical, 2:1, 5:3


def test_packed_training_logs_padding_and_resumes_bitwise(tiny_models, tmp_path, monkeypatch):
    """`train dit --set loader.packing=true` on clips of mixed shapes and images: steps take packed
    sequences (metrics log the padding fraction), and a run stopped at a checkpoint and rerun to the
    end is bitwise the uninterrupted one (model, EMA, optimizer, loader state)."""
    from training.train import run_train

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    data = make_dataset(tmp_path / "mixed", videos=6, images=3, sizes=MIXED)
    cfg = load_config(TrainConfig, TINY, ["log.progress=false", "loader.packing=true", "log.every=1",
                                          "checkpoint.every=3", "checkpoint.keep=0"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train("dit", cfg, data, tmp_path / "straight", max_steps=6)
        run_train("dit", cfg, data, tmp_path / "stopped", max_steps=3)
        assert run_train("dit", cfg, data, tmp_path / "stopped", max_steps=6)["resumed_from"] == 3
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(0 <= r["padding"] < 1 for r in records)
    assert all("loss/packed" in r for r in records) and not any(k.startswith("loss/1x1") for r in records for k in r)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "stopped")
    for part in ("model", "ema", "optimizer"):
        assert_bitwise_equal(a[part], b[part], part)
    assert a["trainer"]["loader"] == b["trainer"]["loader"] and "sequences" in a["trainer"]["loader"]["cursors"]


def test_packing_is_refused_where_it_does_not_apply(tiny_models, tmp_path, monkeypatch):
    from training.train import run_train

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    data = make_dataset(tmp_path / "mixed", videos=2, images=1, sizes=MIXED)
    cfg = load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", ["log.progress=false", "loader.packing=true"])
    with pytest.raises(ConfigError, match="loader.packing is for `train dit`"):
        run_train("vae", cfg, data, tmp_path / "vae", max_steps=1)
    with pytest.raises(ValueError, match="max_tokens_per_sample 100 > token_budget 64"):
        load_config(TrainConfig, TINY, ["loader.packing=true", "loader.max_tokens_per_sample=100"])
