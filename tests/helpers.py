"""Shared test helpers (paths, free ports, process handling, the curation runs several tests compare)."""

import shutil
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def one_torch_thread():
    """Tiny models on a loaded 2-core machine: one intra-op thread is ~50x faster than two
    contending (measured: a tiny DiT step 1.1 s vs 15 ms)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pids_alive(pids: list[int], wait_s: float = 15.0) -> list[int]:
    """Those of `pids` still running after up to `wait_s` (a SIGKILLed process can take a moment
    to be torn down on a loaded machine; zombies count as gone)."""
    import time

    import psutil

    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def start_local_ray():
    """An embedded Ray sized for a 2-core CI machine (small object store, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    return ray


# --------------------------------------------------------------------------------------------------
# Curation runs that must give the same bytes (conftest's clean_curation, and every run compared to it)
# --------------------------------------------------------------------------------------------------

# No caption stage: a VLM's sampled tokens may change with how requests are batched (engines are not
# batch-invariant), so caption text is not part of the byte-identity claim. A unit every 2 sources, so
# units are written while sources are in flight. The model actor holds half a CPU, so on a cluster it
# runs on a worker node (tiny.yaml's 0 would let it land on a CPU-less head).
CURATE_OVERRIDES = ("caption=null", "write.unit_sources=2", "filters.aesthetic.resources.num_cpus=0.5")


def curate_cmd(inputs, out, *extra) -> list[str]:
    """`spacetime curate` with tiny.yaml and CURATE_OVERRIDES; `extra` are more CLI arguments."""
    cmd = [sys.executable, "-m", "spacetime", "curate", "--config", str(CONFIGS / "curate/tiny.yaml"),
           "--output", str(out), *(a for o in CURATE_OVERRIDES for a in ("--set", o)), *extra]
    for i in inputs:
        cmd += ["--input", str(i)]
    return cmd


def run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def make_good_media(folder: Path) -> dict:
    """Synthetic sources with known shots (returned: name -> truth), a still image and real footage."""
    from spacetime.standins import testmedia as tm

    folder.mkdir(parents=True, exist_ok=True)
    truth = {
        "multishot.mp4": tm.make_multishot(folder / "multishot.mp4"),
        "portrait.mp4": tm.make_portrait_rotated(folder / "portrait.mp4", num_frames=40),
        "square.mp4": tm.make_square(folder / "square.mp4", num_frames=40),
        "still.png": tm.make_image(folder / "still.png"),
    }
    shutil.copyfile(tm.real_footage("bikes.mp4"), folder / "bikes.mp4")
    return truth


def make_media(folder: Path) -> list[str]:
    """7 small sources (4 work units of 2): synthetic and real footage, one still image."""
    from spacetime.standins import testmedia as tm

    make_good_media(folder)
    shutil.copyfile(tm.real_footage("carphone_pristine.mp4"), folder / "carphone_pristine.mp4")
    tm.make_multishot(folder / "multishot2.mp4", fps=30)
    return sorted(str(p) for p in folder.iterdir())
