"""training.cache: `spacetime train cache` precomputes VAE posteriors and text embeddings; training from
the cache matches training from the raw shards; a SIGKILL and a rerun, or two torchrun ranks, give
byte-identical cache shards; a cache of other models is refused; a broken clip is recorded and skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from spacetime import contract
from spacetime.config import ConfigError, load_config
from tests.helpers import CONFIGS, ROOT, free_port
from tests.train_data import make_dataset
from training.cache import folder_fingerprint
from training.checkpoint import latest_checkpoint
from training.data.latents import npy_load
from training.train_config import TrainConfig

TINY = CONFIGS / "train/tiny.yaml"
UNIT = "cache.entries_per_shard=1"  # one clip per unit: many units to kill between


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cache") / "data", videos=10, images=4)


@pytest.fixture(scope="module")
def env(tiny_models) -> dict:
    return {**os.environ, "SPACETIME_TINY_MODELS": tiny_models["root"], "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def spacetime(*args: str) -> list[str]:
    return [sys.executable, "-m", "spacetime", "train", *args, "--config", str(TINY), "--set", "log.progress=false"]


def cache_cmd(data: Path, out: Path, *sets: str) -> list[str]:
    return [*spacetime("cache", "--data", str(data), "--output", str(out)), *[x for s in sets for x in ("--set", s)]]


def run(cmd: list[str], env: dict, ok: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def files(root: Path) -> dict[str, bytes]:
    """Every file of a cache but its manifest (which names its data folder), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != contract.CACHE_MANIFEST}


@pytest.fixture(scope="module")
def straight(data, env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "cache"
    run(cache_cmd(data, out, UNIT), env)
    return out


# ---------------------------------------------------------------------------------- contents
def test_the_cache_holds_posteriors_and_embeddings_of_every_clip(data, straight):
    manifest = json.loads((straight / contract.CACHE_MANIFEST).read_text())
    assert manifest["state"] == "complete" and manifest["entries"] == 14 and manifest["errors"] == 0
    assert manifest["units"] == 14 and manifest["key"]["text_encoder"]["max_length"] == 16
    index = pq.read_table(straight / contract.CACHE_INDEX).to_pylist()
    source = pq.read_table(data / contract.INDEX_PATH).to_pylist()
    assert sorted(r["clip_id"] for r in index) == sorted(r["clip_id"] for r in source)
    assert len({r["entry"] for r in index}) == 14  # one content address per clip
    row = next(r for r in index if r["num_frames"] == 17)
    with tarfile.open(straight / row["shard"]) as tar:
        names = sorted(tar.getnames())
        member = {n.split(".", 1)[1]: tar.extractfile(n).read() for n in names}
    assert names == sorted(f"{row['key']}.{e}" for e in contract.CACHE_EXTS)
    latent, entry = npy_load(member[contract.LATENT_EXT]), contract.CacheEntry.model_validate_json(member["json"])
    # 16 frames of 16x16 (bucket 1x1_0p_16f) through 4x temporal / 8x spatial compression, 4 channels
    assert latent.shape == (2, 4, 4, 2, 2) and latent.dtype == np.float32
    assert entry.size == (16, 16) and entry.frames == 16 and entry.short_caption == entry.dense_caption.split()[-1]
    text = npy_load(member[contract.TEXT_EXT])
    assert text.shape == (entry.text_tokens, 32) and 1 < entry.text_tokens <= 16 and np.abs(text).sum() > 0
    null = npy_load((straight / contract.CACHE_NULL_TEXT).read_bytes())
    assert null.shape[1] == 32 and len(null) < entry.text_tokens


def test_steps_from_the_cache_match_steps_from_raw_shards(data, straight, env, tmp_path):
    """Same seed, posterior sampling, short captions and caption dropout: the same losses (within
    1e-5 relative: the cache encodes clips and captions in other batches than the raw step does)
    and the same weights after 8 steps. The cache holds each clip's source digest, so the same
    sources are held out, and the validation figures agree too."""
    sets = ["vae.sample_posterior=true", "loader.short_caption_prob=0.3", "loader.caption_dropout=0.2",
            "log.every=1", "checkpoint.every=8", "eval.fraction=0.25", "eval.every=4"]
    flags = [x for s in sets for x in ("--set", s)]
    runs = {}
    for name, source in (("raw", data), ("cached", straight)):
        runs[name] = tmp_path / name
        run([*spacetime("dit", "--data", str(source), "--output", str(runs[name]), "--max-steps", "8"), *flags], env)
    lines = {k: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for k, p in runs.items()}
    losses = {k: [r["loss"] for r in rs if "loss" in r] for k, rs in lines.items()}
    assert len(losses["raw"]) == 8
    np.testing.assert_allclose(losses["cached"], losses["raw"], rtol=1e-5)
    val = {k: [(r["step"], r["val_clips"], r["val_loss"]) for r in rs if "val_loss" in r] for k, rs in lines.items()}
    assert [s for s, _, _ in val["cached"]] == [s for s, _, _ in val["raw"]] == [0, 4, 8]
    assert [n for _, n, _ in val["cached"]] == [n for _, n, _ in val["raw"]] and val["raw"][0][1] > 0
    np.testing.assert_allclose([v for *_, v in val["cached"]], [v for *_, v in val["raw"]], rtol=1e-5)
    assert json.loads((runs["cached"] / "heldout.json").read_text())["held_out_clips"] == \
        json.loads((runs["raw"] / "heldout.json").read_text())["held_out_clips"]
    assert len(set(round(x, 3) for x in losses["raw"])) > 4  # the steps differ: a real comparison
    raw, cached = (load_file(latest_checkpoint(p) / "model.safetensors") for p in runs.values())
    for k in raw:
        torch.testing.assert_close(cached[k], raw[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------ exactly once, resume
def test_sigkill_and_rerun_gives_byte_identical_shards(data, straight, env, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(cache_cmd(data, out, UNIT), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    units = out / contract.CACHE_UNITS_DIR
    while proc.poll() is None and time.monotonic() < deadline and not (units.exists() and any(units.iterdir())):
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / contract.CACHE_MANIFEST).read_text())
    assert manifest["state"] == "building", "the kill came after the build finished: no resume was tested"
    done = len(list(units.iterdir()))
    assert 0 < done < 14
    rerun = run(cache_cmd(data, out, UNIT), env)
    assert f"{done} already built" in rerun.stderr
    assert files(out) == files(straight)
    assert not [p for p in out.rglob(".*") if p.name != ".work"]  # no temporary file left behind
    again = run(cache_cmd(data, out, UNIT), env)
    assert "complete and current" in again.stderr


@pytest.mark.slow
def test_two_torchrun_ranks_build_the_same_bytes_as_one_process(data, straight, env, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *cache_cmd(data, out, UNIT)[1:]]
    proc = run(cmd, env)
    assert "7 for this rank" in proc.stderr  # 14 units split between the two ranks
    assert files(out) == files(straight)


# ------------------------------------------------------------------------------ stale caches
def test_a_cache_of_other_models_is_refused_then_rebuilt_on_request(data, straight, env, tmp_path):
    out = tmp_path / "stale"
    run(cache_cmd(data, out, UNIT), env)
    other = run(cache_cmd(data, out, UNIT, "text_encoder.max_length=12"), env, ok=False)
    assert other.returncode != 0 and "text_encoder.max_length: 16 (cache) vs 12 (now)" in other.stderr
    assert "--rebuild" in other.stderr and "Traceback" not in other.stderr
    assert files(out) == files(straight)  # the refusal touched nothing
    rebuilt = run([*cache_cmd(data, out, UNIT, "text_encoder.max_length=12"), "--rebuild"], env)
    assert "14 entries" in rebuilt.stdout
    assert json.loads((out / contract.CACHE_MANIFEST).read_text())["key"]["text_encoder"]["max_length"] == 12


def test_training_refuses_a_cache_of_another_vae(straight, env, tmp_path, tiny_models, monkeypatch):
    proc = run([*spacetime("dit", "--data", str(straight), "--output", str(tmp_path / "run"), "--max-steps", "1"),
                "--set", "vae.init_seed=7"], env, ok=False)
    assert proc.returncode != 0 and "vae.fingerprint" in proc.stderr and "--rebuild" in proc.stderr
    assert "Traceback" not in proc.stderr
    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    from training.train import run_train

    with pytest.raises(ConfigError, match="latent cache: `train vae` learns from videos"):
        run_train("vae", load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml"), straight, tmp_path / "vae")


def test_the_text_encoder_fingerprint_follows_the_weights(tmp_path, tiny_models):
    folder = Path(tiny_models["text_encoder"]["path"])
    assert folder_fingerprint(folder) == folder_fingerprint(folder)
    copy = tmp_path / "te"
    copy.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    assert folder_fingerprint(copy) == folder_fingerprint(folder)
    weights = copy / "model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    from safetensors.torch import save_file

    save_file(state, weights)
    assert folder_fingerprint(copy) != folder_fingerprint(folder)


# ----------------------------------------------------------------------------------- bad input
def test_a_broken_clip_is_recorded_and_the_rest_cached(data, env, tmp_path):
    broken = tmp_path / "broken"
    index = pq.read_table(data / contract.INDEX_PATH).to_pylist()
    victim = next(r for r in index if r["num_frames"] == 17)
    by_shard: dict[str, list] = {}
    for r in index:
        by_shard.setdefault(r["shard"], []).append(r)
    for shard, rows in by_shard.items():
        samples = []
        for sample in contract.read_shard(data / shard):
            record = contract.read_record(sample)
            video = sample[contract.VIDEO_EXT]
            if record.clip_id == victim["clip_id"]:
                video = video[: len(video) // 3]
            samples.append((video, record))
        contract.write_shard(broken / shard, samples)
    pq.write_table(contract.table(index, contract.INDEX_SCHEMA), broken / contract.INDEX_PATH)
    out = tmp_path / "cache"
    proc = run(cache_cmd(broken, out), env)
    assert "13 entries" in proc.stdout and "1 clips failed" in proc.stdout
    assert f"clip {victim['clip_id']}" in proc.stderr
    manifest = json.loads((out / contract.CACHE_MANIFEST).read_text())
    assert manifest["errors"] == 1 and manifest["error_list"][0]["clip_id"] == victim["clip_id"]
    cached = {r["clip_id"] for r in pq.read_table(out / contract.CACHE_INDEX).to_pylist()}
    assert victim["clip_id"] not in cached and len(cached) == 13


def test_out_of_memory_is_no_clips_fate_the_build_fails_and_its_rerun_completes(data, straight, tiny_models,
                                                                                 tmp_path, monkeypatch):
    """An infrastructure failure (spacetime.faults) while encoding a clip is not recorded as the clip's
    error: the build stops with the cache not complete, and the rerun builds every clip, the same bytes."""
    from training.cache import _Builder, build_cache

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    cfg = load_config(TrainConfig, TINY, ["log.progress=false", UNIT])
    latent, calls = _Builder.latent, []

    def out_of_memory_on_the_fifth(self, i, reader):
        calls.append(i)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return latent(self, i, reader)

    out = tmp_path / "cache"
    monkeypatch.setattr(_Builder, "latent", out_of_memory_on_the_fifth)
    with pytest.raises(torch.OutOfMemoryError):
        build_cache(cfg, [str(data)], str(out))
    assert json.loads((out / contract.CACHE_MANIFEST).read_text())["state"] == "building"
    assert len(list((out / contract.CACHE_UNITS_DIR).glob("*.json"))) == 4  # no record of the fifth unit
    monkeypatch.setattr(_Builder, "latent", latent)
    manifest = build_cache(cfg, [str(data)], str(out))
    assert manifest["state"] == "complete" and manifest["errors"] == 0 and manifest["entries"] == 14
    assert files(out) == files(straight)


def test_training_from_the_cache_resumes_exactly(straight, env, tmp_path):
    """Stopped at step 2 and rerun to 4 = straight to 4, bitwise (loader state, RNG, optimizer)."""
    sets = ["vae.sample_posterior=true", "loader.caption_dropout=0.3", "checkpoint.every=2", "checkpoint.keep=0"]
    flags = [x for s in sets for x in ("--set", s)]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run([*spacetime("dit", "--data", str(straight), "--output", str(whole), "--max-steps", "4"), *flags], env)
    for steps in ("2", "4"):
        run([*spacetime("dit", "--data", str(straight), "--output", str(parts), "--max-steps", steps), *flags], env)
    a, b = (load_file(latest_checkpoint(p) / "model.safetensors") for p in (whole, parts))
    assert latest_checkpoint(parts).name == "step-00000004"
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------ no host syncs
# Ops whose result the host must wait for on a GPU: a Python scalar (`.item()`, `float(t)`, `bool(t)`,
# `if t:`) or an output whose size depends on the values (boolean indexing, nonzero, unique, ...).
HOST_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "masked_scatter",
                 "unique", "_unique", "_unique2", "unique_consecutive", "repeat_interleave"}


class HostSyncProbe(TorchDispatchMode):
    """Within it, every op in HOST_SYNC_OPS (and indexing by a boolean mask) is recorded in `found`, with
    where it was called from. On a CPU nothing waits, but these are the calls that would make a GPU
    step wait."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        masked = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in HOST_SYNC_OPS or masked:
            self.found.append(f"{func.__name__}:\n{''.join(traceback.format_stack(limit=8)[:-1])}")
        return func(*args, **(kwargs or {}))


def test_a_step_from_the_cache_waits_for_nothing_on_the_device(straight, tiny_models, tmp_path, monkeypatch,
                                                               torch_one_thread):
    """A DiT step from the cache (loss, backward, clipping, fused AdamW, EMA, the metrics window) has
    no host sync: nothing in it needs a value from the device before the next log step. (From raw
    shards the text encoder runs in the step, and transformers' T5 checks its padding mask on the host.)"""
    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    import training.train as train
    from training.metrics import Window

    probe = HostSyncProbe()
    with probe:  # the probe sees a planted sync: it is not blind
        torch.ones(3).sum().item()
        torch.arange(4)[torch.arange(4) > 1]
    assert len(probe.found) == 2 and probe.found[0].startswith("_local_scalar_dense"), probe.found
    probe.found.clear()

    def probed(method):
        def wrapper(*args, **kwargs):
            with probe:
                return method(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train._Trainer, "step", probed(train._Trainer.step))
    monkeypatch.setattr(Window, "add", probed(Window.add))
    cfg = load_config(TrainConfig, TINY, ["optim.fused=true", "vae.sample_posterior=true", "loader.caption_dropout=0.3",
                                          "log.progress=false", "log.every=100", "checkpoint.every=100"])
    assert train.run_train("dit", cfg, straight, tmp_path / "run", 3)["step"] == 3
    assert not probe.found, "\n".join(probe.found[:3])


# ------------------------------------------------------------------ native sizes (loader.packing)
def test_a_packed_cache_holds_native_sizes_and_trains_like_the_raw_shards(env, tmp_path):
    """`train cache --set loader.packing=true` on clips of mixed shapes: each entry at its clip's native
    size (training.data.packing), and packed DiT steps from that cache give the losses and weights of
    packed steps from the raw shards."""
    from tests.test_train import MIXED
    from training.config import LoaderConfig
    from training.data.packing import native_shape

    loader = LoaderConfig(token_budget=64, patch=(1, 1, 1))  # tiny.yaml's budget; its DiT's patch, 8x VAE
    data = make_dataset(tmp_path / "mixed", videos=6, images=3, sizes=MIXED)
    cache = tmp_path / "cache"
    run(cache_cmd(data, cache, "loader.packing=true"), env)
    manifest = json.loads((cache / contract.CACHE_MANIFEST).read_text())
    assert manifest["key"]["frames"]["native"] == {"max_tokens_per_sample": 64, "max_frames": None}
    index = pq.read_table(cache / contract.CACHE_INDEX).to_pylist()
    sizes = set()
    for row in index:
        with tarfile.open(cache / row["shard"]) as tar:
            entry = contract.CacheEntry.model_validate_json(tar.extractfile(f"{row['key']}.json").read())
            latent = npy_load(tar.extractfile(f"{row['key']}.{contract.LATENT_EXT}").read())
        frames, w, h, _ = native_shape(row["width"], row["height"], row["num_frames"],
                                       contract.Bucket.parse(row["bucket"]).frames, loader)
        assert (entry.size, entry.frames) == ((w, h), frames)
        assert latent.shape[2:] == (1 + (frames - 1) // 4, h // 8, w // 8)
        sizes.add(entry.size)
    assert len(sizes) >= len(MIXED)  # the images keep their size; the clips above 64 tokens are scaled down

    sets = ["loader.packing=true", "vae.sample_posterior=true", "loader.caption_dropout=0.2", "log.every=1",
            "checkpoint.every=6"]
    flags = [x for s in sets for x in ("--set", s)]
    runs = {name: tmp_path / name for name in ("raw", "cached")}
    for name, source in (("raw", data), ("cached", cache)):
        run([*spacetime("dit", "--data", str(source), "--output", str(runs[name]), "--max-steps", "6"), *flags], env)
    lines = {k: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for k, p in runs.items()}
    losses = {k: [r["loss"] for r in rs] for k, rs in lines.items()}
    assert len(losses["raw"]) == 6 and len(set(round(x, 3) for x in losses["raw"])) > 3
    np.testing.assert_allclose(losses["cached"], losses["raw"], rtol=1e-5)
    assert [r["padding"] for r in lines["cached"]] == [r["padding"] for r in lines["raw"]]
    raw, cached = (load_file(latest_checkpoint(p) / "model.safetensors") for p in runs.values())
    for k in raw:
        torch.testing.assert_close(cached[k], raw[k], rtol=1e-4, atol=1e-5)
    # a bucketed run refuses the packed cache (its key says how the frames were sized)
    proc = run([*spacetime("dit", "--data", str(cache), "--output", str(tmp_path / "bucketed"), "--max-steps", "1")],
               env, ok=False)
    assert proc.returncode != 0 and "frames.native" in proc.stderr
