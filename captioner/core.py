"""Captioning with checks: clip videos in, one verdict per clip id out.

    captioner = Captioner(cfg)                       # loads the engine once
    results = captioner.caption([ClipTask(clip_id, video), ...])   # {clip_id: CaptionResult}
    caption = captioner.upsample("a cat on a skateboard")
    captioner.close()

Every request carries its clip id twice: in the prompt and the schema (the answer must echo it as
`clip_id`, a const under guided decoding) and in the request id; results are keyed by clip id,
never matched by position. Each answer goes through captioner.qa; one that fails is retried once
(new seed, `sampling.retry_temperature`), then the clip is a caption failure with the reason.
All requests of a call are in flight together, so the engine batches them continuously.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

from captioner import prompts
from captioner.config import CaptionConfig
from captioner.engines import EngineLoop, Reply, Request
from captioner.frames import ClipVideo
from captioner.provenance import caption_provenance
from captioner.qa import DuplicateTracker, check_answer, check_text
from captioner.schema import json_schema

log = logging.getLogger(__name__)

ATTEMPTS = 2  # the first answer and one retry


@dataclass
class ClipTask:
    clip_id: str
    video: ClipVideo
    facts: str | None = None  # measured facts the caption must agree with (a recaption: curation.grounding)


@dataclass
class CaptionResult:
    clip_id: str
    ok: bool
    caption: str | None = None  # the dense caption (-> <key>.txt)
    fields: dict | None = None  # every answer field but clip_id (-> clip["caption_fields"])
    provenance: dict | None = None  # -> clip["caption_provenance"]
    reason: str | None = None  # why it failed (without the "caption: " prefix)
    infra: bool = False  # it failed for the infrastructure (Reply.infra): leave it for the rerun, not a fate
    attempts: int = 0
    output_tokens: int = 0  # over every attempt
    history: list[str] = field(default_factory=list)  # the verdict of each attempt


def request_seed(seed: int, key: str, attempt: int) -> int:
    """A per-request seed from (config seed, clip id, attempt): the same clip gets the same draw
    whatever batch or order it is in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}:{attempt}".encode()).digest()[:4], "big") & 0x7FFFFFFF


def caption_request(cfg: CaptionConfig, task: ClipTask, attempt: int = 0) -> Request:
    """The request of attempt `attempt` (0: first, 1: the retry) to caption `task`."""
    s = cfg.sampling
    temperature = s.temperature if attempt == 0 or s.retry_temperature is None else s.retry_temperature
    text = prompts.caption_instruction(task.clip_id, len(task.video.frames), task.video.duration, cfg.limits)
    key = task.clip_id
    if task.facts:  # asked again with the measured facts: its own request id and seed
        text, key = text + prompts.facts_note(task.facts), f"{task.clip_id}-facts"
    return Request(request_id=f"{key}-{attempt}", system=prompts.SYSTEM, text=text,
                   schema=json_schema(task.clip_id, cfg.limits), temperature=temperature, top_p=s.top_p,
                   max_tokens=cfg.max_tokens(), seed=request_seed(s.seed, key, attempt), video=task.video)


class Captioner:
    def __init__(self, cfg: CaptionConfig, duplicates: DuplicateTracker | None = None):
        self.cfg = cfg
        self.runner = EngineLoop(cfg)
        self.duplicates = duplicates or DuplicateTracker()
        self.provenance = caption_provenance(cfg, self.runner.engine.info())
        self.stats: Counter = Counter()

    # ---------------------------------------------------------------------------- requests
    def _request(self, task: ClipTask, attempt: int) -> Request:
        return caption_request(self.cfg, task, attempt)

    async def _send(self, request: Request) -> Reply:
        reply = await self.runner.engine.generate(request)
        self.stats["requests"] += 1
        self.stats["output_tokens"] += reply.output_tokens
        return reply

    async def _caption_one(self, task: ClipTask) -> CaptionResult:
        result = CaptionResult(task.clip_id, ok=False)
        for attempt in range(ATTEMPTS):
            request = self._request(task, attempt)
            reply = await self._send(request)
            result.attempts, result.output_tokens = attempt + 1, result.output_tokens + reply.output_tokens
            if reply.error is not None:  # the engine (after its own transport retries) gave up
                result.reason, result.infra = reply.error, reply.infra
                result.history.append(reply.error)
                self.stats["engine_errors"] += 1
                break
            verdict = check_answer(reply.text, reply.finish_reason, task.clip_id, self.cfg.qa, self.cfg.limits,
                                   request.max_tokens)
            if verdict.ok and self.cfg.qa.duplicates:
                owner = self.duplicates.add(task.clip_id, verdict.answer.dense)
                if owner is not None:
                    verdict.ok, verdict.reason = False, f"duplicate of clip {owner}"
            if verdict.ok:
                answer = verdict.answer
                result.ok, result.reason, result.caption, result.fields = True, None, answer.dense, answer.fields()
                result.provenance = {**self.provenance, "request": {
                    "id": request.request_id, "seed": request.seed, "temperature": request.temperature,
                    "attempt": attempt + 1, "output_tokens": result.output_tokens, "qa_notes": verdict.notes}}
                result.history.append("ok")
                break
            result.reason = verdict.reason
            result.history.append(verdict.reason)
            self.stats["qa_failures"] += 1
            log.debug("clip %s attempt %d failed QA: %s", task.clip_id, attempt + 1, verdict.reason)
        self.stats["captioned" if result.ok else "failed"] += 1
        return result

    # ------------------------------------------------------------------------------ entry points
    async def acaption(self, tasks: list[ClipTask]) -> dict[str, CaptionResult]:
        """Caption `tasks` (from any event loop); all requests are in flight together."""
        return await asyncio.wrap_future(self.runner.submit(self._caption_all(tasks)))

    def caption(self, tasks: list[ClipTask]) -> dict[str, CaptionResult]:
        """Sync form of `acaption` (not from inside a running event loop)."""
        return self.runner.run(self._caption_all(tasks))

    async def _caption_all(self, tasks: list[ClipTask]) -> dict[str, CaptionResult]:
        ids = [t.clip_id for t in tasks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate clip ids in one call: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
        results = await asyncio.gather(*(self._caption_one(t) for t in tasks))
        return {r.clip_id: r for r in results}

    def upsample(self, prompt: str, examples: list[str] | None = None) -> str:
        """A short prompt -> a dense caption in the dataset's style (few-shot `examples`: captions
        from the dataset). Raises RuntimeError naming the QA reason if both attempts fail."""
        limits = self.cfg.limits
        schema = {"type": "object", "properties": {"dense": {"type": "string", "minLength": 1,
                                                             "maxLength": limits.dense_chars}},
                  "required": ["dense"], "additionalProperties": False}
        key = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        reasons = []
        for attempt in range(ATTEMPTS):
            s = self.cfg.sampling
            temperature = s.temperature if attempt == 0 or s.retry_temperature is None else s.retry_temperature
            request = Request(request_id=f"upsample-{key}-{attempt}", system=prompts.UPSAMPLE_SYSTEM,
                              text=prompts.upsample_instruction(prompt, examples, limits), schema=schema,
                              temperature=temperature, top_p=s.top_p,
                              max_tokens=min(self.cfg.max_tokens(), 6 * limits.dense_chars + 32),
                              seed=request_seed(s.seed, key, attempt))
            reply = self.runner.run(self._send(request))
            if reply.error is not None:
                raise RuntimeError(f"upsample {prompt!r}: {reply.error}")
            caption, reason = check_text(reply.text, reply.finish_reason, self.cfg.qa, limits.dense_chars)
            if caption is not None:
                return caption
            reasons.append(reason)
        raise RuntimeError(f"upsample {prompt!r}: no acceptable caption after {ATTEMPTS} attempts: {reasons}")

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
