"""Child processes that die with their owner (Linux; a no-op elsewhere).

    from spacetime import lifeline

    with lifeline.bound():          # children started in this block, and all of theirs,
        llm = AsyncLLM(...)         # get SIGKILL when their parent dies, however it dies

Why: a process killed with SIGKILL runs no clean-up, so the children it started (vLLM's engine core
and its workers: GBs of memory, maybe a GPU) are reparented to init and live on. The kernel can
signal a child when its parent dies, `prctl(PR_SET_PDEATHSIG, SIGKILL)`, but the CHILD must ask for
it, and the children here run vLLM's code, not ours. So it is asked for on their behalf:

- forked children (os.fork, multiprocessing "fork": vLLM's default on GPU outside Ray): an at-fork
  hook (os.register_at_fork) arms the child before it runs anything else;
- exec'd Python children (multiprocessing "spawn": vLLM forces it on CPU and in Ray actors;
  subprocess): the environment variable SPACETIME_LIFELINE=<parent pid>, inherited, is read at
  interpreter start-up by `inherit()`, which the `.pth` file that .ci/setup writes into the venv
  runs in every interpreter (without that file only forked children are covered).

An armed child is bound for life: its own children are armed too (engine core -> its workers), so
SIGKILL of the owner takes down the whole tree, level by level, within milliseconds.

Kernel semantics to know:
- The "parent" is the THREAD that started the child: a child started from a thread that exits is
  killed then. Start long-lived children from a thread that lives as long as they should
  (captioner.engines builds vLLM on EngineLoop's thread, which lives as long as the engine).
- The parent may die between fork and prctl. A forked child then has another parent pid and kills
  itself; an exec'd child does the same when the pid it was given is gone (a live pid that is not
  its parent is an intermediate non-Python program, which is not armed: e.g. a shell).
- Non-Python programs started with subprocess are not armed (subprocess runs no at-fork hook and
  they read no .pth); vLLM's tree has none that live long.

Why not what exists: vLLM 0.32 guards only its workers (they watch the engine core through a pipe,
multiproc_executor's death_pipe), not the engine core; Ray kills a worker's children when the
worker exits by itself or its raylet sees it die, which a SIGKILL of both does not give, and
`spacetime caption` runs without Ray. Ray binds its own daemons to the driver with this same prctl
(ray._private.utils.set_kill_on_parent_death_linux).

Cost (measured on the 2-core CI machine): ~6 us per child started in a block (prctl, getppid, an
environment update) on top of ~1.2 ms for the fork itself; ~10 ms of CPU at the start of an
interpreter started with the variable (ctypes and threading, which vLLM imports anyway), one dict
lookup in any other interpreter. Nothing on any request path.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

ENV = "SPACETIME_LIFELINE"  # value: the pid of the process whose children are bound to it
_PR_SET_PDEATHSIG = 1
_SIGKILL = 9

_lock = threading.Lock()
_prctl = None  # libc's prctl, resolved (dlsym) once before any fork: a child only calls it
_hooked = False  # the at-fork hook is registered (it cannot be unregistered: it checks the state)
_life = False  # this process is itself bound (inherit() or a bound fork): all its children are
_blocks = 0  # bound() blocks open in this process
_owner = 0  # this process's pid, as seen by a child right after fork (the parent it must have)
_before: str | None = None  # SPACETIME_LIFELINE before the first open bound() block


def supported() -> bool:
    return sys.platform.startswith("linux")


def _load_prctl():
    global _prctl
    if _prctl is None:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).prctl
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        _prctl = fn
    return _prctl


def _gone(pid: int) -> bool:
    """`pid` has exited (no such process, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()  # "pid (comm) S ...": the state follows the last parenthesis
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X")


def _arm(parent: int, exact: bool) -> None:
    """Ask for SIGKILL when the parent thread dies; die now if `parent` already has. `exact`: the
    parent is known for sure (a fork), else `parent` may be a grandparent (see the module doc)."""
    if _load_prctl()(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0:
        import ctypes

        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    ppid = os.getppid()
    if ppid != parent and (exact or _gone(parent)):
        os.kill(os.getpid(), _SIGKILL)  # orphaned before the lifeline was in place: as if it fired


def _publish() -> None:
    """Name this process as the parent its exec'd children must watch, and watch forks."""
    global _hooked, _owner
    _owner = os.getpid()
    os.environ[ENV] = str(_owner)
    if not _hooked:
        _load_prctl()
        os.register_at_fork(after_in_child=_after_fork)
        _hooked = True


def _after_fork() -> None:
    global _life, _blocks, _lock
    _lock = threading.Lock()  # another thread may have held it at the fork
    if not (_life or _blocks):
        return
    _arm(_owner, exact=True)
    _life, _blocks = True, 0  # a bound child is bound for life, and so are its children
    _publish()


def inherit() -> None:
    """Interpreter start-up hook (the venv's .pth file): bind this process to its parent if the
    environment says so. Cheap and silent when SPACETIME_LIFELINE is unset; never raises."""
    global _life
    value = os.environ.get(ENV)
    if not value or not supported():
        return
    try:
        _arm(int(value), exact=False)
        with _lock:
            _life = True
            _publish()
    except Exception as err:  # never break an interpreter's start because of the hook itself
        print(f"spacetime lifeline: {ENV}={value!r}: {err}", file=sys.stderr)


@contextmanager
def bound() -> Iterator[None]:
    """Children started by this process inside the block (from any thread; bound to the thread that
    starts each) die when their parent does, and so do all of their descendants."""
    global _blocks, _before
    if not supported():
        yield
        return
    with _lock:
        if not (_blocks or _life):
            _before = os.environ.get(ENV)
        _blocks += 1
        _publish()
    try:
        yield
    finally:
        with _lock:
            _blocks -= 1
            if not (_blocks or _life):  # later children of this process are not bound
                if _before is None:
                    os.environ.pop(ENV, None)
                else:
                    os.environ[ENV] = _before
