"""An output location: a local folder or `s3://bucket/prefix`, addressed by paths relative to it.

Every writer of an output (curation's workers, the unit writer tasks, finalize, the report) goes
through a `Store`, so no node needs a filesystem shared with another: on S3, workers write straight
to the bucket. Writes are atomic on both:
- local: a temporary name next to the final one, renamed when complete (spacetime.io.atomic_path);
- S3: the file is written to a local temporary file first, then uploaded as one object by one C++
  call (spacetime.io.s3_put: no Python code runs while the upload stream is open, so no exception can
  make pyarrow complete a truncated object). An object appears whole or not at all (a killed or failed
  multipart upload leaves no object), so no temporary object is ever visible under the prefix.

A Store pickles as its URI and S3 settings (Ray ships it to tasks and actors); the S3 client is made
on first use in each process.

    store = Store("s3://bucket/out", S3Config(endpoint=...))
    with store.writing("shards/a.tar") as tmp:   # a local path to write; published on success
        ...
    store.write("summary.json", text); store.read_text("summary.json"); store.list(".work/done")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from spacetime.config import S3Config
from spacetime.io import atomic_path, s3_filesystem, s3_put

S3_PREFIX = "s3://"


class Store:
    def __init__(self, uri: str | Path, s3: S3Config | None = None):
        uri = str(uri)
        self.is_s3 = uri.startswith(S3_PREFIX)
        self.s3 = s3 or S3Config()
        if self.is_s3:
            self.uri = uri.rstrip("/")
            self.root = self.uri[len(S3_PREFIX):]  # bucket/prefix, pyarrow's path
            if not self.root or self.root.startswith("/"):
                raise ValueError(f"{uri}: an s3:// output needs a bucket (s3://bucket/prefix)")
        else:
            self.root = str(Path(uri).expanduser().resolve())
            self.uri = self.root
        self._fs = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "s3": self.s3}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["s3"])

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def fs(self):
        if self._fs is None:
            from pyarrow import fs

            self._fs = s3_filesystem(self.s3) if self.is_s3 else fs.LocalFileSystem()
        return self._fs

    @property
    def local(self) -> Path | None:
        """The folder of a local store; None on S3."""
        return None if self.is_s3 else Path(self.root)

    def path(self, rel: str) -> str:
        """The filesystem path of `rel` (pyarrow's for S3: bucket/prefix/rel)."""
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """The URI of `rel`, as a reader outside the project would name it."""
        return f"{self.uri}/{rel}"

    # -------------------------------------------------------------------------------- reading
    def exists(self, rel: str) -> bool:
        if not self.is_s3:
            return os.path.exists(self.path(rel))
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type == fs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of `rel`; FileNotFoundError naming its URI when there is none."""
        if not self.is_s3:
            return Path(self.path(rel)).read_bytes()
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri_of(rel)}: no such object") from err

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_table(self, rel: str, columns: list[str] | None = None):
        """The Parquet file `rel` as a pyarrow Table. Read from an Arrow buffer: pq.read_table over a
        Python file object (io.BytesIO) made about half of the processes abort at exit ("terminate
        called without an active exception", pyarrow 26, measured in `spacetime review import`)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        return pq.read_table(pa.BufferReader(self.read_bytes(rel)), columns=columns)

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Names of the files directly under `rel_dir` ending in `suffix`, sorted; [] if none."""
        if not self.is_s3:
            folder = Path(self.path(rel_dir))
            return sorted(p.name for p in folder.glob(f"*{suffix}") if p.is_file() and not p.name.startswith(".")) \
                if folder.is_dir() else []
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.path(rel_dir), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.File and i.base_name.endswith(suffix))

    # -------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def writing(self, rel: str, unique: bool = False) -> Iterator[Path]:
        """Yields a local path to write `rel` to; published at `rel` when the block exits without an
        error, discarded when it raises. `unique`: several writers may write the same `rel` at once
        (same bytes): see spacetime.io.atomic_path."""
        if not self.is_s3:
            with atomic_path(self.path(rel), unique=unique) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="spacetime-upload-") as folder:
            tmp = Path(folder) / Path(rel).name
            yield tmp
            s3_put(self.fs, self.path(rel), tmp)

    def write(self, rel: str, data: bytes | str) -> None:
        """Write `data` (bytes, or text as UTF-8) at `rel` atomically."""
        data = data.encode() if isinstance(data, str) else data
        if not self.is_s3:
            with atomic_path(self.path(rel)) as tmp:
                tmp.write_bytes(data)
            return
        s3_put(self.fs, self.path(rel), data)

    def copy(self, src: str, dst: str) -> None:
        """Copy `src` to `dst` atomically (a server-side copy on S3)."""
        if not self.is_s3:
            with atomic_path(self.path(dst)) as tmp:
                shutil.copyfile(self.path(src), tmp)
            return
        self.fs.copy_file(self.path(src), self.path(dst))

    def delete(self, rel: str) -> None:
        """Remove the file `rel`; nothing if there is none."""
        try:
            if self.is_s3:
                self.fs.delete_file(self.path(rel))
            else:
                os.unlink(self.path(rel))
        except FileNotFoundError:
            pass
        except OSError:
            # pyarrow's S3 delete_file re-creates the parent's "dir/" marker object after the delete when
            # the folder would look empty; that PUT can be refused (seen: a server answering ACCESS_DENIED
            # while another writer empties the prefix). The object itself is gone: only that is asked.
            if not self.is_s3 or self.exists(rel):
                raise

    def delete_dir(self, rel_dir: str) -> None:
        """Remove the folder `rel_dir` and everything under it; nothing if there is none."""
        if not self.is_s3:
            shutil.rmtree(self.path(rel_dir), ignore_errors=True)
            return
        try:
            self.fs.delete_dir(self.path(rel_dir))
        except FileNotFoundError:
            pass
