"""The clip record: ONE typed definition of `<key>.json`, the metadata of every sample in a shard.

The curation writer builds it field by field, `spacetime caption` rewrites its caption, and every
reader (the trainer's loader, captioner fine-tuning, recaption, caption upsampling examples, tests)
parses it with `ClipRecord.from_json`. Nothing else knows its keys.

    {"schema_version": 3, "clip_id": "3f0c…",                     # = the sample key
     "source": {"uri", "digest", "digest_kind"},                    # sha256 | size-etag
     "span": {"start_frame", "end_frame", "start_time", "end_time", "start_pts", "end_pts"},
     "fps", "width", "height", "num_frames", "duration", "rotation", "crop", "bucket",
     "extract_mode", "sampled_idx", "scores": {name: float}, "ocr_text",
     "caption": {"dense", "short", "subjects", "actions", "scene", "camera_motion", "shot_type",
                 "lighting", "style", "on_screen_text", "provenance": {...}} | null,
     "grounding": [{"field", "claim", "measured", "verdict"}],     # schema 3 (curation.grounding)
     "provenance": {package: version}}

Frames are decoded-frame indices of the source (`end_frame` exclusive); times are seconds from the
source's first frame; PTS are in the source stream's time base. `width`/`height` are the stored
clip's (upright, cropped). A record of a newer schema than this code reads is refused with an
error that says so; unknown keys are errors, never silently dropped. An older schema is read under
today's names (schema 1's score `border_area` is `picture_area`: the share of the frame inside black
bars, as it always was; its name read as the share cut away).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spacetime.errors import UserError

SCHEMA_VERSION = 3
# Versions still read: 1 named scores["picture_area"] `border_area` (spacetime.contract.RENAMED_SCORES);
# 2 had no `grounding` (read as none).
READS_VERSIONS = (1, 2, 3)


class RecordError(UserError, ValueError):
    """A `<key>.json` that is not a valid clip record; the message names the problem."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SourceRef(_Record):
    uri: str
    digest: str  # content digest of the source file (see curation.sources)
    digest_kind: str  # sha256 (of the bytes) | size-etag (s3 objects)


class Span(_Record):
    start_frame: int
    end_frame: int  # exclusive
    start_time: float  # seconds
    end_time: float
    start_pts: int | None = None  # source stream time base
    end_pts: int | None = None


class Caption(_Record):
    """The captioner's structured answer for the clip; `dense` is also the sample's `<key>.txt`."""

    dense: str
    short: str | None = None
    subjects: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    scene: str | None = None
    camera_motion: str | None = None
    shot_type: str | None = None
    lighting: str | None = None
    style: str | None = None
    on_screen_text: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)  # model, digests, prompt hash, sampling, seed


# The structured fields a captioner answers with, in answer order (captioner.schema builds on this).
CAPTION_FIELDS: tuple[str, ...] = ("subjects", "actions", "scene", "camera_motion", "shot_type", "lighting",
                                   "style", "on_screen_text", "dense", "short")


class GroundingCheck(_Record):
    """One caption field checked against what the pipeline measured (curation.grounding)."""

    field: str  # camera_motion | on_screen_text | lighting | shots (the dense caption)
    claim: str  # what the caption says
    measured: str  # the measurement it was checked against, e.g. "pan_x 0.21, pan_y 0.01, zoom 0.002"
    verdict: Literal["agrees", "contradicts", "unknown"]


class ClipRecord(_Record):
    schema_version: Literal[3] = SCHEMA_VERSION
    clip_id: str
    source: SourceRef
    span: Span
    fps: float
    width: int
    height: int
    num_frames: int
    duration: float  # seconds
    rotation: int = 0  # the source's display rotation, applied to the stored pixels
    crop: list[int] | None = None  # [x, y, w, h] of the upright source frame kept (borders filter)
    bucket: str
    extract_mode: Literal["copy", "partial", "reencode", "copy_only"] | None = None
    # copy_only clips (extract.copy_only) start on the keyframe before their span: a reader drops this
    # many leading frames of the file, then takes num_frames. 0 for every other mode.
    skip_frames: int = Field(default=0, ge=0)
    sampled_idx: list[int] = Field(default_factory=list)  # source frames the filters and captioner saw
    scores: dict[str, float] = Field(default_factory=dict)
    ocr_text: str | None = None  # burned-in text read by the text filter (subtitles, logos), if any
    caption: Caption | None = None
    grounding: list[GroundingCheck] = Field(default_factory=list)  # the caption's fields checked (schema 3)
    provenance: dict[str, Any] = Field(default_factory=dict)  # versions of the code that made the clip

    @property
    def dense_caption(self) -> str:
        return self.caption.dense if self.caption else ""

    @property
    def short_caption(self) -> str | None:
        return self.caption.short if self.caption else None

    def to_json(self) -> bytes:
        """Sorted-key UTF-8 JSON: the same record always gives the same bytes."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "record") -> "ClipRecord":
        """Parse and validate `<key>.json`; `where` names it in errors (e.g. "shard.tar:KEY.json")."""
        try:
            tree = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"{where}: not JSON ({err})") from None
        if not isinstance(tree, dict):
            raise RecordError(f"{where}: expected a JSON object, got {type(tree).__name__}")
        version = tree.get("schema_version")
        if version not in READS_VERSIONS:
            hint = ("written by a newer spacetime; upgrade to read it" if isinstance(version, int)
                    and version > SCHEMA_VERSION else "not a spacetime clip record (or a pre-release one); "
                    "rewrite the dataset with `spacetime curate`")
            raise RecordError(f"{where}: schema_version {version!r}, this spacetime reads "
                              f"{', '.join(map(str, READS_VERSIONS))}: {hint}")
        if version < SCHEMA_VERSION:  # an older record: today's names (its bytes on disk stay as they are)
            from spacetime.contract import upgrade_scores

            tree = dict(tree, schema_version=SCHEMA_VERSION, scores=upgrade_scores(tree.get("scores") or {}))
        try:
            return cls.model_validate(tree)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
            raise RecordError(f"{where}: invalid clip record: {problems}") from None
