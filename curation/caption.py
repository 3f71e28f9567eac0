"""The pipeline's caption stage: dense structured captions for every candidate clip.

The captioner library (`captioner/`) does the work; this is its Ray Data stage. Wiring
(curation/pipeline.py): after the filters, before extract, as an actor pool whose actors may each
run several batches at once (`caption.resources.calls_per_actor`), so the engine's batch stays full
across Ray batches.

Per candidate clip:
    ok      clip["caption"] = dense caption, clip["caption_fields"] = {subjects, actions, scene,
            camera_motion, shot_type, lighting, style, on_screen_text, dense, short},
            clip["caption_provenance"] = {model, model_digest, adapter, prompt_version, prompt_hash,
            sampling, seed, request: {id, seed, temperature, attempt, qa_notes}, ...},
            clip["grounding"] = the fields checked against the clip's measurements (curation.grounding;
            a contradiction of a field whose policy is `reject` rejects the clip; one whose policy is
            `recaption` asks the model once more with the measured facts: provenance `recaption`)
    failed  clip["status"] = "failed", clip["reason"] = "caption: <why>" (after one retry): the clip
            stays out of the shards and is listed in manifest/clips.parquet.
    left    the engine could not answer (endpoint unreachable after its retries, engine dead twice,
            out of memory: spacetime.faults): clip["status"] = "deferred"; its source gets no
            completion record, and the rerun captions it. Never a fate.

A dead engine (vLLM's EngineDeadError) is restarted once per batch before the batch is left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

from captioner.config import CaptionConfig
from captioner.core import CaptionResult, Captioner, ClipTask
from captioner.frames import from_sampled
from curation.grounding import apply_policy, facts, ground, wants_recaption
from curation.stage import BatchStage, add_batch_time, defer
from spacetime.errors import describe
from spacetime.faults import InfrastructureError, is_infrastructure
from spacetime.frames import decode_frames

log = logging.getLogger(__name__)


class Caption(BatchStage):
    name = "caption"

    def __init__(self, cfg: CaptionConfig, captioner: Captioner | None = None, grounding=None):
        """`cfg`: the `caption` section. `captioner`: share an already loaded engine (tests,
        notebooks); by default each actor loads its own, once. `grounding`: the `grounding` section
        (curation.grounding): each caption's checkable fields against the clip's measurements."""
        super().__init__(cfg)
        self.grounding = grounding
        self.owns_captioner = captioner is None
        self.captioner = captioner or Captioner(cfg)
        self.restart_lock = asyncio.Lock()

    # Ray Data runs an async __call__ concurrently (max_concurrent_calls_per_actor), which is what
    # keeps requests from the next batch flowing into the engine while this one finishes.
    async def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        metas = [json.loads(m) for m in batch["meta"]]
        sampled = list(batch["sampled"])
        todo = [i for i, m in enumerate(metas) if self.wanted(m)]
        tasks = self._tasks([(metas[i], sampled[i]) for i in todo])
        if tasks:
            try:
                again = self._apply([metas[i] for i in todo], await self._acaption(tasks))
            except Exception as err:
                if not is_infrastructure(err):
                    raise
                again = {}
                for i in todo:  # the engine died again (or cannot start): the rerun captions them
                    if metas[i]["clip"]["status"] == "candidate":
                        defer(metas[i]["clip"], f"caption: {describe(err)}")
            if again:
                try:
                    self._reapply(again, await self._acaption(self._with_facts(tasks, again)))
                except Exception as err:
                    if not is_infrastructure(err):
                        raise
                    for meta, _ in again.values():  # asked again, never answered: the rerun does both
                        defer(meta["clip"], f"caption: recaption: {describe(err)}")
        add_batch_time([metas[i] for i in todo], self.name, t0)  # batches overlap in time: wall time per row
        return {"meta": [json.dumps(m) for m in metas], "sampled": sampled}

    async def _acaption(self, tasks: list[ClipTask]) -> dict[str, CaptionResult]:
        """The batch's results; if the engine dies under it, a new engine (one per actor, however many
        batches saw it die) and the batch once more."""
        captioner = self.captioner
        try:
            if captioner is None:
                raise InfrastructureError("the caption engine failed to restart")
            return await captioner.acaption(tasks)
        except Exception as err:
            if not is_infrastructure(err) or not self.owns_captioner:
                raise
            async with self.restart_lock:
                if self.captioner is captioner:  # the first batch to see it dead restarts it
                    log.warning("caption engine failed (%s): starting a new one", describe(err))
                    self.captioner = None
                    if captioner is not None:
                        await asyncio.to_thread(captioner.close)
                    try:
                        self.captioner = await asyncio.to_thread(Captioner, self.cfg)
                    except Exception as start:  # a model that cannot load is the infrastructure's fault
                        raise InfrastructureError(f"the caption engine failed to restart: {describe(start)}") from start
            if self.captioner is None:
                raise InfrastructureError("the caption engine failed to restart") from err
            return await self.captioner.acaption(tasks)

    def process(self, items: list[tuple[dict, bytes]]) -> None:
        """The synchronous BatchStage entry point (direct calls; Ray uses the async __call__)."""
        tasks = self._tasks(items)
        if tasks:
            again = self._apply([meta for meta, _ in items], self.captioner.caption(tasks))
            if again:
                self._reapply(again, self.captioner.caption(self._with_facts(tasks, again)))

    def _tasks(self, items: list[tuple[dict, bytes]]) -> list[ClipTask]:
        """Videos of the clips; a clip whose frames cannot be prepared fails here."""
        tasks = []
        for meta, sampled in items:
            clip = meta["clip"]
            try:
                frames = decode_frames(sampled) if sampled else None
                if frames is None:
                    raise ValueError("no sampled frames")
                tasks.append(ClipTask(clip["clip_id"], from_sampled(clip, frames, self.cfg.frames,
                                                                    self.cfg.max_pixels)))
            except Exception as err:
                clip.update(status="failed", reason=f"caption: frames unusable: {err}")
        return tasks

    def _apply(self, metas: list[dict], results: dict[str, CaptionResult]) -> dict[str, tuple[dict, str]]:
        """Captions (or fates) onto the clips, each caption checked (curation.grounding). Returns the
        clips to ask again, {clip_id: (meta, measured facts)}: a field whose policy is `recaption`
        was contradicted."""
        again = {}
        for meta in metas:
            clip = meta["clip"]
            result = results.get(clip["clip_id"])
            if result is None:  # frames failed above
                continue
            if result.ok:
                clip.update(caption=result.caption, caption_fields=result.fields,
                            caption_provenance=result.provenance)
                checks = self._ground(clip)
                if checks and wants_recaption(checks, self.grounding):
                    again[clip["clip_id"]] = (meta, facts(checks, clip.get("scores") or {}, clip.get("ocr_text"),
                                                          self.grounding))
            elif result.infra:
                defer(clip, f"caption: {result.reason}")
            else:
                tries = f" ({result.attempts} attempts)" if result.attempts > 1 else ""
                clip.update(status="failed", reason=f"caption: {result.reason}{tries}")
        return again

    def _ground(self, clip: dict) -> list[dict] | None:
        if self.grounding is None or not self.grounding.enabled:
            return None
        checks = ground(clip["caption_fields"], clip["caption"], clip.get("scores") or {}, clip.get("ocr_text"),
                        self.grounding)
        apply_policy(clip, checks, self.grounding)
        return checks

    @staticmethod
    def _with_facts(tasks: list[ClipTask], again: dict) -> list[ClipTask]:
        return [dataclasses.replace(t, facts=again[t.clip_id][1]) for t in tasks if t.clip_id in again]

    def _reapply(self, again: dict[str, tuple[dict, str]], results: dict[str, CaptionResult]) -> None:
        """The answers asked with the measured facts: a new caption that passes QA replaces the first
        and is checked again (what it still contradicts is flagged); otherwise the first stays, flagged.
        The provenance's `recaption` records the facts, the fields, and the first caption or the failure."""
        for clip_id, (meta, known) in again.items():
            clip, result = meta["clip"], results.get(clip_id)
            note = {"facts": known, "contradicted": [c["field"] for c in clip["grounding"] if c["verdict"] == "contradicts"]}
            if result is not None and result.infra:
                defer(clip, f"caption: recaption: {result.reason}")
            elif result is None or not result.ok:
                clip["caption_provenance"] = {**clip["caption_provenance"],
                                              "recaption": {**note, "failed": result.reason if result else "no answer"}}
            else:
                if self.captioner is not None:  # the first caption no longer holds its text
                    self.captioner.duplicates.release(clip_id, clip["caption"])
                first = {"dense": clip["caption"], "request": clip["caption_provenance"].get("request")}
                clip.update(caption=result.caption, caption_fields=result.fields,
                            caption_provenance={**result.provenance, "recaption": {**note, "first": first}})
                self._ground(clip)

    def __del__(self):
        if getattr(self, "owns_captioner", False) and self.captioner is not None:
            self.captioner.close()
