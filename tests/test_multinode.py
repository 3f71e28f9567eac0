"""Exactly once on a real multi-node Ray cluster: a worker node dies mid-run (its processes
SIGKILLed, as when a machine is lost) and curation still accounts for every clip exactly once.

A head node with no CPUs (nothing but the driver's services and Ray Data's bookkeeping actors run
there) and two 2-CPU worker nodes, each with its own temp folder (sessions, sockets, logs, object
spilling), started in this process with ray.cluster_utils.Cluster. The curation runs in a thread;
as soon as the model stage's actor is up (analysis tasks have run on both nodes; every source's rows
are in flight), the worker node holding it is removed, with whatever tasks run there. The run must
then finish by itself, with no rerun: Ray Data restarts the lost actor elsewhere and retries the lost
tasks and calls, lost blocks are rebuilt from lineage, the lost ShardWriters restart (see
curation.pipeline._apply and _unit_writer). Its output must equal that of an uninterrupted run on a
plain local Ray into a local folder (conftest's clean_curation, made once for this and other tests):
the same shards byte for byte, the same index, manifests and counts, no key twice, every source once.
(The head node is not survived: its loss ends the driver and the cluster; the same command reruns.)

The output location is one parameter (`output` fixture): a local folder, or an s3:// prefix on
conftest's S3 server (workers write straight to the bucket).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.pipeline import run_curation
from curation.settings import CurateConfig
from spacetime import contract
from spacetime.config import load_config
from tests.helpers import CONFIGS, CURATE_OVERRIDES, start_local_ray

pytestmark = pytest.mark.slow

# Ray's defaults take ~15 s to declare a silent node dead (5 missed health checks 3 s apart); 5 x 1 s
# here. Until then calls to the lost actors are retried against it and nothing restarts.
HEAD = {"num_cpus": 0, "object_store_memory": 256 * 1024**2, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}}
WORKER = {"num_cpus": 2, "object_store_memory": 200 * 1024**2}  # two 1-CPU stage tasks at once per node
RUN_TIMEOUT_S = 240  # a faulted run that takes longer than this is taken to hang


# ------------------------------------------------------------------------------------ outputs
class LocalOutput:
    """A local output folder, read back by paths relative to it."""

    def __init__(self, folder: Path):
        self.folder, self.uri = folder, str(folder)

    def names(self, prefix: str) -> list[str]:
        root = self.folder / prefix
        return sorted(str(p.relative_to(self.folder)) for p in root.rglob("*") if p.is_file())

    def read(self, rel: str) -> bytes:
        return (self.folder / rel).read_bytes()


class S3Output:
    """An s3://bucket/prefix output on the test S3 server, read back with boto3."""

    def __init__(self, endpoint: str, bucket: str, prefix: str):
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}"

    def names(self, prefix: str) -> list[str]:
        found = []
        listing = self.client.get_paginator("list_objects_v2")
        for page in listing.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/{prefix}/"):
            found += [o["Key"][len(self.prefix) + 1:] for o in page.get("Contents", [])]
        return sorted(found)

    def read(self, rel: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{rel}")["Body"].read()


def _table(out, rel: str):
    return pq.read_table(io.BytesIO(out.read(rel)))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """(make(name) -> an output view, extra config overrides) for the output location under test."""
    if request.param == "local":
        yield (lambda name: LocalOutput(tmp_path / name)), []
        return
    import boto3

    endpoint = request.getfixturevalue("s3_server")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="curated")
    yield (lambda name: S3Output(endpoint, "curated", name)), [f"sources.s3.endpoint={endpoint}"]


# ------------------------------------------------------------------------------------ cluster
class RayCluster:
    """A head node and worker nodes on this machine, each node with its own temp folder under a short
    scratch folder (Unix socket paths must stay under ~107 characters, too short for tmp_path).

    Ray's "latest cluster" file (ray_current_cluster, which a later address-less `ray.init()` would
    connect to) goes under the scratch folder too ($RAY_TMPDIR), so no other process on the machine
    sees this cluster; it is restored on exit."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        self.scratch = Path(tempfile.mkdtemp(prefix="st-mn-", dir="/tmp"))
        (self.scratch / "ray").mkdir()  # $RAY_TMPDIR/ray: where Ray keeps ray_current_cluster
        self._old_tmpdir = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(self.scratch)
        self.workers, self._count = [], 0
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=dict(HEAD, temp_dir=str(self.scratch / "head")))
        except BaseException:
            self._restore()
            raise
        self.address = self.cluster.address

    def add_worker(self, wait: bool = True):
        temp_dir = self.scratch / f"w{self._count}"
        self._count += 1
        node = self.cluster.add_node(wait=wait, **WORKER, temp_dir=str(temp_dir))
        # the worker's own temp folder: its session (sockets, logs) and object spilling go there
        assert node.get_temp_dir_path() == str(temp_dir)
        assert Path(node.get_session_dir_path()).parent == temp_dir
        self.workers.append(node)
        return node

    def remove_worker(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)  # SIGKILL: the machine is gone
        self.workers.remove(node)

    def shutdown(self) -> None:
        try:
            self.cluster.shutdown()
        finally:
            self._restore()

    def _restore(self) -> None:
        if self._old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self._old_tmpdir
        shutil.rmtree(self.scratch, ignore_errors=True)
        # Ray may still touch the head's session folder after its shutdown (seen: an empty session
        # folder recreated while the next test runs), so once more when the tests are over.
        atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)


def live_actors() -> list[dict]:
    """The live actors' GCS records (Ray's state API needs the dashboard, which these nodes do not run)."""
    from ray._private import state

    return list(state.actors(actor_state_name="ALIVE").values())


def pipeline_actors() -> list[tuple[str, str]]:
    """(node ID, class name) of the live Ray Data map actors (MapWorker(...))."""
    return [(a["Address"]["NodeID"], a["ActorClassName"])
            for a in live_actors() if a["ActorClassName"].startswith("MapWorker(")]


# ------------------------------------------------------------------------------------ checks
def snapshot(out) -> dict:
    """What must not depend on how the run went: shard bytes, index, manifests, summary counts."""
    shards = {rel: hashlib.sha256(out.read(rel)).hexdigest()
              for rel in out.names(contract.SHARDS_DIR) if rel != contract.INDEX_PATH}
    summary = json.loads(out.read(contract.SUMMARY_PATH))
    return {"shards": shards, "index": _table(out, contract.INDEX_PATH),
            "sources": _table(out, contract.SOURCES_MANIFEST), "clips": _table(out, contract.CLIPS_MANIFEST),
            "counts": {k: summary[k] for k in ("sources", "clips", "shards", "buckets")}}


def assert_exactly_once(out, snap: dict, inputs: list[str]) -> None:
    shards, index = snap["shards"], snap["index"].to_pylist()
    assert shards and all(rel.endswith(".tar") and not Path(rel).name.startswith(".") for rel in shards), \
        sorted(shards)  # nothing but committed shards (no leftover temporary file)
    keys = [r["key"] for r in index]
    assert len(keys) == len(set(keys)), [k for k, n in Counter(keys).items() if n > 1]
    uris = snap["sources"].column("uri").to_pylist()
    assert sorted(uris) == sorted(inputs) and len(uris) == len(set(uris))
    kept = [c["clip_id"] for c in snap["clips"].to_pylist() if c["status"] == "kept"]
    assert sorted(kept) == sorted(keys)
    members = Counter()  # every sample's key in exactly one shard, each shard as the index says
    for rel in shards:
        with tarfile.open(fileobj=io.BytesIO(out.read(rel))) as tar:
            in_tar = {m.name.split(".", 1)[0] for m in tar.getmembers()}
        assert in_tar == {r["key"] for r in index if r["shard"] == rel}, rel
        members.update(in_tar)
    assert set(members) == set(keys) and set(members.values()) == {1}


def curate_config(*overrides: str) -> CurateConfig:
    """The config of conftest's clean_curation (tiny.yaml + helpers.CURATE_OVERRIDES), a fresh one per run."""
    return load_config(CurateConfig, CONFIGS / "curate/tiny.yaml", [*CURATE_OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def reference(clean_curation):
    """(inputs, snapshot) of one uninterrupted run on a plain local Ray into a local folder (conftest's
    clean_curation: the CLI): what every faulted run must equal, whatever its output location (an
    s3:// output holds the same bytes as a local one: tests/test_curate_s3.py)."""
    clean = LocalOutput(clean_curation.out)
    snap = snapshot(clean)
    assert_exactly_once(clean, snap, clean_curation.inputs)
    return clean_curation.inputs, snap


def test_curation_survives_a_worker_node_dying(reference, output):
    import ray
    import ray.data

    make_output, overrides = output
    inputs, reference = reference

    def cfg():
        return curate_config(*overrides)

    timings = {}
    had_local_ray = ray.is_initialized()
    ray.shutdown()

    t0 = time.time()
    cluster = None
    try:
        cluster = RayCluster()
        for _ in range(2):
            cluster.add_worker()
        timings["cluster_start_s"] = time.time() - t0
        # run_curation will find Ray up, as start_local_ray leaves it in the other tests
        ray.init(address=cluster.address, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.print_on_execution_start = False
        assert ray.get_runtime_context().get_node_id() == cluster.cluster.head_node.node_id  # the driver is on the head
        assert ray.cluster_resources()["CPU"] == 2 * WORKER["num_cpus"]

        faulted = make_output("faulted")
        result: dict = {}

        def curate():
            try:
                result["summary"] = run_curation(inputs, faulted.uri, cfg(), ray_address=cluster.address)
            except BaseException as err:  # noqa: BLE001  (reported below, with its type)
                result["error"] = err

        t0 = time.time()
        run = threading.Thread(target=curate, daemon=True)
        run.start()
        # The fault: as soon as the model actor is up (seen alive in the GCS). Analysis tasks have
        # run on both nodes by then and every source's rows are in flight, waiting for that actor:
        # with 4 CPUs the rest of the run takes only seconds after it comes up.
        seen = set()
        while run.is_alive() and time.time() - t0 < RUN_TIMEOUT_S:
            actors = pipeline_actors()
            seen.update(name for _, name in actors)
            if any("(Aesthetic)" in name for _, name in actors):
                break
            time.sleep(0.05)
        assert run.is_alive(), f"the run ended before the fault (actors seen: {sorted(seen)}): {result}"
        # the actors that hold the run's state live on the driver's node, whose loss ends the run anyway
        head = cluster.cluster.head_node.node_id
        assert [node for node, name in actors if "(DedupGate)" in name] == [head], actors
        assert [a["Address"]["NodeID"] for a in live_actors() if a["ActorClassName"] == "FirstClaims"] == [head]
        on_node = Counter(node for node, _ in actors)
        victim = max(cluster.workers, key=lambda w: on_node[w.node_id])
        timings["fault_at_s"] = time.time() - t0
        timings["sources_done_before_fault"] = len(faulted.names(f"{contract.WORK_DIR}/done"))
        cluster.remove_worker(victim)
        timings["lost_actors"] = sorted(name for node, name in actors if node == victim.node_id)
        assert timings["lost_actors"], actors  # the node took pipeline actors with it
        assert timings["sources_done_before_fault"] < len(inputs)

        run.join(RUN_TIMEOUT_S)
        assert not run.is_alive(), f"the run hung after losing a node ({RUN_TIMEOUT_S} s)"
        timings["faulted_run_s"] = time.time() - t0
        print("multinode timings:", timings)
        if "error" in result:  # the run gave up: a worker node's loss must be survived in the run itself
            raise AssertionError("the run failed after losing a worker node") from result["error"]

        after = snapshot(faulted)
        assert_exactly_once(faulted, after, inputs)
        assert after["shards"] == reference["shards"]  # same paths, same bytes
        for name in ("index", "sources", "clips"):
            assert after[name].equals(reference[name]), name
        assert after["counts"] == reference["counts"]
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if had_local_ray:
            start_local_ray()  # leave Ray as the session had it: a local instance up
