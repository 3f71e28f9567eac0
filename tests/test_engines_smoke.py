"""vLLM (CPU build) serves the tiny random Qwen2.5-VL: the offline engine on a video and the
OpenAI-compatible server on an image (conftest's vllm_server, the session's). Each engine runs in its
own process group, which is torn down (and checked to be gone) after the test, or for the server at
the session's end."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import pids_alive

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 240

# Runs in a fresh interpreter, which keeps vLLM's memory and threads out of the test process. The
# engine core runs inside that interpreter (VLLM_ENABLE_V1_MULTIPROCESSING=0): it starts in about half
# the time of a spawned engine core on 2 cores; the server test covers the multiprocess engine.
_OFFLINE_SCRIPT = r'''
import json, sys
import av, psutil
from vllm import LLM, SamplingParams


def decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate)
    import numpy as np
    meta = {  # Qwen2.5-VL needs the metadata of numpy frames (fps sets its temporal positions)
        "fps": fps,
        "duration": len(frames) / fps,
        "total_num_frames": len(frames),
        "frames_indices": list(range(len(frames))),
        "video_backend": "pyav",
        "do_sample_frames": False,
    }
    return np.stack(frames), meta


def main():
    model, video, n_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    llm = LLM(
        model=model,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        max_model_len=1024,
        limit_mm_per_prompt={"image": 0, "video": 1},
        seed=0,
    )
    engine_pids = [p.pid for p in psutil.Process().children(recursive=True)]
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Describe this video.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    params = SamplingParams(max_tokens=n_tokens, min_tokens=n_tokens, ignore_eos=True, temperature=0.0)
    request = {"prompt": prompt, "multi_modal_data": {"video": decode(video)}}
    first, second = llm.generate([request, request], params, use_tqdm=False)
    print("RESULT " + json.dumps({
        "engine_pids": engine_pids,
        "prompt_token_ids": list(first.prompt_token_ids),
        "token_ids": [list(first.outputs[0].token_ids), list(second.outputs[0].token_ids)],
        "text": first.outputs[0].text,
        "finish_reason": first.outputs[0].finish_reason,
    }), flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
'''


def _kill_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group we started, then SIGKILL whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the engine core / workers, if they outlived the parent
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _expected_video_tokens(model_dir: str, frames: list[np.ndarray]) -> int:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    grid = processor.video_processor(videos=[frames], return_tensors="pt")["video_grid_thw"][0]
    return int(grid.prod()) // processor.video_processor.merge_size**2


def test_vllm_offline_generates_from_video(tiny_models, synthetic_video, tmp_path):
    import av

    model_dir = tiny_models["vlm"]["path"]
    script = tmp_path / "run_vllm_offline.py"
    script.write_text(_OFFLINE_SCRIPT)
    n_tokens = 12
    proc = subprocess.Popen(
        [sys.executable, str(script), model_dir, str(synthetic_video), str(n_tokens)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    try:
        output, _ = proc.communicate(timeout=START_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, output[-6000:]
    result = json.loads(lines[-1][len("RESULT ") :])

    # exactly the requested number of tokens, deterministically, decoded to text
    assert [len(t) for t in result["token_ids"]] == [n_tokens, n_tokens]
    assert result["token_ids"][0] == result["token_ids"][1]
    assert result["finish_reason"] == "length"
    assert isinstance(result["text"], str) and result["text"]

    # vLLM expanded <|video_pad|> to as many tokens as transformers' processor computes for the frames
    with av.open(str(synthetic_video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    config = json.loads((Path(model_dir) / "config.json").read_text())
    n_video = result["prompt_token_ids"].count(config["video_token_id"])
    assert n_video == _expected_video_tokens(model_dir, frames) > 0

    # no process the engine started outlives the run
    deadline = time.monotonic() + 15
    while pids_alive(result["engine_pids"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not pids_alive(result["engine_pids"])


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible server
# --------------------------------------------------------------------------------------------------


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _post_json(url: str, body: dict, timeout: float = 60.0) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _png_data_url(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_openai_server_chat_completion_with_image(vllm_server, tiny_models):
    """conftest's vllm_server (the session's; at its end no process of it may outlive it)."""
    import psutil
    from transformers import AutoProcessor

    base = f"http://127.0.0.1:{vllm_server.port}"
    engine_pids = [p.pid for p in psutil.Process(vllm_server.proc.pid).children(recursive=True)]
    models = json.loads(_get(f"{base}/v1/models"))
    assert [m["id"] for m in models["data"]] == ["tiny-vlm"]

    image = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _png_data_url(image)}},
                {"type": "text", "text": "Describe this image in one sentence."},
            ],
        }
    ]
    body = {
        "model": "tiny-vlm",
        "messages": messages,
        "max_tokens": 8,
        "min_tokens": 8,  # vLLM extensions: a deterministic length from a random model
        "ignore_eos": True,
        "temperature": 0.0,
    }
    response = _post_json(f"{base}/v1/chat/completions", body)
    assert response["object"] == "chat.completion" and response["model"] == "tiny-vlm"
    choice = response["choices"][0]
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 8

    # the server rendered the chat template and expanded the image exactly as transformers does
    processor = AutoProcessor.from_pretrained(tiny_models["vlm"]["path"])
    hf_messages = [{"role": "user", "content": [{"type": "image"}, messages[0]["content"][1]]}]
    prompt = processor.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    hf_inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert response["usage"]["prompt_tokens"] == hf_inputs["input_ids"].shape[1]
    assert engine_pids, "expected the server's engine core in a child process"
