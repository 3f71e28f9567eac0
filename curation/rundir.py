"""The run state of one output under OUT/.work (contract.WORK_DIR): what lets a killed run resume.

The pipeline's write stage goes stages -> completion records (curation.completion) -> units
(curation.units) -> publish (curation.publish); every step keeps its state here, through RunDir.
Everything goes through the output's spacetime.store.Store (a local folder or s3://bucket/prefix), so
no node needs a folder shared with the others. Every file is published whole (spacetime.store: temp
name + rename locally, one upload on S3).

    OUT/.work/run.json              the fingerprint of the config the output is made with (RunDir.claim)
    OUT/.work/clips/<clip_id>.mp4   a clip the extract stage staged (published whole), until its unit is written
    OUT/.work/done/<source>.json    a source's completion record: from then on a rerun skips that source
    OUT/.work/retries/vNNNNNN/<source>.json   its record after a retry in version N (curation.retry)
    OUT/.work/dedup/<unit>.json     a unit's duplicate decisions (curation.duplicates.DedupGate)
    OUT/.work/units/<unit>.json     a unit's commit: its sources, shards and index rows
"""

from __future__ import annotations

import json

from curation.sources import source_key
from spacetime import contract
from spacetime.config import differences
from spacetime.errors import UserError
from spacetime.store import Store

# The run's state under OUT/.work (contract.WORK_DIR): staged clips, completion records, unit commits.
STAGING_DIR = f"{contract.WORK_DIR}/clips"
DONE_DIR = f"{contract.WORK_DIR}/done"
RETRIES_DIR = f"{contract.WORK_DIR}/retries"
UNITS_DIR = f"{contract.WORK_DIR}/units"
DEDUP_DIR = f"{contract.WORK_DIR}/dedup"
RUN_PATH = f"{contract.WORK_DIR}/run.json"


def staged_clip(clip_id: str) -> str:
    """Where the extract stage stages a clip until its unit is written."""
    return f"{STAGING_DIR}/{clip_id}.mp4"


class RunDirError(UserError, RuntimeError):
    """An output directory that cannot be used for this run; the message says why and what to do."""


class RunDir:
    """Paths and resumable state of one output (a spacetime.store.Store: local folder or s3://)."""

    def __init__(self, store: Store):
        self.store = store
        self.out = store.uri  # for messages

    # A source's attempt: 0 the first time it is processed; N when version N runs it again (`spacetime
    # curate --retry-failed`, curation.retry). Each attempt has its own completion record.
    def done_dir(self, attempt: int = 0) -> str:
        return f"{RETRIES_DIR}/v{attempt:06d}" if attempt else DONE_DIR

    def done_path(self, uri: str, attempt: int = 0) -> str:
        return f"{self.done_dir(attempt)}/{source_key(uri)}.json"

    def is_done(self, uri: str, attempt: int = 0) -> bool:
        return self.store.exists(self.done_path(uri, attempt))

    def done_keys(self, attempt: int = 0) -> set[str]:
        """The source keys (curation.sources.source_key) with a completion record of `attempt`: one listing."""
        return {name[:-len(".json")] for name in self.store.list(self.done_dir(attempt), ".json")}

    def record(self, uri: str, attempt: int = 0) -> dict:
        return json.loads(self.store.read_bytes(self.done_path(uri, attempt)))

    def unit_path(self, unit: int) -> str:
        return f"{UNITS_DIR}/{unit:06d}.json"

    def is_unit_done(self, unit: int) -> bool:
        return self.store.exists(self.unit_path(unit))

    def committed_units(self) -> set[int]:
        return {int(name[:-len(".json")]) for name in self.store.list(UNITS_DIR, ".json")}

    def unit(self, unit: int) -> dict:
        return json.loads(self.store.read_bytes(self.unit_path(unit)))

    def dedup_path(self, unit: int) -> str:
        return f"{DEDUP_DIR}/{unit:06d}.json"

    def decided_units(self) -> set[int]:
        """The units whose duplicate decisions are recorded: one listing."""
        return {int(name[:-len(".json")]) for name in self.store.list(DEDUP_DIR, ".json")}

    def dedup(self, unit: int) -> dict:
        return json.loads(self.store.read_bytes(self.dedup_path(unit)))

    def claim(self, fingerprint: dict) -> None:
        """Start or resume a run; refuse an output made with another config (inputs may grow: see
        curation.versions)."""
        if self.store.exists(RUN_PATH):
            old = json.loads(self.store.read_bytes(RUN_PATH))
            if old != fingerprint:
                changed = differences(old, fingerprint)
                more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
                raise RunDirError(
                    f"{self.out} holds a dataset made with other settings: {'; '.join(changed[:5])}{more}. A rerun "
                    "may add inputs, or change resources and transport, but not results. Use a new --output, or "
                    "delete this one to start over.")
        elif self.store.exists(contract.SUMMARY_PATH):
            raise RunDirError(f"{self.out}: finished output without run state; use a new --output")
        self.store.write(RUN_PATH, json.dumps(fingerprint, sort_keys=True, indent=1))
