"""One writer per output (spacetime.lease) with real processes: holders in subprocesses that are
SIGKILLed, contenders racing in threads and in processes, and s3:// outputs on a real S3 server
process (moto's server mode). Short ttls (about 1-2 s) keep the file fast."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spacetime.config import S3Config
from spacetime.errors import UserError
from spacetime.lease import Lease, LeaseHeld, LeaseLost
from tests.helpers import ROOT

HOLD = """
import sys, time
from spacetime.config import S3Config
from spacetime.lease import Lease
out, ttl, endpoint = sys.argv[1], float(sys.argv[2]), sys.argv[3] or None
Lease(out, S3Config(endpoint=endpoint), ttl=ttl, settle=0.2).acquire()
print("held", flush=True)
time.sleep(600)
"""

# Each process tries the outputs in turn, round i starting at t0 + i * gap in both (t0 comes on stdin
# once both are up). Winners hold their leases until both have printed what they won, so a late
# contender can never win an output after its winner released it.
RACE = """
import json, sys, time
from spacetime.lease import Lease, LeaseHeld
gap, outs = float(sys.argv[1]), sys.argv[2:]
print("ready", flush=True)
t0 = float(sys.stdin.readline())
won, held = [], []
for i, out in enumerate(outs):
    time.sleep(max(0.0, t0 + i * gap - time.time()))
    try:
        held.append(Lease(out, ttl=10).acquire())
        won.append(i)
    except LeaseHeld:
        pass
print(json.dumps(won), flush=True)
sys.stdin.readline()
for lease in held:
    lease.release()
"""


@pytest.fixture(autouse=True)
def no_renewer_left():
    """Every test releases what it took: no renewal thread outlives it."""
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith("lease-renew")]
    assert not left, left


def lease_file(out) -> Path:
    return Path(out) / ".work" / "lease.json"


def fake_record(holder: str = "someone-else", age: float = 0.0, ttl: float = 30.0) -> dict:
    """A lease of another run, renewed `age` seconds ago (expired when age > ttl)."""
    now = time.time()
    return {"holder": holder, "host": "elsewhere", "pid": 4242, "started": now - age - 5, "renewed": now - age,
            "ttl": ttl}


def this_machine() -> dict:
    """The fields of a lease record that place its holder on this host, in this boot, in this pid namespace."""
    return {"host": socket.gethostname(), "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
            "pid_ns": os.readlink("/proc/self/ns/pid")}


def no_such_pid() -> int:
    """A pid no process has here: above the largest this kernel hands out."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def hold_in_subprocess(out: str, ttl: float, endpoint: str = "") -> subprocess.Popen:
    """A run holding the lease on `out` in another process (it prints `held` once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, out, str(ttl), endpoint], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def tell(procs: list[subprocess.Popen], line: str) -> None:
    for proc in procs:
        proc.stdin.write(line)
        proc.stdin.flush()


def wait_until(cond, timeout: float, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()


def try_acquire(lease: Lease) -> bool:
    try:
        lease.acquire()
        return True
    except LeaseHeld:
        return False


def contend(leases: list[Lease]) -> list[bool]:
    """Each lease acquires in its own thread, all at once; which of them won."""
    barrier, won = threading.Barrier(len(leases)), [False] * len(leases)

    def attempt(k):
        barrier.wait()
        won[k] = try_acquire(leases[k])

    threads = [threading.Thread(target=attempt, args=(k,)) for k in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def race_threads(make_lease, rounds: int, seed=None) -> None:
    """Two threads acquire the same output at once, `rounds` times: exactly one wins each time.
    `seed(lease)` prepares the output first (e.g. a dead run's lease)."""
    for i in range(rounds):
        leases = [make_lease(i), make_lease(i)]
        if seed is not None:
            seed(leases[0])
        won = contend(leases)
        assert sum(won) == 1, f"round {i}: {won}"
        winner = leases[won.index(True)]
        assert winner.holder()["holder"] == winner.id
        winner.release()


# ------------------------------------------------------------------------------------------ local
def test_acquire_release_and_reacquire(tmp_path):
    out = tmp_path / "out"
    lease = Lease(out, ttl=2)
    assert lease.holder() is None
    with pytest.raises(LeaseLost, match="does not hold"):
        lease.check()
    with lease:
        record = json.loads(lease_file(out).read_text())
        assert record["holder"] == lease.id and record["pid"] == os.getpid()
        assert {k: record[k] for k in ("host", "boot_id", "pid_ns")} == this_machine() and record["ttl"] == 2
        assert record["started"] <= record["renewed"] <= time.time()
        lease.check()
    assert not lease_file(out).exists()
    assert not list(lease_file(out).parent.iterdir())  # no temporaries left behind
    with Lease(out, ttl=2) as again:
        again.check()


def test_a_held_output_is_refused_naming_the_holder_until_it_dies(tmp_path, caplog):
    out = str(tmp_path / "out")
    proc = hold_in_subprocess(out, ttl=1.5)
    try:
        with pytest.raises(LeaseHeld) as err:
            Lease(out, ttl=1.5).acquire()
        assert isinstance(err.value, UserError)
        msg = str(err.value)
        started = json.loads(lease_file(out).read_text())["started"]
        assert f"host {socket.gethostname()}, pid {proc.pid}" in msg
        assert time.strftime("%Y-%m-%dT%H:%M", time.localtime(started)) in msg
        assert "expires in" in msg and "surely dead" in msg and out in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    caplog.set_level(logging.WARNING, logger="spacetime.lease")
    lease = Lease(out, ttl=1.5)
    assert try_acquire(lease)  # same host, process gone: no need to wait out the ttl
    assert f"pid {proc.pid}" in caplog.text and "its process is gone" in caplog.text
    assert lease.holder()["holder"] == lease.id
    lease.release()


def test_a_holder_on_another_host_blocks_until_its_lease_expires(tmp_path, caplog):
    """Its process cannot be checked from here: only the ttl frees the output."""
    out = tmp_path / "out"
    lease_file(out).parent.mkdir(parents=True)
    now = time.time()
    lease_file(out).write_text(json.dumps({"holder": "h", "host": "another-host", "pid": os.getpid() + 10**6,
                                           "started": now, "renewed": now, "ttl": 1.5}))
    lease = Lease(out, ttl=1.5)
    with pytest.raises(LeaseHeld, match="host another-host"):
        lease.acquire()
    caplog.set_level(logging.WARNING, logger="spacetime.lease")
    assert wait_until(lambda: try_acquire(lease), timeout=3)
    assert "another-host" in caplog.text and "expired" in caplog.text
    lease.release()


def test_a_reused_pid_does_not_keep_a_dead_holder_alive(tmp_path):
    """The record's process start time must match: another process with the holder's pid is not it."""
    out = tmp_path / "out"
    lease_file(out).parent.mkdir(parents=True)
    now = time.time()
    lease_file(out).write_text(json.dumps({"holder": "h", **this_machine(), "pid": os.getpid(),
                                           "proc_start": "1", "started": now, "renewed": now, "ttl": 60}))
    with Lease(out, ttl=60) as lease:
        assert lease.holder()["holder"] == lease.id


def test_a_dead_holder_of_this_host_boot_and_pid_namespace_is_void_at_once(tmp_path, caplog):
    out = tmp_path / "out"
    lease_file(out).parent.mkdir(parents=True)
    lease_file(out).write_text(json.dumps({**fake_record(ttl=60), **this_machine(), "pid": no_such_pid(),
                                           "proc_start": "1"}))
    caplog.set_level(logging.WARNING, logger="spacetime.lease")
    with Lease(out, ttl=60) as lease:
        assert lease.holder()["holder"] == lease.id
    assert "its process is gone" in caplog.text


@pytest.mark.parametrize("differs", ["pid_ns", "boot_id", "old record"])
def test_a_holder_with_our_hostname_elsewhere_is_live_until_its_ttl(tmp_path, differs):
    """Containers may share a hostname (and the host's boot id) in separate pid namespaces, and a
    rebooted host reuses its pids: there a pid missing here says nothing about the holder, only the
    ttl frees the output. A record without boot_id and pid_ns (an older version's) gets the ttl too."""
    out = tmp_path / "out"
    lease_file(out).parent.mkdir(parents=True)
    record = {**fake_record(ttl=60), **this_machine(), "pid": no_such_pid(), "proc_start": "1"}
    if differs == "old record":
        del record["boot_id"], record["pid_ns"]
    else:
        record[differs] = {"pid_ns": "pid:[1]", "boot_id": "another-boot"}[differs]
    lease_file(out).write_text(json.dumps(record))
    lease = Lease(out, ttl=60)
    try:
        with pytest.raises(LeaseHeld, match=f"host {socket.gethostname()}, pid {record['pid']}"):
            lease.acquire()
    finally:
        lease.release()  # (holds nothing unless it wrongly took the live lease)
    assert json.loads(lease_file(out).read_text()) == record


def test_renewal_keeps_a_live_lease_from_expiring(tmp_path):
    out = tmp_path / "out"
    with Lease(out, ttl=0.9) as lease:
        time.sleep(2.5)  # almost three ttls
        lease.check()
        assert not lease.lost and time.time() - lease.holder()["renewed"] < 0.9
        with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
            Lease(out, ttl=0.9).acquire()


def test_a_corrupt_lease_counts_as_expired(tmp_path, caplog):
    out = tmp_path / "out"
    lease_file(out).parent.mkdir(parents=True)
    lease_file(out).write_text('{"holder": "trunc')
    caplog.set_level(logging.WARNING, logger="spacetime.lease")
    with Lease(out, ttl=2) as lease:
        assert lease.holder()["holder"] == lease.id
    assert "not a valid lease" in caplog.text


def test_a_lost_lease_is_detected_and_left_alone(tmp_path, caplog):
    out = tmp_path / "out"
    caplog.set_level(logging.ERROR, logger="spacetime.lease")
    lease = Lease(out, ttl=0.9).acquire()
    thief = fake_record()
    lease_file(out).write_text(json.dumps(thief))  # another run took over (e.g. after a long stall)
    assert wait_until(lambda: lease.lost, timeout=2)
    with pytest.raises(LeaseLost, match="now held by host elsewhere, pid 4242"):
        lease.check()
    time.sleep(0.7)  # more renewal periods: still one error in the log
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    lease.release()
    assert json.loads(lease_file(out).read_text()) == thief  # the new holder's lease is untouched


def test_a_lost_lease_stops_the_unit_writer_before_it_submits(tmp_path):
    """curation's UnitWriter checks the lease before each unit: a run that lost it writes nothing more."""
    from curation.rundir import RunDir
    from curation.units import UnitWriter
    from spacetime.store import Store

    out = tmp_path / "out"
    lease = Lease(out, ttl=0.9).acquire()
    lease_file(out).write_text(json.dumps(fake_record()))  # another run took over
    assert wait_until(lambda: lease.lost, timeout=2)
    submitted = []
    writer = UnitWriter(RunDir(Store(out)), [[("a.mp4", 0)], [("b.mp4", 0)]], lambda *unit: submitted.append(unit),
                        {("a.mp4", 0), ("b.mp4", 0)}, check=lease.check)
    with pytest.raises(LeaseLost, match="lost its lease"):
        writer.poll()
    assert submitted == [] and writer.next == 0
    lease.release()


def test_contenders_in_threads_exactly_one_wins(tmp_path):
    race_threads(lambda i: Lease(tmp_path / f"fresh{i}", ttl=5), rounds=50)

    def expired(lease):  # both contenders find a dead run's lease and try to take it over
        lease_file(lease.output).parent.mkdir(parents=True)
        lease_file(lease.output).write_text(json.dumps(fake_record(age=60)))

    race_threads(lambda i: Lease(tmp_path / f"expired{i}", ttl=5), rounds=50, seed=expired)


def test_contenders_in_processes_exactly_one_wins(tmp_path):
    rounds, gap = 16, 0.1
    outs = [str(tmp_path / f"out{i}") for i in range(rounds)]
    for out in outs[::2]:  # every other output holds a dead run's lease
        lease_file(out).parent.mkdir(parents=True)
        lease_file(out).write_text(json.dumps(fake_record(age=60)))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(gap), *outs], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    tell(procs, f"{time.time() + 0.2}\n")  # t0
    won = [json.loads(p.stdout.readline()) for p in procs]
    tell(procs, "release\n")
    assert [p.wait(timeout=30) for p in procs] == [0, 0]
    assert sorted(won[0] + won[1]) == list(range(rounds)), won
    assert not any(lease_file(out).exists() for out in outs)


# --------------------------------------------------------------------------------------------- s3
@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="leases")
    return "s3://leases"


def s3_lease(s3_server, output: str, ttl: float = 2.0) -> Lease:
    return Lease(output, S3Config(endpoint=s3_server), ttl=ttl, settle=0.2)


def test_s3_acquire_refuse_release(s3_server, bucket):
    out = f"{bucket}/run1/"
    with s3_lease(s3_server, out) as lease:
        assert lease.holder()["holder"] == lease.id
        with pytest.raises(LeaseHeld, match=f"host {socket.gethostname()}, pid {os.getpid()}, started"):
            s3_lease(s3_server, out).acquire()
        lease.check()
    assert lease.holder() is None
    with s3_lease(s3_server, out) as again:
        again.check()


def test_s3_a_killed_holder_is_taken_over_after_expiry(s3_server, bucket, caplog):
    out = f"{bucket}/run2"
    proc = hold_in_subprocess(out, ttl=1.5, endpoint=s3_server)
    try:
        with pytest.raises(LeaseHeld, match=f"pid {proc.pid}"):
            s3_lease(s3_server, out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    caplog.set_level(logging.WARNING, logger="spacetime.lease")
    lease = s3_lease(s3_server, out)
    assert wait_until(lambda: try_acquire(lease), timeout=4, step=0.2)
    assert "taking over the lease" in caplog.text
    lease.release()


def test_s3_contenders_exactly_one_wins(s3_server, bucket):
    race_threads(lambda i: s3_lease(s3_server, f"{bucket}/race{i}", ttl=5), rounds=4)


def test_s3_a_lost_lease_is_detected(s3_server, bucket):
    from spacetime.io import s3_filesystem

    out = f"{bucket}/run3"
    lease = s3_lease(s3_server, out, ttl=0.9).acquire()
    with s3_filesystem(S3Config(endpoint=s3_server)).open_output_stream("leases/run3/.work/lease.json") as f:
        f.write(json.dumps(fake_record()).encode())
    assert wait_until(lambda: lease.lost, timeout=2)
    with pytest.raises(LeaseLost, match="now held by host elsewhere"):
        lease.check()
    lease.release()
    assert lease.holder()["holder"] == "someone-else"
