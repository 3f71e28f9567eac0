"""One writer per output: the lease a run takes on its output folder (a local path or s3://bucket/prefix).

    with Lease(output, s3_cfg) as lease:     # LeaseHeld (a UserError) if another live run holds it
        ...                                  # a daemon thread renews the lease every ttl/3
        lease.check()                        # LeaseLost if it was lost: stop before publishing
    # released: the file is deleted if it is still ours

The lease is one small JSON file, `<output>/.work/lease.json`:
    {"holder": uuid4 hex, "host": ..., "boot_id": ..., "pid_ns": ..., "pid": ..., "proc_start": ...,
     "started": t, "renewed": t, "ttl": seconds}
with wall-clock times (time.time()). A lease is live while `now < renewed + ttl`; a holder that dies
stops renewing, so its lease expires by itself and the next run takes over. A lease whose process is
gone (checked by pid and process start time) is dead at once, but only where that pid names a process
we can see: same host, same boot (/proc/sys/kernel/random/boot_id) and same pid namespace
(/proc/self/ns/pid). Containers may share a hostname in separate pid namespaces, where a pid missing
here says nothing of the holder; a record lacking these fields (an older version's) likewise waits out
its ttl. Expiry is judged by the reader's clock against the writer's, so hosts sharing an output need
clocks within a small fraction of `ttl` of each other (NTP gives milliseconds; the default ttl is 60 s).
A file that is not a lease (truncated, hand-edited) counts as expired, and the takeover says so in the log.

Local outputs get real mutual exclusion from the filesystem:
  - a fresh lease is created only if none exists: written whole under a unique temporary name, then
    hard-linked to lease.json. link() fails if the name exists, exactly as open(O_CREAT|O_EXCL), but a
    reader never sees a half-written file (which it would take for a corrupt, hence expired, lease);
  - an expired lease is first renamed to a unique name (of several contenders only one rename finds
    it); the renamer checks that what it moved is the expired lease it judged, and if it is a fresh
    lease another contender won with, it links that back and backs off;
  - renewal reads the file, and only if it is still ours rewrites it (temporary file + os.replace).
Residual window: a holder stalled for longer than ttl (suspended, swapping) can, in the instant
between its read and its replace, overwrite the lease of a run that took over meanwhile; that run's
next renewal finds the lease is not its own and it stops (see "lost" below). Exactly one run keeps
going.

s3:// has no create-if-absent here (pyarrow's S3FileSystem has no conditional put), so acquisition is
write-then-verify: check there is no live lease, write ours, wait `settle` seconds, read it back. S3
reads are strongly consistent and the last write wins, so of contenders whose writes all land within
`settle` of each other, each reads back the same last lease and only its writer holds. The race left
open: contender B reads (no live lease) before A's write lands and writes only after A's read-back,
i.e. B takes longer than `settle` between one GET and one PUT (normally tens of milliseconds; the
default settle is 1 s). Then A holds first, B overwrites, and A's next renewal (ttl/3 later) finds
B's lease and A stops: a rare, short double holding, detected, never silent. Renewal on S3 is
read, check it is ours, write.

Lost: if a renewal finds the lease is not ours any more (another run took over, or the file was
removed) or cannot write it before it would expire, the lease is lost: `lease.lost` turns true, an
error is logged once, and `check()` raises LeaseLost, so the owner stops before publishing anything
(curation checks it before each unit's write and before publishing a version).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

from spacetime import contract
from spacetime.config import S3Config
from spacetime.errors import UserError

log = logging.getLogger(__name__)



class LeaseError(UserError):
    """The output's lease could not be taken or kept; subclasses say why."""


class LeaseHeld(LeaseError):
    """Another live run holds the output's lease; the message names it and says what to do."""

    def __init__(self, output: str, record: dict | None):
        self.record = record
        super().__init__(held_message(output, record))


class LeaseLost(LeaseError):
    """The run's lease on its output was taken over or could not be renewed: stop, publish nothing."""


def held_message(output: str, record: dict | None) -> str:
    """Who holds `output`, until when, and what to do about it."""
    if record is None:
        return f"{output}: another run took the lease on this output while this one was acquiring it; retry"
    now, ttl = time.time(), record["ttl"]
    left = max(0.0, record["renewed"] + ttl - now)
    return (f"{output}: already being written by another run (host {record['host']}, pid {record['pid']}, "
            f"started {_when(record['started'])}, last renewed {now - record['renewed']:.0f} s ago; its lease "
            f"expires in {left:.0f} s unless renewed). Wait for it to finish, or use another output. If that "
            f"run is surely dead, its lease expires {ttl:.0f} s after its last renewal and the next run takes over.")


def _when(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def parse(raw: bytes | None) -> dict | None:
    """A lease record from the file's bytes; None for a missing file or one that is not a lease."""
    if raw is None:
        return None
    try:
        record = json.loads(raw)
        times = {k: float(record[k]) for k in ("started", "renewed", "ttl")}
        return {**record, **times, "holder": str(record["holder"]), "host": str(record["host"]), "pid": record["pid"]}
    except (ValueError, TypeError, KeyError):  # not JSON, not an object, a field missing or not a number
        return None


def is_live(record: dict | None) -> bool:
    return record is not None and time.time() < record["renewed"] + record["ttl"] and not holder_gone(record)


def process_start(pid: int) -> str | None:
    """The start time (clock ticks after boot) of process `pid`, None if there is no such process or it
    is a zombie; "unknown" where /proc cannot tell."""
    if not Path("/proc/self/stat").exists():  # no procfs: only existence can be checked
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "unknown"
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else fields[19]  # fields from the 3rd (state); the 22nd is starttime


def _read_id(read) -> str | None:
    try:
        return read()
    except OSError:  # no procfs (not Linux), or a sandbox that hides it
        return None


def machine() -> dict:
    """Where this process's pid means something: host, boot id and pid namespace (None where /proc
    cannot tell; then no holder counts as ours and only the ttl frees a lease)."""
    return {"host": socket.gethostname(),
            "boot_id": _read_id(lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip()),
            "pid_ns": _read_id(lambda: os.readlink("/proc/self/ns/pid"))}


def holder_gone(record: dict) -> bool:
    """The holder ran on THIS host, in this boot and in this pid namespace, and its process is gone
    (killed, crashed): its lease is dead at once, so a rerun after a SIGKILL need not wait out the ttl.
    The recorded process start time tells a reused pid from the holder. Any other holder (another
    host, a container with our hostname but its own pid namespace, an old record without these
    fields) can only expire."""
    here = machine()
    if any(here[k] is None or record.get(k) != here[k] for k in here) or not isinstance(record.get("pid"), int):
        return False
    start = process_start(record["pid"])
    return start is None or (record.get("proc_start") not in (None, "unknown", start) and start != "unknown")


# ------------------------------------------------------------------------------------------ stores
class _LocalStore:
    """The lease file on a local (or NFS) filesystem: atomic create-if-absent and takeover by rename."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _staged(self, data: bytes) -> Path:
        # a unique name: several contenders (and a stalled former holder) may stage at once
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        return tmp

    def create(self, data: bytes) -> bool:
        """Write `data` as the lease only if there is none; True if it was created."""
        tmp = self._staged(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def write(self, data: bytes) -> None:
        os.replace(self._staged(data), self.path)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)

    def remove_if(self, seen: bytes) -> bool:
        """Remove the lease if it still holds exactly `seen` (the expired lease a contender judged);
        True if this caller removed it. Of several callers only one rename finds the file."""
        aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if aside.read_bytes() == seen:
            aside.unlink()
            return True
        # We moved the fresh lease of a contender that won the takeover first: put it back. If a third
        # run created one meanwhile, the link fails and the winner finds itself lost at its next renewal.
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink()
        return False


class _S3Store:
    """The lease object on S3 through pyarrow: plain reads, writes and deletes (no conditional put)."""

    def __init__(self, uri: str, cfg: S3Config):
        from spacetime.io import s3_filesystem

        self.fs = s3_filesystem(cfg)
        self.key = uri[len("s3://"):]

    def read(self) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.key) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        from spacetime.io import s3_put

        s3_put(self.fs, self.key, data)  # whole or not at all: a half-written lease reads as expired

    def delete(self) -> None:
        try:  # pyarrow leaves an empty `.work/` marker behind to keep the "folder": harmless
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------- lease
class Lease:
    """The lease of one run on `output` (a local folder or s3://bucket/prefix).

    `ttl`: seconds a lease stays live without renewal (renewed every ttl/3); how long a dead run
    blocks its output. `settle`: seconds between writing and reading back on S3 (see the module
    docstring); unused for local outputs. `s3`: endpoint and region for s3:// outputs."""

    def __init__(self, output: str | Path, s3: S3Config | None = None, ttl: float = 60.0, settle: float = 1.0):
        if ttl <= 0 or settle < 0:
            raise ValueError(f"lease ttl {ttl} must be > 0 and settle {settle} >= 0")
        self.output = str(output).rstrip("/")
        self.ttl, self.settle = float(ttl), float(settle)
        self.path = f"{self.output}/{contract.LEASE_PATH}"
        self.is_s3 = self.output.startswith("s3://")
        self._store = _S3Store(self.path, s3 or S3Config()) if self.is_s3 else _LocalStore(Path(self.path))
        self.id = uuid.uuid4().hex
        self.started = self.renewed = 0.0
        self.held = self.lost = False
        self._lost_reason = ""
        self._lock = threading.Lock()  # renewal vs release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public
    def acquire(self) -> Lease:
        """Take the lease, or raise LeaseHeld naming the live holder. Starts the renewal thread."""
        if self.held:
            return self
        self.started = time.time()
        try:
            (self._acquire_s3 if self.is_s3 else self._acquire_local)()
        except OSError as err:  # no such bucket, no permission, read-only folder...
            raise LeaseError(f"{self.output}: cannot take the lease {self.path}: {err}") from err
        self.held, self.lost = True, False
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew {self.output}", daemon=True)
        self._thread.start()
        log.info("took the lease on %s (ttl %.0f s)", self.output, self.ttl)
        return self

    def release(self) -> None:
        """Stop renewing and delete the lease file if it is still ours (a lost lease is left alone)."""
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self.held = False
            if self.lost:
                return
            try:
                if self._is_ours(parse(self._store.read())):
                    self._store.delete()
            except OSError as err:  # the lease expires by itself; nothing is lost by leaving it
                log.warning("could not delete the lease %s (%s); it expires in %.0f s", self.path, err, self.ttl)

    def check(self) -> None:
        """Raise LeaseLost unless this run still holds its lease (call before publishing outputs)."""
        if self.lost:
            raise LeaseLost(f"{self.output}: this run lost its lease ({self._lost_reason}); it must stop "
                            f"without publishing. Check which run writes this output before rerunning.")
        if not self.held:
            raise LeaseLost(f"{self.output}: this run does not hold the lease (not acquired, or released)")
        if time.time() >= self.renewed + self.ttl:  # the renewal thread starved: others may see it expired
            self._mark_lost(f"not renewed for {time.time() - self.renewed:.0f} s, over its ttl of {self.ttl:.0f} s")
            self.check()  # raises, now that it is lost

    def holder(self) -> dict | None:
        """The lease record on the output now (whoever holds it, live or expired), or None."""
        return parse(self._store.read())

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- acquisition
    def _record(self, renewed: float) -> bytes:
        return json.dumps({"holder": self.id, **machine(), "pid": os.getpid(),
                           "proc_start": process_start(os.getpid()), "started": self.started,
                           "renewed": renewed, "ttl": self.ttl}).encode()

    def _is_ours(self, record: dict | None) -> bool:
        return record is not None and record["holder"] == self.id

    def _stale(self, raw: bytes) -> None:
        """Raise LeaseHeld if `raw` is a live lease; otherwise log the takeover."""
        record = parse(raw)
        if is_live(record):
            raise LeaseHeld(self.output, record)
        if record is None:
            log.warning("%s is not a valid lease (%r...); treating it as expired", self.path, raw[:80])
        else:
            why = "its process is gone" if holder_gone(record) else "expired"
            log.warning("taking over the lease on %s (host %s, pid %s, last renewed %.0f s ago): %s",
                        self.output, record["host"], record["pid"], time.time() - record["renewed"], why)

    def _acquire_local(self) -> None:
        for _ in range(5):  # each retry follows a change made by another contender
            raw = self._store.read()
            if raw is not None:
                self._stale(raw)
                if not self._store.remove_if(raw):
                    continue
            self.renewed = time.time()
            if self._store.create(self._record(self.renewed)):
                return
        raise LeaseHeld(self.output, parse(self._store.read()))

    def _acquire_s3(self) -> None:
        raw = self._store.read()
        if raw is not None:
            self._stale(raw)
        self.renewed = time.time()
        self._store.write(self._record(self.renewed))
        time.sleep(self.settle)  # let any contender's write land; the last write wins
        record = parse(self._store.read())
        if not self._is_ours(record):
            raise LeaseHeld(self.output, record)

    # ---- renewal
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if self._stop.is_set() or self.lost:
                    return
                self._renew()

    def _renew(self) -> None:
        try:
            record = parse(self._store.read())
            if not self._is_ours(record):
                who = "removed" if record is None else f"now held by host {record['host']}, pid {record['pid']}"
                return self._mark_lost(f"the lease file was {who}")
            renewed = time.time()
            self._store.write(self._record(renewed))
            self.renewed = renewed
        except OSError as err:
            # one more try fits before the lease could expire in others' eyes; after that it is lost
            if time.time() + self.ttl / 3 >= self.renewed + self.ttl:
                self._mark_lost(f"could not renew it: {err}")
            else:
                log.warning("could not renew the lease on %s (%s); retrying", self.output, err)

    def _mark_lost(self, reason: str) -> None:
        if not self.lost:
            self.lost, self._lost_reason = True, reason
            log.error("lost the lease on %s: %s; this run must stop without publishing", self.output, reason)
