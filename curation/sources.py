"""Stage 1, sources: expand --input URIs into a stable list, and open any of them for reading.

Local inputs are content-digested (sha256 of the bytes) in the probe stage, on the workers.
Remote (s3://) objects are identified by size + ETag instead: hashing would mean downloading every
object once more just for its id, and an ETag already changes whenever the object's bytes do.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path

from curation.settings import SourcesConfig
from spacetime.config import S3Config
from spacetime.errors import UserError
from spacetime.io import s3_filesystem


class SourceError(UserError, ValueError):
    """An --input that cannot be listed; the message names it."""


def _list_s3(uri: str, cfg: SourcesConfig) -> list[str]:
    from pyarrow import fs

    s3 = s3_filesystem(cfg.s3)
    path = uri[len("s3://"):]
    info = s3.get_file_info(path)
    if info.type == fs.FileType.File:
        return [uri]
    if info.type == fs.FileType.NotFound and "/" in path.strip("/"):
        raise SourceError(f"{uri}: no such object or prefix")
    entries = s3.get_file_info(fs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    return [f"s3://{e.path}" for e in entries
            if e.type == fs.FileType.File and Path(e.path).suffix.lower() in cfg.extensions]


def _list_local(uri: str, cfg: SourcesConfig) -> list[str]:
    path = Path(uri).expanduser()
    if any(ch in uri for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(uri), recursive=True))
        if not matches:
            raise SourceError(f"{uri}: the glob matches no file")
        return [str(Path(m).resolve()) for m in matches if Path(m).is_file()]
    if path.is_dir():
        return [str(p.resolve()) for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in cfg.extensions and not p.name.startswith(".")]
    if not path.exists():
        raise SourceError(f"{uri}: no such file or folder")
    if path.suffix.lower() == ".txt":  # a list of URIs, one a line, '#' comments
        listed = [ln.strip() for ln in path.read_text().splitlines()]
        return [u for ln in listed if ln and not ln.startswith("#") for u in list_inputs([ln], cfg)]
    return [str(path.resolve())]  # a named file is always taken: a non-video becomes a failed row


def list_inputs(inputs: list[str], cfg: SourcesConfig) -> list[str]:
    """All source URIs of `inputs`, deduplicated, in a stable (sorted) order."""
    uris: set[str] = set()
    for uri in inputs:
        uris.update(_list_s3(uri, cfg) if uri.startswith("s3://") else _list_local(uri, cfg))
    return sorted(uris)


def source_key(uri: str) -> str:
    """Stable short name of a source URI, for its completion record."""
    return hashlib.sha256(uri.encode()).hexdigest()[:24]


def digest_source(uri: str, cfg: S3Config) -> tuple[str, str, int]:
    """(digest, kind, size_bytes): sha256 of the bytes locally; size+ETag for s3:// (see above)."""
    if uri.startswith("s3://"):
        s3 = s3_filesystem(cfg)
        with s3.open_input_file(uri[len("s3://"):]) as f:
            meta = f.metadata()
            size = f.size()
        raw = next((v for k, v in meta.items() if (k.decode() if isinstance(k, bytes) else k).lower() == "etag"), b"")
        etag = (raw.decode() if isinstance(raw, bytes) else raw).strip('"')
        if not etag:  # no ETag: fall back to hashing the object
            h = hashlib.sha256()
            with s3.open_input_stream(uri[len("s3://"):]) as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            return h.hexdigest(), "sha256", size
        return hashlib.sha256(f"{size}:{etag}".encode()).hexdigest(), "size-etag", size
    h = hashlib.sha256()
    with open(uri, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest(), "sha256", os.path.getsize(uri)
