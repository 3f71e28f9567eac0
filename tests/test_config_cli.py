"""Typed configs reject unknown keys by name; --set and --print-config work on the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spacetime.config import ConfigError, load_config
from curation.settings import CurateConfig

ROOT = Path(__file__).resolve().parent.parent


def spacetime(*args, check=True):
    return subprocess.run([sys.executable, "-m", "spacetime", *args], capture_output=True, text=True,
                          cwd=ROOT, check=check)


def test_misspelt_key_is_named(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("split:\n  max_duraton: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(CurateConfig, cfg)
    assert "split.max_duraton" in str(err.value) and str(cfg) in str(err.value)


def test_overrides_are_typed_and_validated():
    cfg = load_config(CurateConfig, ROOT / "configs/curate/tiny.yaml", ["split.max_duration=3.5", "analyze.dissolve=false"])
    assert cfg.split.max_duration == 3.5 and cfg.analyze.dissolve is False
    with pytest.raises(ConfigError, match="analyze.heigth"):
        load_config(CurateConfig, None, ["analyze.heigth=10"])
    with pytest.raises(ConfigError, match="split.min_duration"):
        load_config(CurateConfig, None, ["split.min_duration=abc"])


def test_a_stage_without_a_model_takes_task_resources_only():
    """Such stages run as Ray tasks: an actor-pool key there is a config error, not silently ignored."""
    with pytest.raises(ConfigError, match="analyze.resources.actors"):
        load_config(CurateConfig, None, ["analyze.resources.actors=4"])
    cfg = load_config(CurateConfig, None, ["filters.aesthetic.resources.max_actors=3", "extract.resources.num_cpus=2"])
    assert cfg.filters.aesthetic.resources.max_actors == 3 and cfg.extract.resources.num_cpus == 2
    with pytest.raises(ConfigError, match="max_actors"):
        load_config(CurateConfig, None, ["filters.aesthetic.resources.max_actors=0"])


def test_all_shipped_configs_validate():
    for path in sorted((ROOT / "configs/curate").glob("*.yaml")):
        load_config(CurateConfig, path)


def test_cli_help_lists_subcommands():
    out = spacetime("--help").stdout
    for name in ("version", "models", "samples", "curate"):
        assert name in out
    assert "--set" in spacetime("curate", "--help").stdout


def test_cli_print_config_and_bad_key():
    out = spacetime("curate", "--config", "configs/curate/tiny.yaml", "--set", "split.max_duration=7", "--print-config")
    assert yaml.safe_load(out.stdout)["split"]["max_duration"] == 7
    bad = spacetime("curate", "--set", "splitt.max_duration=7", "--print-config", check=False)
    assert bad.returncode == 2 and "splitt" in bad.stderr


def test_version():
    assert spacetime("version").stdout.startswith("spacetime ")


def test_real_model_profile_fails_early_offline(tmp_path):
    """configs/curate/default.yaml names real weights on the hub; offline it must stop before any
    work, naming the model and the offline profile."""
    import os

    (tmp_path / "in").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "spacetime", "curate", "--input", str(ROOT / "configs"),
                          "--set", "sources.extensions=[.yaml]", "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "improved-aesthetic-predictor" in out.stderr and "configs/curate/tiny.yaml" in out.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreachable_s3_output_is_a_clear_error_not_a_local_folder(tmp_path):
    from tests.helpers import free_port

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_bytes(b"x")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = subprocess.run([sys.executable, "-m", "spacetime", "curate", "--config", str(ROOT / "configs/curate/tiny.yaml"),
                          "--input", str(tmp_path / "in"), "--output", "s3://bucket/prefix",
                          "--set", f"sources.s3.endpoint={endpoint}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "s3://bucket/prefix" in out.stderr and "connect" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "s3:").exists()


def test_help_imports_no_heavy_library_or_wing_internals():
    """`spacetime --help` stays instant: building the parser loads no torch, Ray, vLLM, PyAV or model code."""
    code = ("import sys; from spacetime.cli import build_parser; build_parser().format_help(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'vllm', 'av', 'open_clip', "
            "'transformers', 'cv2'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_the_process_entry_point_exits_without_a_final_collection():
    """`spacetime` and `python -m spacetime` run `entry`: the command's result, then gc.freeze(), so the
    interpreter's exit skips its garbage-collection passes over everything imported (#12's tail);
    `main`, which tests call in-process, does not freeze."""
    code = ("import gc, sys; from spacetime import cli; "
            "sys.argv = ['spacetime', 'version']; m = cli.main(sys.argv[1:]); "
            "before = gc.get_freeze_count(); e = cli.entry(); print(m, e, before, gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-4:] == ["0", "0", "0", "True"], out.stdout[-500:] + out.stderr[-2000:]
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'spacetime = "spacetime.cli:entry"' in scripts
    assert "sys.exit(entry())" in (ROOT / "spacetime/__main__.py").read_text()


@pytest.mark.parametrize("argv", [
    ["train", "dit", "--config", "configs/train/tiny.yaml", "--output", "{tmp}/run", "--set", "loader.data=[{missing}]"],
    ["sample", "--checkpoint", "{missing}", "--prompt", "a cat", "--out", "{tmp}/x.mp4"],
    ["eval", "--checkpoint", "{missing}"],
    ["inspect", "{missing}"],
    ["caption", "--input", "{missing}", "--output", "{tmp}/captions"],
    ["review", "{missing}", "export", "--to", "{tmp}/tasks.json"],
], ids=lambda argv: argv[0])
def test_a_missing_input_is_one_line_naming_it_not_a_traceback(argv, tmp_path, tiny_models, capsys, caplog):
    """Each command given a path that is not there exits 2 with `spacetime: <path>: ...` and what the
    path should be, on one line (spacetime.errors.MissingInput), and writes nothing. `train` says so
    before it builds its models (tiny.yaml's untrained VAE warns when it is built)."""
    import logging

    from spacetime.cli import main

    caplog.set_level(logging.INFO)

    missing = tmp_path / "not-here"
    code = main([a.format(tmp=tmp_path, missing=missing) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    [line] = [x for x in err.splitlines() if x.startswith("spacetime")]
    assert line.startswith(f"spacetime: {missing}") and "Traceback" not in err, err
    assert "spacetime curate" in line or "checkpoint" in line  # what it should have been
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["run"])  # a run folder at most, nothing in it
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*.pt"))
    assert not [r for r in caplog.records if r.name == "training.tasks"]  # no model was built


def test_inputs_without_a_video_are_one_line_naming_them(tmp_path, capsys):
    """A folder with no file of a video or image extension: exit 2 naming the input and the extensions,
    before any output is created (no lease, no Ray)."""
    from spacetime.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("not a video")
    code = main(["curate", "--config", str(ROOT / "configs/curate/tiny.yaml"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("spacetime")]
    assert line.startswith(f"spacetime: --input {tmp_path / 'in'}: no video") and ".mp4" in line
    assert not (tmp_path / "out").exists()
