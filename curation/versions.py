"""Dataset versions: a curation output grows by incremental runs, each publishing a new version.

A run's inputs are compared with every source of the earlier versions; the new ones (sorted) make the
next version, cut into work units numbered after the last version's. Only they are processed; the
shards of earlier versions are never touched. Publishing a version writes its metadata under
OUT/versions/vNNNNNN/, then the pointer OUT/latest.json (readers that know versions follow it: they
never see a half-written version), then replaces the stable paths (shards/index.parquet,
manifest/*.parquet, summary.json) one by one, each atomically, for readers that know nothing of
versions. Every version's metadata covers all sources so far: an input missing from a later run
stays in the dataset. Units follow from the versions' source lists (curation.units.plan_units), so
they are not stored.

    OUT/.work/versions/000001.json   {"version", "sources", "published"}

A killed run resumes its unpublished version when rerun with the same inputs; other inputs are
refused until that version is finished. A changed result-affecting config is refused (RunDir.claim):
one output holds one config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from curation.rundir import RunDir, RunDirError
from spacetime import contract


@dataclass
class Version:
    version: int
    sources: list[str]  # the URIs new in this version, sorted
    published: bool = False


class VersionLog:
    """The versions of one output, oldest first."""

    def __init__(self, run: RunDir):
        self.run, self.dir = run, f"{contract.WORK_DIR}/versions"

    def all(self) -> list[Version]:
        store = self.run.store
        return [Version(**json.loads(store.read_bytes(f"{self.dir}/{name}"))) for name in store.list(self.dir, ".json")]

    def save(self, version: Version) -> None:
        self.run.store.write(f"{self.dir}/{version.version:06d}.json", json.dumps(asdict(version), indent=1))

    def plan(self, uris: list[str]) -> tuple[Version | None, list[Version]]:
        """(the version this run builds, or None when nothing is new; the published versions before it)."""
        versions = self.all()
        if versions and not versions[-1].published:  # a killed run's version: finish it first
            current, earlier = versions[-1], versions[:-1]
            new = sorted(set(uris) - {u for v in earlier for u in v.sources})
            if new != current.sources:
                raise RunDirError(
                    f"{self.run.out}: version {current.version} is unfinished ({len(current.sources)} new sources); "
                    f"rerun with the same --input to finish it, then add inputs ({len(new)} new sources given)")
            return current, earlier
        new = sorted(set(uris) - {u for v in versions for u in v.sources})
        if not new:
            return None, versions
        current = Version(len(versions) + 1, new)
        self.save(current)
        return current, versions

    def publish(self, version: Version) -> None:
        version.published = True
        self.save(version)
