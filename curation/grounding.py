"""Caption grounding: each structured caption field that a measured signal can confirm or contradict,
checked against that signal (issue #35). A caption that states what the video does not show teaches
the model to ignore text; the pipeline has measured these things already, so checking costs nothing.

    checks = ground(fields, dense, scores, ocr_text, cfg)    # [{field, claim, measured, verdict}]
    apply_policy(clip, checks, cfg)                          # `reject` policies reject the clip

Fields and signals (thresholds in `GroundingConfig`, curation/settings.py):
- camera_motion (and a pan direction the dense caption states) against the motion filter's global
  flow: `camera_pan_x` / `camera_pan_y` (the scene's median flow, frame widths per second: the scene
  moves left when the camera pans right) and `camera_zoom` (radial flow). "static" on a measured pan,
  tilt or zoom contradicts; "pan", "tilt" or "zoom" on a camera measured still contradicts; "pan" on a
  vertical-only movement (and "tilt" on a horizontal one) contradicts; "pans left" on a measured right
  pan contradicts. Motions the flow cannot tell apart (dolly, tracking, handheld, aerial, orbit,
  mixed, unknown) are `unknown`.
- on_screen_text against the text filter (PP-OCR): persistent text area `text_area` and what it read
  (`ocr_text`). No text claimed where text persists, text claimed where the OCR found none, or
  claimed words none of which the OCR read: contradicts. Without an OCR measurement: unknown.
- lighting against the exposure filter's mean luma: a bright / daylight claim on a dark clip, or a
  dark / night / dim claim on a bright one, contradicts.
- shots (the dense caption) against the shot detector: every clip is one shot (the split cuts at each
  transition found), so a caption that describes a cut ("cuts to", "the scene changes", "several
  shots", a montage) contradicts.

Each check records the field, the claim, the measurement and a verdict: `agrees`, `contradicts` or
`unknown`. The clip keeps them (record `grounding`, clips manifest column `grounding`), and the
report shows the contradiction rate per field with examples. Policy per field (`grounding.policy`):
`flag` (default: kept, the check recorded), `reject` (a contradiction rejects the clip with reason
`grounding: <field> ...`) or `recaption`: the caption stage asks the model once more with the measured
facts of the contradicted fields in the prompt (`facts`), keeps the new caption if it passes QA, and
checks it again (still contradicted: flagged); the provenance's `recaption` says so, with the facts
and the first caption.
"""

from __future__ import annotations

import re

VERDICTS = ("agrees", "contradicts", "unknown")
FIELDS = ("camera_motion", "on_screen_text", "lighting", "shots")

_PAN_PHRASE = re.compile(r"\bpan(?:s|ning|ned)?\s+(?:to\s+(?:the\s+)?)?(left|right)\b", re.IGNORECASE)
_BRIGHT = re.compile(r"\b(bright|daylight|sunny|sunlit|sunshine|well[- ]lit|midday|noon|high[- ]key)\b", re.IGNORECASE)
_DARK = re.compile(r"\b(dark|night|nighttime|dim|dimly|low[- ]light|low[- ]key|shadowy|gloomy|moonlit)\b", re.IGNORECASE)
# A dense caption that describes an edit: another shot inside the clip.
_CUT = re.compile(r"\b(cuts?\s+(?:to|away|back)|the\s+(?:scene|shot|view)\s+(?:changes|switches|shifts|cuts)|"
                  r"(?:switches|transitions?)\s+to\s+(?:a|an|another|the)\s+(?:new\s+|different\s+)?(?:shot|scene|view|angle)|"
                  r"montage|(?:several|multiple|two|three|a\s+series\s+of)\s+(?:different\s+)?shots)\b", re.IGNORECASE)
_WORD = re.compile(r"[^\W_]{3,}", re.UNICODE)


def _check(field: str, claim, measured: dict, verdict: str) -> dict:
    return {"field": field, "claim": "" if claim is None else str(claim),
            "measured": ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in measured.items()),
            "verdict": verdict}


def camera_motion(claim: str | None, dense: str, scores: dict, cfg) -> dict:
    keys = ("camera_pan_x", "camera_pan_y", "camera_zoom")
    if claim is None or any(k not in scores for k in keys):
        return _check("camera_motion", claim, {}, "unknown")
    px, py, zoom = (float(scores[k]) for k in keys)
    measured = {"pan_x": px, "pan_y": py, "zoom": zoom}
    still = max(abs(px), abs(py)) < cfg.still_speed and abs(zoom) < cfg.still_zoom
    moving_x, moving_y = abs(px) >= cfg.moving_speed, abs(py) >= cfg.moving_speed
    zooming = abs(zoom) >= cfg.moving_zoom
    direction = _PAN_PHRASE.search(dense or "")
    if direction and moving_x:
        said, seen = direction.group(1).lower(), "left" if px > 0 else "right"  # the scene moves opposite the camera
        claim = f"{claim}; dense: pans {said}"
        return _check("camera_motion", claim, measured, "agrees" if said == seen else "contradicts")
    if claim == "static":
        verdict = "contradicts" if (moving_x or moving_y or zooming) else "agrees" if still else "unknown"
    elif claim in ("pan", "tilt", "zoom"):
        if still:
            verdict = "contradicts"
        elif claim == "pan":
            verdict = "agrees" if moving_x else "contradicts" if moving_y and abs(px) < cfg.still_speed else "unknown"
        elif claim == "tilt":
            verdict = "agrees" if moving_y else "contradicts" if moving_x and abs(py) < cfg.still_speed else "unknown"
        else:
            verdict = "agrees" if zooming else "unknown"
    else:
        verdict = "unknown"
    return _check("camera_motion", claim, measured, verdict)


def on_screen_text(claim: str | None, scores: dict, ocr_text: str | None, cfg) -> dict:
    if claim is None or "text_area" not in scores:  # the OCR did not run on this clip
        return _check("on_screen_text", claim, {}, "unknown")
    area = float(scores["text_area"])
    read = (ocr_text or "").strip()
    measured = {"text_area": area, "ocr": repr(read[:60])}
    persists = area >= cfg.min_text_area and bool(read)
    claimed = claim.strip()
    if not claimed:
        verdict = "contradicts" if persists else "agrees"
    elif area <= 0.0 and not read:
        verdict = "contradicts"
    elif read:
        said, seen = {w.lower() for w in _WORD.findall(claimed)}, {w.lower() for w in _WORD.findall(read)}
        verdict = "unknown" if not said or not seen else "agrees" if said & seen else "contradicts"
    else:
        verdict = "unknown"
    return _check("on_screen_text", claim, measured, verdict)


def lighting(claim: str | None, scores: dict, cfg) -> dict:
    if claim is None or "luma_mean" not in scores:
        return _check("lighting", claim, {}, "unknown")
    luma = float(scores["luma_mean"])
    bright, dark = bool(_BRIGHT.search(claim)), bool(_DARK.search(claim))
    if bright == dark:  # no claim about brightness, or both ("bright lights in a dark room")
        verdict = "unknown"
    elif bright:
        verdict = "contradicts" if luma < cfg.dark_luma else "agrees" if luma >= cfg.bright_luma else "unknown"
    else:
        verdict = "contradicts" if luma >= cfg.bright_luma else "agrees" if luma < cfg.dark_luma else "unknown"
    return _check("lighting", claim, {"luma_mean": luma}, verdict)


def shots(dense: str) -> dict:
    """The dense caption's shots against the shot detector's: the split cuts a clip at every transition
    the detector found, so each clip is one shot. A caption describing a cut or several shots
    contradicts it; the claim is the phrase that does."""
    said = _CUT.search(dense or "")
    return _check("shots", said.group(0) if said else "one shot", {"transitions": 0},
                  "contradicts" if said else "agrees")


def ground(fields: dict, dense: str, scores: dict, ocr_text: str | None, cfg) -> list[dict]:
    """The checks of one captioned clip, one per field of FIELDS (module docstring)."""
    return [camera_motion(fields.get("camera_motion"), dense, scores, cfg),
            on_screen_text(fields.get("on_screen_text"), scores, ocr_text, cfg),
            lighting(fields.get("lighting"), scores, cfg),
            shots(dense)]


def apply_policy(clip: dict, checks: list[dict], cfg) -> None:
    """Record the checks on the clip; a contradiction of a field whose policy is `reject` rejects it
    (`recaption` is the caption stage's: what it still contradicts after that is flagged)."""
    clip["grounding"] = checks
    for check in checks:
        if check["verdict"] == "contradicts" and cfg.policy.get(check["field"], "flag") == "reject" \
                and clip["status"] == "candidate":
            clip["status"] = "rejected"
            clip["reason"] = (f"grounding: {check['field']} {check['claim']!r} contradicts the measured "
                              f"{check['measured']}")
            return


def facts(checks: list[dict], scores: dict, ocr_text: str | None, cfg) -> str:
    """The measured facts behind the contradicted checks, in plain words for the captioning model
    (one line per field: the policy `recaption`)."""
    lines = []
    for check in checks:
        if check["verdict"] != "contradicts":
            continue
        field = check["field"]
        if field == "camera_motion":
            px, py, zoom = (float(scores.get(k, 0.0)) for k in ("camera_pan_x", "camera_pan_y", "camera_zoom"))
            moves = [f"pans {'left' if px > 0 else 'right'}" if abs(px) >= cfg.moving_speed else "",
                     f"tilts {'up' if py > 0 else 'down'}" if abs(py) >= cfg.moving_speed else "",
                     f"zooms {'in' if zoom > 0 else 'out'}" if abs(zoom) >= cfg.moving_zoom else ""]
            moves = [m for m in moves if m]
            still = max(abs(px), abs(py)) < cfg.still_speed and abs(zoom) < cfg.still_zoom
            fact = ("the camera " + " and ".join(moves) if moves else
                    "the camera is static (no pan, tilt or zoom)" if still else "the camera moves little")
        elif field == "on_screen_text":
            read = (ocr_text or "").strip()
            fact = (f'text stays on screen; it reads "{read[:200]}"' if read and float(scores.get("text_area", 0)) > 0
                    else "no text stays on screen")
        elif field == "shots":
            fact = "the clip is one continuous shot, with no cut"
        else:
            luma = float(scores.get("luma_mean", 0.0))
            fact = f"the picture is {'dark' if luma < cfg.dark_luma else 'bright'} (mean luma {luma:.0f} of 255)"
        lines.append(f"- {field}: {fact}")
    return "\n".join(lines)


def wants_recaption(checks: list[dict], cfg) -> bool:
    """A field whose policy is `recaption` is contradicted."""
    return any(c["verdict"] == "contradicts" and cfg.policy.get(c["field"], "flag") == "recaption" for c in checks)
