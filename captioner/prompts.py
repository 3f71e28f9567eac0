"""Prompt text of the captioner and its digest (part of every caption's provenance).

Changing any text here changes `prompt_hash()`, so captions made with different prompts can be told
apart in the shards; `caption.prompt_version` is the human-readable label next to it.
"""

from __future__ import annotations

import hashlib
import json

from captioner.schema import CAMERA_MOTIONS, SHOT_TYPES, FieldLimits, schema_digest

SYSTEM = (
    "You are a meticulous video annotator writing training captions for a text-to-video model. "
    "Describe only what is visible. Never guess names, brands or intentions. Never start a caption "
    "with phrases like 'The video shows' or 'In this video': start with the subject."
)

CAPTION_INSTRUCTION = """\
Clip id: {clip_id}
The video is {duration:.1f} seconds long ({num_frames} frames shown, evenly spaced).
Answer with one JSON object with these keys, in this order:
- "clip_id": exactly "{clip_id}"
- "subjects": the main visible subjects, short noun phrases (at most {max_items})
- "actions": what the subjects do, short verb phrases (at most {max_items})
- "scene": the setting and background
- "camera_motion": one of {camera_motions}
- "shot_type": one of {shot_types}
- "lighting": light and colour
- "style": visual style (live action, animation, screen recording, ...), film look, quality
- "on_screen_text": visible text or captions, verbatim; "" if none
- "dense": a dense caption of at most {dense_chars} characters: subjects with their appearance, \
actions in temporal order, scene, camera, lighting and style, in plain present-tense sentences
- "short": a one-sentence caption of at most {short_chars} characters"""

# Appended to the instruction when a caption is asked again because it contradicted what the pipeline
# measured (curation.grounding, policy `recaption`); the facts are the clip's, in plain words.
FACTS_NOTE = """

Measured facts about this clip (from the pipeline's own measurements of the video; your answer must \
agree with them):
{facts}"""

UPSAMPLE_SYSTEM = (
    "You rewrite short video prompts into the dense captions a text-to-video model was trained on. "
    "Keep every element of the prompt, add plausible concrete visual detail (appearance, setting, "
    "motion, camera, lighting, style), and write in plain present-tense sentences."
)

UPSAMPLE_INSTRUCTION = """\
{examples}Prompt: {prompt}
Write one dense caption of at most {dense_chars} characters for this prompt.
Answer with one JSON object: {{"dense": "<the caption>"}}"""


def caption_instruction(clip_id: str, num_frames: int, duration: float, limits: FieldLimits) -> str:
    return CAPTION_INSTRUCTION.format(
        clip_id=clip_id, num_frames=num_frames, duration=duration, max_items=limits.max_items,
        camera_motions=", ".join(CAMERA_MOTIONS), shot_types=", ".join(SHOT_TYPES),
        dense_chars=limits.dense_chars, short_chars=limits.short_chars)


def facts_note(facts: str) -> str:
    return FACTS_NOTE.format(facts=facts.strip())


def upsample_instruction(prompt: str, examples: list[str] | None, limits: FieldLimits) -> str:
    shots = "".join(f"Example caption {i + 1}: {e.strip()}\n" for i, e in enumerate(examples or []))
    if shots:
        shots = "Captions in the style to follow:\n" + shots + "\n"
    return UPSAMPLE_INSTRUCTION.format(examples=shots, prompt=prompt.strip(), dense_chars=limits.dense_chars)


def prompt_hash(limits: FieldLimits) -> str:
    """sha256 (16 hex) of every prompt text and the answer schema's shape."""
    text = json.dumps([SYSTEM, CAPTION_INSTRUCTION, UPSAMPLE_SYSTEM, UPSAMPLE_INSTRUCTION,
                       schema_digest(limits)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
