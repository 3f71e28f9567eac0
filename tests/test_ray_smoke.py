"""Ray Data on 2 CPUs: an actor-pool stage with fractional CPUs next to task stages finishes (no
deadlock), keeps every row and runs its constructor once per actor, not per batch."""

import os

import ray

from tests.helpers import start_local_ray


class Square:
    def __init__(self):
        self.pid = os.getpid()  # "model loaded once per actor"

    def __call__(self, batch):
        batch["y"] = batch["id"] ** 2
        batch["pid"] = [self.pid] * len(batch["id"])
        return batch


def test_actor_pool_stage_on_two_cpus():
    start_local_ray()
    ds = ray.data.range(400, override_num_blocks=20)
    ds = ds.map(lambda r: {"id": r["id"]}, num_cpus=0.25)  # a task stage
    ds = ds.map_batches(Square, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5, batch_size=16)
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == list(range(400))
    assert all(r["y"] == r["id"] ** 2 for r in rows)
    # 25 batches ran in at most 2 actor processes: the constructor ("model load") ran once per actor,
    # not once per batch (Ray may route every batch to the first actor that is ready)
    assert 1 <= len({r["pid"] for r in rows}) <= 2
