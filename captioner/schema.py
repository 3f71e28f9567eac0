"""The caption answer: its JSON schema (what the VLM decodes under) and its pydantic model (what
every answer is validated against).

One answer per clip, in this field order (the model writes the structured fields first, then the
dense caption that draws on them, then the short one):

    clip_id        the id of the clip the request was about, echoed back (the binding check)
    subjects       list of short noun phrases
    actions        list of short verb phrases
    scene          where it takes place
    camera_motion  one of CAMERA_MOTIONS
    shot_type      one of SHOT_TYPES
    lighting, style, on_screen_text ("" when there is none)
    dense          the dense caption (what goes to <key>.txt)
    short          a one-line caption

Every string and list has a length bound taken from `FieldLimits`, so an answer decoded under the
schema always closes: with `sampling.max_tokens` at `max_answer_tokens(limits)` or above, even a
model with random weights cannot run out of tokens inside the JSON (see `max_answer_tokens`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spacetime.config import StrictModel
from spacetime.record import CAPTION_FIELDS

CAMERA_MOTIONS = ("static", "pan", "tilt", "zoom", "dolly", "tracking", "handheld", "aerial", "orbit",
                  "mixed", "unknown")
SHOT_TYPES = ("extreme_close_up", "close_up", "medium", "wide", "extreme_wide", "aerial", "pov", "mixed",
              "unknown")
TEXT_FIELDS = ("scene", "lighting", "style", "on_screen_text")
LIST_FIELDS = ("subjects", "actions")
# The fields of an answer besides the binding id: those of the stored caption (spacetime.record).
FIELDS = CAPTION_FIELDS


class FieldLimits(StrictModel):
    """Length bounds of the answer, in characters (JSON schema maxLength / maxItems)."""

    dense_chars: int = Field(1500, ge=16)
    short_chars: int = Field(200, ge=8)
    text_chars: int = Field(300, ge=8)  # scene, lighting, style, on_screen_text
    item_chars: int = Field(80, ge=4)  # one subject / action
    max_items: int = Field(8, ge=1)  # subjects, actions


class CaptionAnswer(BaseModel):
    """A decoded answer. Unknown keys are errors; lengths are checked against FieldLimits in QA
    (an endpoint that ignores the schema can return anything)."""

    model_config = ConfigDict(extra="forbid")

    clip_id: str
    subjects: list[str]
    actions: list[str]
    scene: str
    camera_motion: Literal[CAMERA_MOTIONS]  # type: ignore[valid-type]
    shot_type: Literal[SHOT_TYPES]  # type: ignore[valid-type]
    lighting: str
    style: str
    on_screen_text: str
    dense: str
    short: str

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in FIELDS}


def _text(max_chars: int, min_chars: int = 0) -> dict:
    return {"type": "string", "minLength": min_chars, "maxLength": max_chars}


def json_schema(clip_id: str, limits: FieldLimits) -> dict:
    """The schema of the answer about clip `clip_id` (its `clip_id` is a const: decoding can only
    echo it). Only keywords that vLLM's default backend (xgrammar) compiles natively are used:
    const, enum, minLength/maxLength without pattern, minItems/maxItems."""
    items = {"type": "array", "items": _text(limits.item_chars, 1), "minItems": 1, "maxItems": limits.max_items}
    props = {
        "clip_id": {"type": "string", "const": clip_id},
        "subjects": items,
        "actions": items,
        "scene": _text(limits.text_chars, 1),
        "camera_motion": {"type": "string", "enum": list(CAMERA_MOTIONS)},
        "shot_type": {"type": "string", "enum": list(SHOT_TYPES)},
        "lighting": _text(limits.text_chars, 1),
        "style": _text(limits.text_chars, 1),
        "on_screen_text": _text(limits.text_chars),
        "dense": _text(limits.dense_chars, 1),
        "short": _text(limits.short_chars, 1),
    }
    return {"type": "object", "title": "caption", "properties": props, "required": list(props),
            "additionalProperties": False}


# Worst case bytes of one string character in JSON: a \uXXXX escape. Every token of a byte-level
# BPE decodes to at least one byte, so bytes bound tokens.
_MAX_BYTES_PER_CHAR = 6


def max_answer_tokens(limits: FieldLimits, clip_id_chars: int = 64) -> int:
    """An upper bound on the tokens of any answer valid under `json_schema` (compact JSON, no
    whitespace): every string at its maxLength, each character a 6-byte escape, one token per byte,
    plus keys, quotes and separators. Generous for a trained model (~4 characters per token); it is
    what guarantees that a random model's answer closes."""
    chars = (2 * limits.max_items * limits.item_chars + 4 * limits.text_chars + limits.dense_chars
             + limits.short_chars)
    strings = 2 * limits.max_items + 6  # quotes and commas around each string value
    keys = sum(len(k) + 4 for k in ("clip_id", *FIELDS))  # "key":
    enums = max(map(len, CAMERA_MOTIONS)) + max(map(len, SHOT_TYPES))
    return _MAX_BYTES_PER_CHAR * chars + 3 * strings + keys + enums + clip_id_chars + 16


def schema_digest(limits: FieldLimits) -> str:
    """Digest of the schema's shape (the clip id const replaced by a placeholder)."""
    text = json.dumps(json_schema("<clip_id>", limits), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
