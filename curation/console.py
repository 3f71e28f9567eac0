"""What a curation run prints: our own log lines and progress on the console, Ray's messages in a file.

    with ray_messages_to(Path("out/logs/ray.log")) as console:   # console: the terminal's stream
        tqdm(..., file=console)

Ray talks on the process's stderr in three ways: its Python loggers (with a handler of its own), Python
warnings, and the C++ core worker of the driver, which writes straight to file descriptor 2 (the
"constructor arguments in the object store" lines). Only redirecting fd 2 catches all three. Inside the
block fd 2 is the log file; the handlers of the root logger (ours: `spacetime`, `curation`, ...) and
the returned `console` stream write to a duplicate of the original fd 2, so our lines, our errors
naming their source and the progress bar stay on the terminal. Processes Ray starts inside the block
(raylet, workers) inherit the file as their stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def ray_messages_to(path: Path | None) -> Iterator[IO[str]]:
    """Send everything written to fd 2 within the block to `path` (appended) and keep our logging on
    the terminal; `path` None: change nothing (--verbose). Yields the console stream."""
    if path is None:
        yield sys.stderr
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    swapped = []
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
            swapped.append((handler, handler.setStream(console)))
    try:
        yield console
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        console.close()
