"""Atomic writes and URI access shared by every wing.

Every output is written to a temporary name next to its final one and renamed when complete, so a
reader (or a rerun after a kill) sees a whole file (or folder) or none. `s3://` URIs go through pyarrow's
S3FileSystem with the `S3Config` of the command (endpoint, region; credentials from the usual AWS
environment variables, never from config).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from spacetime.config import S3Config


def temp_path(path: Path) -> Path:
    """The temporary name `path` is written under before its rename: same folder (the rename is
    atomic), hidden, fixed (a rerun after a kill overwrites its leftover) and with the same suffix
    (tools that pick a format by extension, like FFmpeg, still work)."""
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path, unique: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; renamed to `path` when the block exits without an error,
    removed when it raises. Parent folders are created. `unique`: a temp name of this writer alone,
    for paths that two workers may write at once (with the same bytes, e.g. a clip of two
    byte-identical sources); the default fixed name lets a rerun overwrite a killed run's leftover."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path) if not unique else path.with_name(f".{path.stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder to fill; it replaces `path` (and whatever was there) when the
    block exits without an error, and is removed when it raises. For multi-file outputs such as
    checkpoints and exported models."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # the leftover of a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def write_parquet(path: str | Path, table) -> None:
    """Write a pyarrow table to `path` atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def s3_filesystem(cfg: S3Config):
    """pyarrow's S3FileSystem for `cfg` (endpoint from the config, else $AWS_ENDPOINT_URL, else AWS)."""
    from pyarrow import fs

    endpoint = cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": cfg.region, "anonymous": cfg.anonymous}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return fs.S3FileSystem(**kwargs)


def s3_put(s3, path: str, data: bytes | Path) -> None:
    """Store `data` (bytes, or the complete local file at a Path) as the object `path` ("bucket/key")
    of the pyarrow S3FileSystem `s3`: the object appears whole or not at all.

    pyarrow's S3 output stream has no abort() in Python, and closing it (as `with` does on an error, or
    the garbage collector does) completes the object with the bytes written so far. So no Python code
    runs while a stream is open: copy_files opens, fills and closes it in one C++ call without the GIL.
    An exception (an error, Ctrl-C, SIGTERM, ray.cancel()) comes before it (no object) or after it (the
    object whole); a failed part upload makes the call raise without completing the object (an
    unfinished multipart upload is no object). The one way left to a truncated object is the local file
    failing to read in the middle of the copy (a disk error)."""
    from pyarrow import fs

    if not isinstance(data, Path):
        with tempfile.TemporaryDirectory(prefix="spacetime-upload-") as folder:
            local = Path(folder) / "data"
            local.write_bytes(data)
            return s3_put(s3, path, local)
    fs.copy_files(str(data), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=s3,
                  chunk_size=8 * 1024 * 1024)


def open_uri(uri: str, cfg: S3Config) -> str | BinaryIO:
    """What av.open() and tarfile take for `uri`: a local path, or a seekable pyarrow file for s3://."""
    if uri.startswith("s3://"):
        return s3_filesystem(cfg).open_input_file(uri[len("s3://"):])
    return uri
