"""training.validate and the held-out split: the sources held out never reach a training batch;
validation is bit-for-bit repeatable, leaves the training stream alone, is what `spacetime eval`
reports for the same checkpoint, and is reduced over ranks (DDP, context parallelism) to the same figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spacetime.config import load_config
from tests.helpers import CONFIGS, ROOT
from tests.test_train import env  # noqa: F401  (the subprocesses' environment fixture)
from tests.test_train import assert_bitwise_equal, final_state, run_ok, torchrun_cmd, train_cmd
from tests.train_data import make_dataset
from training.data.index import held_out, read_index
from training.train_config import TrainConfig

TINY = CONFIGS / "train/tiny.yaml"
FRACTION = 0.25  # of make_dataset(videos=8, images=4)'s sources test-0..11: holds out 1, 3, 9 and 10
EVAL = (f"eval.fraction={FRACTION}", "eval.every=4", "checkpoint.every=4", "checkpoint.keep=0", "log.every=2",
        "log.progress=false")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("validate") / "data", videos=8, images=4)


def records(run: Path, key: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if key in r}


def test_held_out_sources_never_reach_a_training_batch(data):
    """The split is by source digest (the sources manifest), the same for every reader; a smaller
    fraction holds out a subset; an epoch of the training loader never yields a held-out clip."""
    from training.config import LoaderConfig
    from training.data.loader import BucketLoader

    everything = read_index([str(data)], LoaderConfig().s3)
    train = read_index([str(data)], LoaderConfig().s3, FRACTION, "train")
    val = read_index([str(data)], LoaderConfig().s3, FRACTION, "val")
    assert sorted(val.source) == ["test-1", "test-10", "test-3", "test-9"]
    assert set(train.clip_id).isdisjoint(val.clip_id) and set(train.source).isdisjoint(val.source)
    assert sorted(train.clip_id + val.clip_id) == sorted(everything.clip_id)
    smaller = read_index([str(data)], LoaderConfig().s3, 0.2, "val")
    assert 0 < len(smaller) < len(val) and set(smaller.clip_id) < set(val.clip_id)
    assert [held_out(s, FRACTION) for s in val.source] == [True] * len(val)

    cfg = load_config(TrainConfig, TINY).loader.model_copy(update={"data": [str(data)], "patch": (1, 1, 1)})
    loader = BucketLoader(cfg, holdout=FRACTION)
    seen = set()
    for batch in loader:
        seen.update(batch["clip_id"])
        if batch["stats"]["epoch"] >= 2:
            break
    assert seen and seen.isdisjoint(val.clip_id) and seen <= set(train.clip_id)


@pytest.fixture(scope="module")
def evaluated(data, env, tmp_path_factory) -> dict:
    """Two 8-step runs on the same split, validation every 4 steps and validation off, in subprocesses
    of one thread each (the same arithmetic as `spacetime eval`'s)."""
    root = tmp_path_factory.mktemp("evaluated")
    runs = {"on": root / "on", "off": root / "off"}
    runs["log"] = run_ok(train_cmd(data, runs["on"], 8, *EVAL, "eval.sample_every=4", "eval.sample_steps=4"), env)
    run_ok(train_cmd(data, runs["off"], 8, *EVAL, "eval.every=0"), env)
    return runs


def test_validation_is_logged_and_spacetime_eval_reproduces_it_bit_for_bit(evaluated, data, env):
    run = evaluated["on"]
    val = records(run, "val_loss")
    assert sorted(val) == [0, 4, 8]
    quantiles = [k for k in val[8] if k.startswith("val_loss/q")]
    assert len(quantiles) == 8 and all(k.startswith("val_loss/bucket/") for k in val[8]
                                       if "/" in k and k not in quantiles)
    assert val[8]["val_clips"] == 4  # every held-out clip fits the default eval.tokens
    heldout = json.loads((run / "heldout.json").read_text())
    assert len(heldout["held_out_clips"]) == 4 and len(heldout["evaluated"]) == 4
    for _ in range(2):  # two evaluations of the same weights: the same numbers, bit for bit
        out = subprocess.run([sys.executable, "-m", "spacetime", "eval", "--checkpoint", str(run), "--data", str(data)],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout)
        assert result["step"] == 8 and result["weights"] == "ema"
        assert {k: v for k, v in result.items() if k.startswith("val_")} == {k: v for k, v in val[8].items()
                                                                           if k != "step"}


def test_samples_are_written_beside_the_held_out_clips_they_caption(evaluated):
    import av

    run = evaluated["on"]
    heldout = json.loads((run / "heldout.json").read_text())
    for step in (4, 8):
        folder = run / "samples" / f"step-{step:07d}"
        prompts = json.loads((folder / "prompts.json").read_text())
        assert [s["clip_id"] for s in prompts["samples"]] == [c["clip_id"] for c in heldout["evaluated"][:2]]
        for k, s in enumerate(prompts["samples"]):
            assert s["prompt"] and s["seed"] == k
            for name in (s["file"], s["reference"]):
                if name.endswith(".png"):
                    assert (folder / name).stat().st_size > 0
                    continue
                with av.open(str(folder / name)) as container:
                    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
                assert frames and frames[0].shape[:2] == (s["height"], s["width"]), name
    assert not (evaluated["off"] / "samples").exists()


def test_samples_and_validation_reach_tensorboard_and_the_console(evaluated):
    """TensorBoard gets each step's samples as animated images, the sample with its reference to its
    right; the console's log lines carry the last validation loss and an ETA."""
    import io
    import re

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = evaluated["on"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "val_loss" in events.Tags()["scalars"]
    for k in range(2):
        images = events.Images(f"samples/{k:02d}")
        assert [i.step for i in images] == [4, 8]
        sample = json.loads((run / "samples" / "step-0000008" / "prompts.json").read_text())["samples"][k]
        gif = Image.open(io.BytesIO(images[-1].encoded_image_string))
        assert gif.format == "GIF" and gif.size == (2 * sample["width"], sample["height"])
        assert 0.75 * sample["frames"] < getattr(gif, "n_frames", 1) <= sample["frames"]  # a causal VAE: 4k+1
    lines = re.findall(r"step (\d+)/8 epoch (\d+) loss \S+ val_loss (\S+) .* eta (\S+)", evaluated["log"])
    assert [int(s) for s, _, _, _ in lines] == [2, 4, 6, 8] and lines[-1][3] == "0s"
    steps = records(run, "loss")
    assert [int(e) for _, e, _, _ in lines] == [steps[s]["epoch"] for s in (2, 4, 6, 8)]  # the loader's epoch
    val = records(run, "val_loss")
    assert float(lines[0][2]) == pytest.approx(val[0]["val_loss"], rel=1e-3)


def test_validation_leaves_the_training_stream_alone(evaluated):
    """A run that validates every 4 steps and draws samples from its checkpoints ends with bitwise the
    weights, EMA, optimizer state, torch RNG states and losses of one that does neither (the held-out
    split is the same)."""
    on, off = final_state(evaluated["on"]), final_state(evaluated["off"])
    for part in ("model", "ema", "optimizer"):
        assert_bitwise_equal(on[part], off[part], part)
    for rank_on, rank_off in zip(on["trainer"]["rng"], off["trainer"]["rng"]):  # python's and numpy's are unseeded
        assert_bitwise_equal({k: rank_on[k] for k in ("torch", "generator")},
                             {k: rank_off[k] for k in ("torch", "generator")}, "rng")
    learning = lambda r: {k: v for k, v in r.items() if k.startswith(("loss", "grad_norm", "lr"))}  # noqa: E731
    on_losses, off_losses = records(evaluated["on"], "loss"), records(evaluated["off"], "loss")
    assert sorted(on_losses) == sorted(off_losses) == [2, 4, 6, 8]
    assert all(learning(on_losses[s]) == learning(off_losses[s]) for s in on_losses)
    assert not records(evaluated["off"], "val_loss")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [("parallel.mode=ddp",), ("parallel.mode=fsdp",),
                                      ("parallel.mode=ddp", "parallel.context=2")], ids=["ddp", "fsdp", "context2"])
def test_validation_is_reduced_over_ranks(parallel, data, env, tmp_path):
    """Under 2 gloo ranks (clips split between them, with DDP or FSDP2, or shared by a context-parallel pair) the logged
    figure is the one `spacetime eval` computes in one process from the same checkpoint, up to the
    order of the float64 sums."""
    run = tmp_path / "run"
    run_ok(torchrun_cmd(data, run, 4, *EVAL, "loader.max_batch_size=1", *parallel), env, timeout=400)
    logged = records(run, "val_loss")[4]
    out = subprocess.run([sys.executable, "-m", "spacetime", "eval", "--checkpoint", str(run)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["val_clips"] == logged["val_clips"] == 4
    for key, value in logged.items():
        if key.startswith("val_loss"):
            assert result[key] == pytest.approx(value, rel=1e-9, abs=0), key


def test_a_vae_run_validates_reconstruction(data, tiny_models, tmp_path):
    from training.train import run_train
    from training.validate import reconstruction_metrics

    same = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    perfect = reconstruction_metrics(same, same)
    assert perfect["l1"] == 0 and perfect["psnr"] > 100 and perfect["ssim"] == pytest.approx(1.0)
    noisy = reconstruction_metrics((same + 0.2 * torch.randn_like(same)).clamp(-1, 1), same)
    assert noisy["psnr"] < 30 and noisy["ssim"] < 0.95

    cfg = load_config(TrainConfig, CONFIGS / "train/vae_tiny.yaml", [*EVAL, "eval.sample_every=4", "eval.sample_count=3"])
    run_train("vae", cfg, data, tmp_path / "vae", max_steps=4)
    val = records(tmp_path / "vae", "val_psnr")
    assert sorted(val) == [0, 4]
    assert all(0 < val[s]["val_psnr"] < 100 and 0 < val[s]["val_l1"] < 2 for s in val)
    assert any(k.startswith("val_ssim/bucket/") for k in val[4])

    # samples: held-out clips beside their reconstructions by the checkpoint's EMA weights, the same
    # figures as validation's for those clips
    import av
    import numpy as np

    from training.vae import VideoVAE
    from training.checkpoint import load_model_weights
    from training.validate import ValSet

    run = tmp_path / "vae"
    folder = run / "samples" / "step-0000004"
    written = json.loads((folder / "reconstructions.json").read_text())
    evaluated = json.loads((run / "heldout.json").read_text())["evaluated"]
    assert [s["clip_id"] for s in written["samples"]] == [c["clip_id"] for c in evaluated[:3]]
    valset = ValSet(cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"data": [str(data)]})}))
    vae = VideoVAE(cfg.vae.arch)
    load_model_weights(Path(written["checkpoint"]), vae, ema=True)
    assert Path(written["checkpoint"]).parent == run / "checkpoints"
    kinds = set()
    for k, sample in enumerate(written["samples"]):
        batch = valset.batch(valset.items[k])
        clip = vae.trim(batch["video"].float())
        with torch.no_grad():
            recon = vae.decoder(vae.posterior(clip)[0]).clamp(-1, 1)
        assert sample["psnr"] == pytest.approx(reconstruction_metrics(recon, clip)["psnr"], rel=1e-4)
        path = folder / sample["file"]
        if path.suffix == ".png":
            from PIL import Image

            pixels = np.array(Image.open(path))[None]
        else:
            with av.open(str(path)) as container:
                pixels = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        kinds.add(path.suffix)
        height, width = clip.shape[-2:]
        assert pixels.shape == (clip.shape[2], height, 2 * width, 3)
        written_pair = torch.from_numpy(pixels).permute(3, 0, 1, 2).float() / 127.5 - 1
        # left: the held-out clip, right: its reconstruction, up to 8 bits and H.264 4:2:0 (the test clips'
        # random texture loses ~0.08 of [-1, 1] to it; the untrained reconstruction is ~0.3 away)
        err = lambda a, b: float((a - b).abs().mean())  # noqa: E731
        left, right = written_pair[..., :width], written_pair[..., width:]
        assert err(left, clip[0]) < min(0.12, err(left, recon[0]) / 2)
        assert err(right, recon[0]) < min(0.12, err(right, clip[0]) / 2)
    assert kinds == {".mp4", ".png"}  # held-out videos and images alike


def test_validation_loss_falls_on_held_out_sources(data, env, tmp_path):
    """The shortened proof (benchmarks/learns.py is the full one, on real footage): 60 steps of the tiny
    DiT lower the flow loss on sources it never saw, overall and at every timestep quantile."""
    run = tmp_path / "run"
    run_ok(train_cmd(data, run, 60, f"eval.fraction={FRACTION}", "eval.every=60", "checkpoint.every=60",
                     "log.progress=false"), env)
    val = records(run, "val_loss")
    assert sorted(val) == [0, 60]
    quantiles = [k for k in val[0] if k.startswith("val_loss/q")]
    assert val[60]["val_loss"] < 0.9 * val[0]["val_loss"], (val[0]["val_loss"], val[60]["val_loss"])
    assert all(val[60][q] < val[0][q] for q in quantiles), {q: (val[0][q], val[60][q]) for q in quantiles}


def test_a_corrupt_held_out_clip_is_skipped_and_named(data, tmp_path, caplog, tiny_models, monkeypatch):
    """A held-out clip that cannot be read is logged by id and left out of the figure (weight 0); the
    others are evaluated as before."""
    from training.parallel import init_distributed
    from training.tasks import build_task, sync_loader
    from training.validate import ValSet, validate

    monkeypatch.setenv("SPACETIME_TINY_MODELS", tiny_models["root"])
    cfg = load_config(TrainConfig, TINY, [f"eval.fraction={FRACTION}", f"loader.data=[{data}]"])
    d = init_distributed(cfg.parallel.model_copy(update={"mode": "none"}))
    task = build_task("dit", cfg, tmp_path, d)
    cfg = sync_loader(cfg, *task.compression, task.patch)
    valset = ValSet(cfg)
    whole = validate(task, task.model, valset, cfg, d)
    broken = valset.items[1]
    real = valset.batch

    def batch(i):
        if i == broken:
            raise ValueError("truncated mp4")
        return real(i)

    monkeypatch.setattr(valset, "batch", batch)
    with caplog.at_level("ERROR"):
        partial = validate(task, task.model, valset, cfg, d)
    assert valset.samples.clip_id[broken] in caplog.text and "truncated mp4" in caplog.text
    assert partial["val_clips"] == whole["val_clips"] - 1 and partial["val_loss"] != whole["val_loss"]
