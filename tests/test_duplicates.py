"""curation.duplicates: the dedup gate decides in unit order whatever order rows arrive in, releases
a unit's rows only with its decisions, strips what the output discards, records the decisions and
replays them on a rerun; the probe's digest claims only ever name an earlier source."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from curation.duplicates import DedupGate, FirstClaims
from curation.settings import DedupConfig
from spacetime.store import Store


def hashes(seed: int, frames: int = 6) -> list[int]:
    return [int(h) for h in np.random.default_rng(seed).integers(0, 2**63, frames, dtype=np.uint64)]


def clip(uri: str, n: int, seed: int, width: int = 640) -> dict:
    return {"clip_id": f"{uri}-{n}", "source_uri": uri, "status": "candidate", "fingerprint": hashes(seed),
            "num_frames": 48, "width": width, "height": 360, "start_time": 2.0 * n, "end_time": 2.0 * n + 2}


def rows(uri: str, digest: str, clips: list[dict], status: str = "ok") -> list[tuple[dict, bytes]]:
    """A source's rows as the split emits them: one segment, a row per clip (one clip-less row if none)."""
    source = {"uri": uri, "digest": digest, "status": status, "num_frames": 480}
    metas = [{"source": dict(source), "seg_index": 0, "final": True, "rows_in_segment": max(1, len(clips)),
              "clip": c} for c in clips] or [{"source": dict(source), "seg_index": 0, "final": True,
                                             "rows_in_segment": 1, "clip": None}]
    return [(m, b"frames") for m in metas]


# Two units of two sources: b is a.mp4's re-encode at a smaller size (its clip 0 looks like a's clip 0),
# c is a byte copy of a (same digest), d has a clip like a's clip 1 (an earlier unit's survivor).
SOURCES = {
    "a.mp4": ("da", [clip("a.mp4", 0, 1), clip("a.mp4", 1, 2)]),
    "b.mp4": ("db", [clip("b.mp4", 0, 1, width=320), clip("b.mp4", 1, 3)]),
    "c.mp4": ("da", [clip("c.mp4", 0, 1), clip("c.mp4", 1, 2)]),
    "d.mp4": ("dd", [clip("d.mp4", 0, 2, width=1280), clip("d.mp4", 1, 4)]),
}
UNITS = [[("a.mp4", 0), ("b.mp4", 0)], [("c.mp4", 0), ("d.mp4", 0)]]


def feed(gate: DedupGate, uris: list[str], seed: int = 0, deferred: str | None = None) -> list[dict]:
    """The sources' rows in a shuffled order, a row per call; what the gate released, in order."""
    all_rows = [r for u in uris for r in rows(u, SOURCES[u][0], [dict(c) for c in SOURCES[u][1]])]
    for meta, _ in all_rows:
        if meta["source"]["uri"] == deferred:
            meta["source"]["status"] = "deferred"
    random.Random(seed).shuffle(all_rows)
    released = []
    for meta, sampled in all_rows:
        for batch in gate({"meta": [json.dumps(meta)], "sampled": [sampled]}):
            released += [(json.loads(m), s) for m, s in zip(batch["meta"], batch["sampled"])]
    return released


def fates(released) -> dict:
    out = {}
    for meta, sampled in released:
        c = meta.get("clip")
        if c:
            out[c["clip_id"]] = (c["status"], c.get("duplicate_of"), bool(sampled))
        out[meta["source"]["uri"]] = (meta["source"]["status"], meta["source"].get("duplicate_of"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_gate_decides_in_unit_order_whatever_the_arrival_order(tmp_path, seed):
    gate = DedupGate(DedupConfig(), UNITS, [e for u in UNITS for e in u], Store(str(tmp_path / f"out{seed}")))
    released = feed(gate, ["a.mp4", "b.mp4", "c.mp4", "d.mp4"], seed)
    assert len(released) == 8  # every row comes out once (c's two without their clips)
    got = fates(released)
    # unit 0: a's clip 0 (640 wide) beats b's smaller copy of it, which is stripped of its frames
    assert got["b.mp4-0"] == ("rejected", "a.mp4-0", False) and got["a.mp4-0"] == ("candidate", None, True)
    assert got["b.mp4-1"] == ("candidate", None, True) and got["a.mp4-1"] == ("candidate", None, True)
    # unit 1: c is a byte copy of a (no clip goes on); d's clip 0 matches a's clip 1, kept earlier: it
    # loses although it is larger (published clips are never withdrawn)
    assert got["c.mp4"] == ("duplicate", "a.mp4") and not any(k.startswith("c.mp4-") for k in got)
    assert got["d.mp4-0"] == ("rejected", "a.mp4-1", False) and got["d.mp4-1"] == ("candidate", None, True)
    uris = [m["source"]["uri"] for m, _ in released]
    assert max(i for i, u in enumerate(uris) if u in ("a.mp4", "b.mp4")) < min(
        i for i, u in enumerate(uris) if u in ("c.mp4", "d.mp4"))  # unit 0's rows before unit 1's
    recorded = sorted(p.name for p in (tmp_path / f"out{seed}" / ".work" / "dedup").iterdir())
    assert recorded == ["000000.json", "000001.json"]


def test_a_unit_waits_for_its_last_row_and_for_every_earlier_unit(tmp_path):
    gate = DedupGate(DedupConfig(), UNITS, [e for u in UNITS for e in u], Store(str(tmp_path)))
    assert feed(gate, ["c.mp4", "d.mp4"]) == []  # unit 1 is complete, unit 0 is not: nothing goes on
    assert feed(gate, ["a.mp4"]) == []
    out = feed(gate, ["b.mp4"])
    assert sorted({m["source"]["uri"] for m, _ in out}) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]


def test_a_rerun_replays_the_recorded_decisions(tmp_path):
    """A killed run decided both units; its rerun processes b and d again (no record) and gets the
    decisions the first run made, without deciding again (a changed rule would show)."""
    store = Store(str(tmp_path))
    first = fates(feed(DedupGate(DedupConfig(), UNITS, [e for u in UNITS for e in u], store), list(SOURCES)))
    rerun = DedupGate(DedupConfig(), UNITS, [("b.mp4", 0), ("d.mp4", 0)], store)
    rerun.near.cfg = DedupConfig(keep="duration")  # deciding again would keep other clips: replaying does not
    again = fates(feed(rerun, ["b.mp4", "d.mp4"], seed=5))
    assert again == {k: v for k, v in first.items() if k.startswith(("b.mp4", "d.mp4"))}


def test_a_deferred_source_is_decided_on_the_rerun(tmp_path):
    """A source deferred by an infrastructure fault is left out of its unit's decisions (its rows go on
    for the tracker to leave it for the rerun); the rerun decides it against the units up to its own."""
    store = Store(str(tmp_path))
    released = feed(DedupGate(DedupConfig(), UNITS, [e for u in UNITS for e in u], store), list(SOURCES),
                    deferred="a.mp4")
    got = fates(released)
    assert got["a.mp4"] == ("deferred", None) and got["b.mp4-0"] == ("candidate", None, True)  # no a to lose to
    assert got["c.mp4"] == ("ok", None)  # a registered nothing: c is the first of those bytes in this run
    assert json.loads((tmp_path / ".work/dedup/000000.json").read_text())["missing"] == [["a.mp4", 0]]
    # the rerun: a is decided against every recorded unit; c, its copy, went on in its place and stays the
    # original (nothing published is withdrawn, and no clip id repeats)
    rerun = fates(feed(DedupGate(DedupConfig(), UNITS, [("a.mp4", 0)], store), ["a.mp4"]))
    assert rerun == {"a.mp4": ("duplicate", "c.mp4")}
    recorded = json.loads((tmp_path / ".work/dedup/000000.json").read_text())
    assert recorded["missing"] == [] and recorded["duplicates"] == {"a.mp4": "c.mp4"}


def test_a_deferred_sources_clips_meet_every_recorded_unit(tmp_path):
    """Deferred d: on the rerun its clip 0 (like a's clip 1, unit 0) is a near-duplicate, and its clip 1
    is new; a source still deferred goes on undecided."""
    store = Store(str(tmp_path))
    feed(DedupGate(DedupConfig(), UNITS, [e for u in UNITS for e in u], store), list(SOURCES), deferred="d.mp4")
    assert fates(feed(DedupGate(DedupConfig(), UNITS, [("d.mp4", 0)], store), ["d.mp4"], deferred="d.mp4")) == {
        "d.mp4": ("deferred", None), "d.mp4-0": ("candidate", None, True), "d.mp4-1": ("candidate", None, True)}
    rerun = fates(feed(DedupGate(DedupConfig(), UNITS, [("d.mp4", 0)], store), ["d.mp4"]))
    assert rerun["d.mp4-0"] == ("rejected", "a.mp4-1", False) and rerun["d.mp4-1"] == ("candidate", None, True)


def test_first_claims_name_only_an_earlier_source():
    claims = FirstClaims()
    assert claims.claim("x", 5, "f.mp4") is None  # probed first, though not first in order
    assert claims.claim("x", 7, "h.mp4") == "f.mp4"  # a later copy: certainly a duplicate
    assert claims.claim("x", 2, "c.mp4") is None  # an earlier copy: the gate will decide f and h
    assert claims.claim("x", 6, "g.mp4") == "c.mp4"
    assert claims.claim("y", 1, "b.mp4") is None


def test_the_gate_names_the_first_copy_whatever_the_probe_claimed(tmp_path):
    """h was claimed a duplicate of f at probe (f probed before c); the gate names c, the first."""
    units = [[("c.mp4", 0), ("f.mp4", 0), ("h.mp4", 0)]]
    gate = DedupGate(DedupConfig(), units, units[0], Store(str(tmp_path)))
    got = {}
    for uri, status in (("c.mp4", "ok"), ("f.mp4", "ok"), ("h.mp4", "duplicate")):
        for meta, sampled in rows(uri, "x", [], status):
            if status == "duplicate":
                meta["source"]["duplicate_of"] = "f.mp4"
            for batch in gate({"meta": [json.dumps(meta)], "sampled": [sampled]}):
                got.update(fates([(json.loads(m), s) for m, s in zip(batch["meta"], batch["sampled"])]))
    assert got == {"c.mp4": ("ok", None), "f.mp4": ("duplicate", "c.mp4"), "h.mp4": ("duplicate", "c.mp4")}


def test_a_clip_decided_again_is_not_its_own_duplicate(tmp_path):
    """--retry-failed runs a clip that failed after the gate again (same id, same fingerprint, in a later
    unit): it is not a near-duplicate of its first decision, and a rerun replays both units."""
    units = [[("a.mp4", 0)], [("a.mp4", 2)]]
    store = Store(str(tmp_path))
    gate = DedupGate(DedupConfig(), units[:1], [("a.mp4", 0)], store)
    feed(gate, ["a.mp4"])
    retry = DedupGate(DedupConfig(), units, [("a.mp4", 2)], store)
    got = fates(feed(retry, ["a.mp4"]))
    assert got["a.mp4-0"] == ("candidate", None, True) and got["a.mp4-1"] == ("candidate", None, True)
    replay = DedupGate(DedupConfig(), units, [("a.mp4", 2)], store)
    assert fates(feed(replay, ["a.mp4"])) == got
