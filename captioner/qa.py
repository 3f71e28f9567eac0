"""Checks on every caption answer. A failed answer is retried once by the caller, then recorded as a
caption failure; it is never written as a caption.

    check_answer(text, finish_reason, clip_id, cfg, limits) -> QAResult
        truncated      finish_reason "length": the answer hit max_tokens (even if the JSON parses)
        schema         not JSON, or not a CaptionAnswer (types, enums, unknown keys), or over a length limit
        clip id        the echoed clip_id is not the requested one (answer bound to the wrong clip)
        empty          dense or short caption blank (after boilerplate stripping)
        boilerplate    an opening like "The video shows": stripped (qa.boilerplate=strip, the
                       default: "The video shows a dog running" -> "A dog running"), or a failure (flag)
        repetition     a loop: a unit (with a letter or digit) repeated qa.loop_min_repeats+ times
                       in a row over qa.loop_min_chars+ characters, or too few distinct word 3-grams
                       (qa.min_distinct_ngrams), in dense, short and the text fields
    Duplicates     DuplicateTracker: the same dense caption (case/whitespace-insensitive) as
                   another clip's is a failure of the later one.

Reasons are short strings ("truncated at max_tokens=512", "clip id mismatch: ...") that end up in
clip["reason"] as "caption: <reason>".
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from pydantic import ValidationError

from captioner.config import QAConfig
from captioner.schema import LIST_FIELDS, TEXT_FIELDS, CaptionAnswer, FieldLimits


@dataclass
class QAResult:
    ok: bool
    reason: str | None = None
    answer: CaptionAnswer | None = None  # cleaned (stripped, boilerplate removed) when ok
    notes: list[str] = field(default_factory=list)  # non-fatal fixes (e.g. "stripped boilerplate")


def fail(reason: str) -> QAResult:
    return QAResult(False, reason)


# ----------------------------------------------------------------------------------- single checks
def strip_boilerplate(text: str, openings: list[str]) -> tuple[str, str | None]:
    """Remove a leading boilerplate phrase (case-insensitive, with a following ',', ':' or 'that').
    Returns (text, the phrase removed or None); the new first letter is capitalised."""
    stripped = text.lstrip()
    for opening in sorted(openings, key=len, reverse=True):  # longest first: "In this video," before "In"
        pattern = re.compile(r"^" + re.escape(opening) + r"(?!\w)(?:\s*[,:])?(?:\s+that)?\s*", re.IGNORECASE)
        match = pattern.match(stripped)
        if match and match.end() > 0:
            rest = stripped[match.end():]
            return (rest[:1].upper() + rest[1:]) if rest else "", opening
    return text, None


def find_loop(text: str, min_repeats: int, min_chars: int) -> str | None:
    """The repeated unit of the first loop in `text` (a unit of 1-100 characters with a letter or
    digit, repeated at least `min_repeats` times in a row, optionally space-separated, covering
    >= `min_chars`), else None. Runs of punctuation ("-----", "....") are not language loops."""
    pattern = re.compile(r"(.{1,100}?)(?:\s*\1){%d,}" % (min_repeats - 1), re.DOTALL)
    pos = 0
    while pos < len(text):
        match = pattern.search(text, pos)
        if not match:
            return None
        if len(match.group(0)) >= min_chars and re.search(r"\w", match.group(1)):
            return match.group(1)
        pos = max(match.end(), match.start() + 1)  # a loop overlapping this run shows up rotated later
    return None


def distinct_ngram_ratio(text: str, n: int = 3) -> float | None:
    words = text.lower().split()
    if len(words) < 30:
        return None  # too short to judge
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def repetition(text: str, cfg: QAConfig) -> str | None:
    unit = find_loop(text, cfg.loop_min_repeats, cfg.loop_min_chars)
    if unit is not None:
        return f"repetition loop ({unit[:40]!r} x{cfg.loop_min_repeats}+)"
    ratio = distinct_ngram_ratio(text)
    if ratio is not None and ratio < cfg.min_distinct_ngrams:
        return f"repetitive text (distinct 3-grams {ratio:.2f} < {cfg.min_distinct_ngrams})"
    return None


def over_limits(answer: CaptionAnswer, limits: FieldLimits) -> str | None:
    """Lengths the schema bounds (an endpoint that ignores response_format can exceed them)."""
    caps = {"dense": limits.dense_chars, "short": limits.short_chars, **{k: limits.text_chars for k in TEXT_FIELDS}}
    for name, cap in caps.items():
        if len(getattr(answer, name)) > cap:
            return f"{name} longer than {cap} characters"
    for name in LIST_FIELDS:
        items = getattr(answer, name)
        if len(items) > limits.max_items or any(len(x) > limits.item_chars for x in items):
            return f"{name} over {limits.max_items} items of {limits.item_chars} characters"
    return None


# ------------------------------------------------------------------------------------ the check
def check_answer(text: str, finish_reason: str | None, clip_id: str, cfg: QAConfig, limits: FieldLimits,
                 max_tokens: int | None = None) -> QAResult:
    """Validate one raw answer about `clip_id`; returns the cleaned answer when it passes."""
    if finish_reason == "length":
        return fail(f"truncated at max_tokens={max_tokens}" if max_tokens else "truncated at the token limit")
    if not text or not text.strip():
        return fail("empty answer")
    try:
        answer = CaptionAnswer.model_validate_json(text)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return fail(f"invalid JSON: {first['msg']}")
        where = ".".join(str(p) for p in first["loc"])
        return fail(f"schema: {where}: {first['msg']}")
    if answer.clip_id != clip_id:
        return fail(f"clip id mismatch: asked about {clip_id}, answer is about {answer.clip_id[:64]!r}")
    if (why := over_limits(answer, limits)) is not None:
        return fail(f"schema: {why}")
    return clean(answer, cfg)


def clean(answer: CaptionAnswer, cfg: QAConfig) -> QAResult:
    """Strip whitespace and boilerplate, then the empty and repetition checks on the captions."""
    values = answer.model_dump()
    notes = []
    for name in ("subjects", "actions"):
        values[name] = [x.strip() for x in values[name] if x.strip()]
    for name in (*TEXT_FIELDS, "dense", "short"):
        values[name] = " ".join(values[name].split())  # collapse whitespace runs and newlines
    for name in ("dense", "short"):
        values[name], opening = strip_boilerplate(values[name], cfg.boilerplate_openings)
        if opening is not None:
            if cfg.boilerplate == "flag":
                return fail(f"boilerplate opening in {name}: {opening!r}")
            notes.append(f"stripped {opening!r} from {name}")
        if not values[name]:
            return fail(f"empty {name} caption")
    for name in ("dense", "short", *TEXT_FIELDS):
        if (why := repetition(values[name], cfg)) is not None:
            return fail(f"{why} in {name}")
    return QAResult(True, None, CaptionAnswer.model_validate(values), notes)


def check_text(text: str, finish_reason: str | None, cfg: QAConfig, max_chars: int) -> tuple[str | None, str | None]:
    """QA of a free-form caption (prompt upsampling, answer {"dense": ...}): returns (caption, None)
    or (None, reason)."""
    import json

    if finish_reason == "length":
        return None, "truncated at the token limit"
    try:
        value = json.loads(text)
        caption = value["dense"] if isinstance(value, dict) else None
    except (ValueError, KeyError):
        return None, "invalid JSON"
    if not isinstance(caption, str):
        return None, "schema: dense is not a string"
    caption = " ".join(caption.split())
    if len(caption) > max_chars:
        return None, f"schema: dense longer than {max_chars} characters"
    caption, opening = strip_boilerplate(caption, cfg.boilerplate_openings)
    if opening is not None and cfg.boilerplate == "flag":
        return None, f"boilerplate opening: {opening!r}"
    if not caption:
        return None, "empty caption"
    if (why := repetition(caption, cfg)) is not None:
        return None, why
    return caption, None


# ------------------------------------------------------------------------------------ duplicates
def dense_key(text: str) -> str:
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:24]


class DuplicateTracker:
    """Dense captions seen so far (in one actor, or one `spacetime caption` run). The first clip to
    get a caption keeps it; a later clip with the same caption fails QA (and is retried once)."""

    def __init__(self):
        self.owner: dict[str, str] = {}

    def add(self, clip_id: str, dense: str) -> str | None:
        """Register `dense` for `clip_id`; returns the clip id it duplicates, or None."""
        key = dense_key(dense)
        owner = self.owner.setdefault(key, clip_id)
        return None if owner == clip_id else owner

    def release(self, clip_id: str, dense: str) -> None:
        if self.owner.get(dense_key(dense)) == clip_id:
            del self.owner[dense_key(dense)]
