"""Children die with their owner (spacetime.lifeline), down to grandchildren, however they were started.

An owner process (a fresh interpreter, in its own session) starts children, is SIGKILLed, and no
process it started may remain: first with plain `sleep` children (fork, multiprocessing spawn and
fork, subprocess, a grandchild), then with the real vLLM engine that captioner.engines builds (its
engine core is spawned: vLLM forces spawn on CPU and in Ray actors). The same plain run without the
lifeline leaves orphans, which shows the check can fail.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import ROOT, pids_alive

GONE_WITHIN_S = 10.0

# Owner of plain children. argv[1] "on" starts them inside lifeline.bound(), "off" without it.
# Prints one READY line: {"bound": [pids that must die with it], "free": [pids that must not],
# "thread_child_rc": exit signal of a child whose starting thread exited}.
_PLAIN_OWNER = r'''
import json, multiprocessing as mp, os, subprocess, sys, threading, time
from contextlib import nullcontext
from spacetime import lifeline

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
UP_AND_SLEEP = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]


def spawned(queue):  # a spawned child that starts a grandchild (vLLM's engine core -> its workers)
    queue.put(subprocess.Popen(SLEEP).pid)
    time.sleep(600)


def main():
    on = sys.argv[1] == "on"
    pids = []
    with lifeline.bound() if on else nullcontext():
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        pids.append(pid)
        spawn = mp.get_context("spawn")
        queue = spawn.SimpleQueue()
        forked = mp.get_context("fork").Process(target=time.sleep, args=(600,))
        for p in (spawn.Process(target=spawned, args=(queue,)), forked):
            p.start()
            pids.append(p.pid)
        pids.append(queue.get())
        pids.append(subprocess.Popen(SLEEP).pid)
        box = {}

        def start_from_a_thread():  # returns once the child runs its own code (armed by then)
            box["p"] = subprocess.Popen(UP_AND_SLEEP, stdout=subprocess.PIPE, text=True)
            box["p"].stdout.readline()

        thread = threading.Thread(target=start_from_a_thread)
        thread.start(); thread.join()
    free = subprocess.Popen(SLEEP)  # after the block: not bound
    assert os.environ.get(lifeline.ENV) is None, "the block leaves the environment as it found it"
    thread_child_rc = None
    try:
        thread_child_rc = box["p"].wait(timeout=10 if on else 0.1)  # bound to its thread, which has exited
    except subprocess.TimeoutExpired:
        pids.append(box["p"].pid)
    print("READY " + json.dumps({"bound": pids, "free": [free.pid], "thread_child_rc": thread_child_rc}), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
'''

# Owner of a vLLM engine, built the way `spacetime caption` and the caption stage build it.
_VLLM_OWNER = r'''
import json, sys, time
import psutil
from captioner.config import CaptionConfig
from captioner.engines import EngineLoop


def main():
    cfg = CaptionConfig.model_validate_json(sys.argv[1])
    start = time.perf_counter()
    runner = EngineLoop(cfg)
    seconds = time.perf_counter() - start
    procs = [[p.pid, " ".join(p.cmdline())] for p in psutil.Process().children(recursive=True)]
    print("READY " + json.dumps({"start_s": round(seconds, 2), "procs": procs}), flush=True)
    time.sleep(600)


if __name__ == "__main__":  # vLLM spawns its engine core, which imports this module again
    main()
'''


def start_owner(tmp_path, source: str, *args: str, timeout_s: float) -> tuple[subprocess.Popen, dict]:
    script = tmp_path / "owner.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SPACETIME_LIFELINE", None)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env, cwd=ROOT)
    lines = []
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as output:
        output.register(proc.stdout, selectors.EVENT_READ)
        while output.select(max(0.0, deadline - time.monotonic())):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("READY "):
                return proc, json.loads(line[len("READY "):])
    kill_all(proc, descendants(proc.pid))
    pytest.fail(f"owner not ready within {timeout_s} s:\n{''.join(lines)[-6000:]}")


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    """Clean up after a failed check: the owner's group and any orphan."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("lifeline", ["on", "off"])
def test_plain_children_die_with_their_owner(tmp_path, lifeline):
    """SIGKILL of the owner takes forked, spawned and exec'd children and a grandchild with it; a
    child started after the block lives on. Without the lifeline every child lives on."""
    proc, started = start_owner(tmp_path, _PLAIN_OWNER, lifeline, timeout_s=60)
    everything = descendants(proc.pid)
    try:
        # fork, spawn + its grandchild, mp fork, subprocess (+ multiprocessing's resource tracker)
        assert len(started["bound"]) >= 5 and set(started["bound"] + started["free"]) <= set(everything), everything
        if lifeline == "on":  # the kernel binds a child to the THREAD that started it (module doc)
            assert started["thread_child_rc"] == -signal.SIGKILL
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        rest = [pid for pid in everything if pid not in started["free"]]
        if lifeline == "on":
            assert not (alive := pids_alive(rest, wait_s=GONE_WITHIN_S)), f"outlived the owner: {alive}"
            assert pids_alive(started["free"], wait_s=0) == started["free"]
        else:  # the check above can fail: without the lifeline the children are orphaned
            assert set(pids_alive(rest, wait_s=1)) >= set(started["bound"])
    finally:
        kill_all(proc, everything)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_parent_died_before_start_up_kills_itself():
    """The race between fork and prctl: an interpreter started for a parent that is already gone
    dies at once; one whose named parent is alive but not its parent (an intermediate program
    such as a shell) runs normally."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    code = "print('ran')"
    orphan = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SPACETIME_LIFELINE": str(dead.pid)},
                            capture_output=True, text=True, timeout=60)
    assert orphan.returncode == -signal.SIGKILL and "ran" not in orphan.stdout, (
        f"{orphan}: is the venv's zz_spacetime_lifeline.pth missing? (.ci/setup writes it)")
    via_shell = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "SPACETIME_LIFELINE": str(os.getppid())})
    assert via_shell.returncode == 0 and via_shell.stdout.strip() == "ran", via_shell


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_vllm_engine_dies_with_its_owner(tiny_models, tmp_path):
    """The caption engine's vLLM engine core (a spawned child of the owner) is gone within seconds
    of a SIGKILL of the owner."""
    from tests.caption_support import START_TIMEOUT_S, caption_config

    cfg = caption_config(tiny_models["vlm"]["path"])
    proc, started = start_owner(tmp_path, _VLLM_OWNER, cfg.model_dump_json(), timeout_s=START_TIMEOUT_S)
    everything = descendants(proc.pid)
    try:
        names = dict(started["procs"])  # on CPU: VLLM::EngineCore, its VLLM::Worker, multiprocessing's tracker
        assert any("EngineCore" in name for name in names.values()), started
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        alive = pids_alive(everything, wait_s=GONE_WITHIN_S)
        assert not alive, f"outlived the owner: {[(pid, names.get(pid, '?')) for pid in alive]}"
    finally:
        kill_all(proc, everything)
