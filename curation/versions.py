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

    OUT/.work/versions/000001.json   {"version", "sources", "retried", "published"}

`--retry-failed` adds to the new version the sources of the last one that failed or have a failed
clip (curation.retry): `retried`, each its own attempt, the version's number.

A killed run resumes its unpublished version when rerun with the same inputs; other inputs are
refused until that version is finished. A changed result-affecting config is refused (RunDir.claim):
one output holds one config.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

from curation.retry import failed_sources
from curation.rundir import RunDir, RunDirError
from spacetime import contract

log = logging.getLogger(__name__)


@dataclass
class Version:
    version: int
    sources: list[str]  # the URIs this version processes, sorted: the new ones and the retried ones
    published: bool = False
    retried: list[str] = field(default_factory=list)  # earlier versions' sources run again (curation.retry)

    def entries(self) -> list[tuple[str, int]]:
        """(uri, attempt) of each source: 0 for a new one, this version's number for a retried one."""
        again = set(self.retried)
        return [(u, self.version if u in again else 0) for u in self.sources]


class VersionLog:
    """The versions of one output, oldest first."""

    def __init__(self, run: RunDir):
        self.run, self.dir = run, f"{contract.WORK_DIR}/versions"

    def all(self) -> list[Version]:
        store = self.run.store
        return [Version(**json.loads(store.read_bytes(f"{self.dir}/{name}"))) for name in store.list(self.dir, ".json")]

    def save(self, version: Version) -> None:
        self.run.store.write(f"{self.dir}/{version.version:06d}.json", json.dumps(asdict(version), indent=1))

    def plan(self, uris: list[str], retry_failed: bool = False) -> tuple[Version | None, list[Version]]:
        """(the version this run builds, or None when it has nothing to do; the published versions
        before it). `retry_failed`: the new version also runs again the failures of the last one."""
        versions = self.all()
        if versions and not versions[-1].published:  # a killed run's version: finish it first
            current, earlier = versions[-1], versions[:-1]
            new = sorted(set(uris) - {u for v in earlier for u in v.sources})
            if new != sorted(set(current.sources) - set(current.retried)):
                raise RunDirError(
                    f"{self.run.out}: version {current.version} is unfinished ({len(current.sources)} new sources); "
                    f"rerun with the same --input to finish it, then add inputs ({len(new)} new sources given)")
            if retry_failed and not current.retried:
                raise RunDirError(f"{self.run.out}: version {current.version} is unfinished; rerun without "
                                  "--retry-failed to finish it, then retry the failures")
            return current, earlier
        new = sorted(set(uris) - {u for v in versions for u in v.sources})
        retried: list[str] = []
        if retry_failed and versions:
            retried, absent = failed_sources(self.run.store, versions[-1].version, set(uris))
            log.info("version %d: %d sources with a failure to retry%s", versions[-1].version, len(retried),
                     f" ({absent} more not among the inputs)" if absent else "")
        if not new and not retried:
            return None, versions
        current = Version(len(versions) + 1, sorted(new + retried), retried=retried)
        self.save(current)
        return current, versions

    def publish(self, version: Version) -> None:
        version.published = True
        self.save(version)
