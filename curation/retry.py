"""Running failed work again: `spacetime curate --retry-failed`, after a decoder or model upgrade.

A failure that is the input's own (bytes that do not decode, a score that raises on a clip, an answer
that fails the schema) is recorded as that source's or clip's fate, and a plain rerun does not touch it
(infrastructure failures are another matter: they are never a fate; spacetime.faults). Once the cause
is fixed, `--retry-failed` runs the failures of the latest published version again, in a new version:

- A source is retried when its status is `failed`, or any of its clips' is. It is processed again from
  its first byte as attempt N (N: the new version's number), with a completion record of its own
  (curation.rundir.RunDir.done_path(uri, N)); the earlier attempts' records are kept as they are.
- The clips an earlier attempt settled stay settled: a clip that was kept or rejected keeps its fate,
  and a kept clip stays in its shard (shards of published versions are never rewritten). The new
  attempt's split marks its clips that overlap a settled clip's frames `retained` (Split, with the
  settled spans in the row as `retain`): no filter, model or extraction works on them, and they are
  dropped from the merged record. Every other clip of the new attempt (one that failed before, or one
  a source that failed midway never reached) goes through every stage and gets a fate of its own.
- `merge` makes the source's new record: the earlier attempt's settled clips (with the decisions
  their unit made on them: near-duplicates, and the shard of each kept one), plus the new attempt's
  clips. The retry version's unit writes the new attempt's kept clips to new shards and decides their
  near-duplicates against every earlier unit's survivors, as for any new clip.
- Publishing takes each source's latest attempt (curation.publish.finalize), so the manifests list
  every source and clip once; the index lists every shard's clips, each once.
"""

from __future__ import annotations

from dataclasses import dataclass

from curation.duplicates import apply_near_duplicates
from curation.stage import RETAINED
from spacetime import contract
from spacetime.store import Store


@dataclass(frozen=True)
class Retry:
    """One source run again: as `attempt`, after `prior_attempt`, whose record unit `prior_unit` wrote."""

    attempt: int
    prior_attempt: int
    prior_unit: int


def failed_sources(store: Store, version: int, inputs: set[str]) -> tuple[list[str], int]:
    """(the sources of published `version` that failed or have a failed clip and are among `inputs`,
    sorted; how many such sources are not among `inputs`, so cannot be retried). Two columns of each
    manifest are read."""
    import pyarrow.parquet as pq

    folder = contract.version_dir(version)

    def columns(rel: str, names: list[str]) -> list[list]:
        table = pq.read_table(store.path(contract.version_file(folder, rel)), columns=names, filesystem=store.fs)
        return [table.column(n).to_pylist() for n in names]

    uris, statuses = columns(contract.SOURCES_MANIFEST, ["uri", "status"])
    failed = {u for u, s in zip(uris, statuses) if s == "failed"}
    owners, statuses = columns(contract.CLIPS_MANIFEST, ["source_uri", "status"])
    failed |= {u for u, s in zip(owners, statuses) if s == "failed"}
    return sorted(failed & inputs), len(failed - inputs)


def plan_retries(units: list[list[tuple[str, int]]], attempt: int) -> dict[str, Retry]:
    """The retries of version `attempt`: each of its retried sources (units' entries (uri, attempt)) ->
    its Retry, naming the latest earlier attempt and the unit that holds it."""
    latest: dict[str, tuple[int, int]] = {}
    retried = set()
    for n, unit in enumerate(units):
        for uri, a in unit:
            if a == attempt:
                retried.add(uri)
            elif a < attempt:
                latest[uri] = (a, n)
    return {u: Retry(attempt, *latest[u]) for u in sorted(retried)}


def settled_spans(record: dict) -> list[list[int]]:
    """The [start_frame, end_frame) of the clips of a completion record whose fate is settled: every
    clip but the failed ones."""
    return [[c["start_frame"], c["end_frame"]] for c in record["clips"] if c["status"] != "failed"]


def retain_settled(clips: list[dict], spans: list[list[int]]) -> None:
    """Mark the clips (the split's candidates) that overlap a settled span `retained`: their fate stands."""
    for c in clips:
        if any(c["start_frame"] < b and a < c["end_frame"] for a, b in spans):
            c["status"], c["reason"] = RETAINED, "settled by an earlier attempt"


def merge(prior: dict, prior_unit: dict, new: dict) -> dict:
    """A retried source's completion record: the settled clips of `prior` (its earlier attempt's record,
    with the near-duplicate decisions of `prior_unit`, the commit of the unit that wrote it, applied;
    each kept one with its shard), marked `retained`, plus the new attempt's clips (`new`: its record as
    the completion tracker builds it), in frame order. The source is the new attempt's."""
    apply_near_duplicates([prior], prior_unit.get("near_duplicates", {}))
    shard_of = {row["clip_id"]: row["shard"] for row in prior_unit["index"]}
    settled = [dict(c, retained=True, **({"shard": c.get("shard") or shard_of.get(c["clip_id"])}
                                         if c["status"] == "kept" else {}))
               for c in prior["clips"] if c["status"] != "failed"]
    adopted = [c for c in new["clips"] if c["status"] != RETAINED]
    clips = sorted(settled + adopted, key=lambda c: (c["start_frame"], c["clip_id"]))
    source = dict(new["source"], num_clips=len(clips), num_kept=sum(c["status"] == "kept" for c in clips))
    return dict(new, source=source, clips=clips)
