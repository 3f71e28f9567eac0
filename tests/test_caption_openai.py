"""The `openai` engine against real HTTP servers on 127.0.0.1: vLLM's OpenAI-compatible server with
the tiny random VLM (the session's, conftest's vllm_server; the outage test kills and restarts it), and a tiny HTTP server
in this process that answers chosen garbage (invalid JSON, another clip's id, truncation, loops, 503).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.parquet as pq
import pytest

from captioner.core import Captioner
from captioner.recaption import CAPTIONS_MANIFEST, run_recaption
from spacetime.contract import read_shard
from curation.caption import Caption
from spacetime import contract
from curation.pipeline import unpack
from tests.caption_support import caption_config, clips, make_dataset, stage_rows
from tests.helpers import free_port


def openai_config(model: str, base_url: str, **openai):
    settings = dict(base_url=base_url, served_model="tiny-vlm", concurrency=2, timeout=30, retries=1,
                    backoff=0.05, api_key_env="SPACETIME_TEST_CAPTION_KEY", **openai)
    return caption_config(model, engine="openai", openai=settings, resources=dict(batch_size=2))


# ------------------------------------------------------------------------------- vLLM server
@pytest.mark.slow
def test_openai_engine_captions_clips_through_the_stage(vllm_server, tiny_models, tmp_path):
    model = tiny_models["vlm"]["path"]
    cfg = openai_config(model, vllm_server.base_url)
    rows = [unpack(r) for r in stage_rows(clips(4))]
    with Captioner(cfg) as captioner:
        Caption(cfg, captioner=captioner).process(rows)
        assert captioner.stats["requests"] == 4  # every answer passed QA the first time
    for meta, _ in rows:
        clip = meta["clip"]
        assert clip["status"] == "candidate", clip.get("reason")
        assert clip["caption"] == clip["caption_fields"]["dense"] and clip["caption"]
        prov = clip["caption_provenance"]
        assert prov["engine"] == "openai" and prov["request"]["id"] == clip["clip_id"] + "-0"
        # the endpoint said what it serves (vLLM: the model's path) and the local files were hashed
        assert prov["endpoint"]["served_model"] == "tiny-vlm" and prov["endpoint"]["root"] == model
        assert prov["model_digest"]


@pytest.mark.slow
def test_server_killed_mid_run_then_a_rerun_fills_exactly_the_missing_captions(vllm_server, tiny_models, tmp_path):
    server, model = vllm_server, tiny_models["vlm"]["path"]
    cfg = openai_config(model, server.base_url)
    dataset, out = tmp_path / "dataset", tmp_path / "out"
    clip_ids = make_dataset(dataset, 8, per_shard=4)
    seen = []

    def kill_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            server.kill()  # SIGKILL of the server's process group, requests in flight or queued

    first = run_recaption(dataset, out, cfg, progress=kill_after_three)
    assert first["ok"] >= 3 and first["failed"] >= 1 and first["ok"] + first["failed"] == 8
    manifest = {r["clip_id"]: r for r in pq.read_table(out / CAPTIONS_MANIFEST).to_pylist()}
    failed = sorted(cid for cid, r in manifest.items() if r["status"] == "failed")
    assert len(failed) == first["failed"]
    assert all(manifest[cid]["reason"].startswith("caption: endpoint error") for cid in failed)
    written = {s["__key__"] for p in (out / contract.SHARDS_DIR).rglob("*.tar") for s in read_shard(p)}
    assert written == set(clip_ids) - set(failed)  # a failed caption is never written
    captions_before = {cid: r["caption"] for cid, r in manifest.items() if r["status"] == "ok"}

    server.start()  # same port
    second = run_recaption(dataset, out, cfg)
    assert second["this_run"]["requested"] == len(failed)  # exactly the missing ones
    assert second["ok"] == 8 and second["failed"] == 0
    manifest = {r["clip_id"]: r for r in pq.read_table(out / CAPTIONS_MANIFEST).to_pylist()}
    assert {cid: manifest[cid]["caption"] for cid in captions_before} == captions_before
    written = {s["__key__"] for p in (out / contract.SHARDS_DIR).rglob("*.tar") for s in read_shard(p)}
    assert written == set(clip_ids)


# ---------------------------------------------------------------------- a garbage-answering server
def good_answer(clip_id: str) -> str:
    return json.dumps(dict(clip_id=clip_id, subjects=["a cyclist"], actions=["rides downhill"], scene="a dirt trail",
                           camera_motion="tracking", shot_type="wide", lighting="daylight", style="live action",
                           on_screen_text="", dense=f"A cyclist rides down a dirt trail ({clip_id}).",
                           short="A cyclist rides."))


class Garbage:
    """Per clip (by index in the clips() list), what each successive HTTP request gets."""

    def __init__(self, clip_ids: list[str]):
        c = clip_ids
        loop = json.loads(good_answer(c[4]))
        loop["dense"] = "A cyclist. " + "the trail the trail " * 5
        wrong = good_answer(c[0]).replace(c[0], "ffffffffffffffffffff")
        self.script = {
            c[0]: [("invalid", '{"clip_id": "' + c[0] + '", "subjects": [')] * 2,
            c[1]: [("answer", wrong)] * 2,
            c[2]: [("truncated", good_answer(c[2])), ("answer", good_answer(c[2]))],
            c[3]: [("503", ""), ("answer", good_answer(c[3]))],
            c[4]: [("answer", json.dumps(loop))] * 2,
            c[5]: [("503", "")] * 3,  # an endpoint that stays overloaded
            c[6]: [("404", "")],  # a model name the endpoint does not serve
        }
        self.calls: dict[str, int] = {}
        self.auth: set[str] = set()
        self.lock = threading.Lock()

    def respond(self, body: dict) -> tuple[int, dict]:
        clip_id = body["response_format"]["json_schema"]["schema"]["properties"]["clip_id"]["const"]
        with self.lock:
            n = self.calls[clip_id] = self.calls.get(clip_id, 0) + 1
        kind, content = self.script[clip_id][min(n, len(self.script[clip_id])) - 1]
        if kind == "503":
            return 503, {"error": {"message": "overloaded", "type": "server_error"}}
        if kind == "404":
            return 404, {"error": {"message": "The model `tiny-vlm` does not exist.", "type": "NotFoundError"}}
        return 200, {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "length" if kind == "truncated" else "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}


@pytest.fixture
def garbage_server():
    holder: dict = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"object": "list", "data": [{"id": "tiny-vlm", "object": "model", "root": "elsewhere"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            holder["garbage"].auth.add(self.headers.get("Authorization"))
            self._send(*holder["garbage"].respond(body))

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield holder, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_garbage_answers_are_qa_failures_retried_once(garbage_server, tiny_models, tmp_path, monkeypatch, caplog):
    holder, base_url = garbage_server
    items = clips(7)
    ids = [c["clip_id"] for c, _ in items]
    holder["garbage"] = garbage = Garbage(ids)
    monkeypatch.setenv("SPACETIME_TEST_CAPTION_KEY", "sk-test-secret")
    cfg = openai_config(tiny_models["vlm"]["path"], base_url)
    rows = [unpack(r) for r in stage_rows(items)]
    with caplog.at_level("DEBUG"), Captioner(cfg) as captioner:
        Caption(cfg, captioner=captioner).process(rows)
    clip = {meta["clip"]["clip_id"]: meta["clip"] for meta, _ in rows}

    assert clip[ids[0]]["status"] == "failed" and clip[ids[0]]["reason"].startswith("caption: invalid JSON")
    assert clip[ids[1]]["status"] == "failed" and clip[ids[1]]["reason"].startswith("caption: clip id mismatch")
    assert clip[ids[4]]["status"] == "failed" and clip[ids[4]]["reason"].startswith("caption: repetition loop")
    for i in (0, 1, 4):
        assert clip[ids[i]]["reason"].endswith("(2 attempts)") and "caption" not in clip[ids[i]]
        assert garbage.calls[ids[i]] == 2  # the answer was retried exactly once
    # truncated first, fine on the retry: captioned, and the provenance says which attempt
    assert clip[ids[2]]["status"] == "candidate" and clip[ids[2]]["caption_provenance"]["request"]["attempt"] == 2
    # a 503 is a transport failure: retried by the client with backoff, not a QA retry
    assert clip[ids[3]]["status"] == "candidate" and clip[ids[3]]["caption_provenance"]["request"]["attempt"] == 1
    assert garbage.calls[ids[3]] == 2
    # the endpoint still failing after the retries, or not serving the model: the infrastructure's fault,
    # no fate (spacetime.faults): the clips are deferred, and their sources left for the rerun
    for i, why in ((5, "InternalServerError"), (6, "NotFoundError")):
        assert clip[ids[i]]["status"] == "deferred" and why in clip[ids[i]]["reason"], clip[ids[i]]
        assert clip[ids[i]]["reason"].startswith("caption: endpoint error") and "caption" not in clip[ids[i]]
    assert garbage.calls[ids[5]] == 2 and garbage.calls[ids[6]] == 1  # a 404 is not retried
    # the API key came from the named environment variable and went nowhere else
    assert garbage.auth == {"Bearer sk-test-secret"}
    assert "sk-test-secret" not in json.dumps(clip) and "sk-test-secret" not in caplog.text
    assert "sk-test-secret" not in json.dumps(cfg.model_dump())


class FactsAware:
    """Answers `pan` for a clip's first request; asked again with the measured facts in the prompt,
    answers `static` for the clips in `corrects` (and `pan` again for the others)."""

    def __init__(self, corrects: set[str]):
        self.corrects, self.prompts, self.auth = corrects, {}, set()
        self.lock = threading.Lock()

    def respond(self, body: dict) -> tuple[int, dict]:
        clip_id = body["response_format"]["json_schema"]["schema"]["properties"]["clip_id"]["const"]
        text = json.dumps(body["messages"])
        with self.lock:
            self.prompts.setdefault(clip_id, []).append(text)
        told = "Measured facts about this clip" in text
        answer = json.loads(good_answer(clip_id))
        answer["camera_motion"] = "static" if told and clip_id in self.corrects else "pan"
        answer["dense"] = f"A cyclist rides down a trail{' in a fixed frame' if told else ''} ({clip_id})."
        return 200, {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": json.dumps(answer)},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}


def test_recaption_policy_asks_again_with_the_measured_facts(garbage_server, tiny_models, monkeypatch):
    """grounding.policy.camera_motion: recaption. A caption claiming a pan on a camera measured still
    is asked once more with the facts in the prompt; the new caption replaces it and is checked again
    (agrees), the provenance keeps the facts and the first caption. A model that insists stays flagged."""
    from curation.settings import GroundingConfig

    holder, base_url = garbage_server
    items = clips(2)
    ids = [c["clip_id"] for c, _ in items]
    holder["garbage"] = server = FactsAware({ids[0]})
    monkeypatch.setenv("SPACETIME_TEST_CAPTION_KEY", "sk-test-secret")
    cfg = openai_config(tiny_models["vlm"]["path"], base_url)
    rows = [unpack(r) for r in stage_rows(items)]
    for meta, _ in rows:  # what the motion filter measures on a camera that does not move
        meta["clip"]["scores"] = {"camera_pan_x": 0.002, "camera_pan_y": -0.001, "camera_zoom": 0.0, "luma_mean": 100.0}
    grounding = GroundingConfig(policy={"camera_motion": "recaption"})
    with Captioner(cfg) as captioner:
        Caption(cfg, captioner=captioner, grounding=grounding).process(rows)
    fixed, insists = (meta["clip"] for meta, _ in rows)
    assert [len(server.prompts[i]) for i in ids] == [2, 2]  # asked once more each, no more
    assert "the camera is static (no pan, tilt or zoom)" in server.prompts[ids[0]][1]
    assert "Measured facts" not in server.prompts[ids[0]][0]
    assert fixed["status"] == "candidate" and fixed["caption_fields"]["camera_motion"] == "static"
    assert fixed["caption"].endswith(f"in a fixed frame ({ids[0]}).")
    [motion] = [g for g in fixed["grounding"] if g["field"] == "camera_motion"]
    assert motion["verdict"] == "agrees"
    prov = fixed["caption_provenance"]
    assert prov["request"]["id"] == f"{ids[0]}-facts-0"
    assert prov["recaption"]["contradicted"] == ["camera_motion"]
    assert prov["recaption"]["first"]["dense"] == f"A cyclist rides down a trail ({ids[0]})."
    assert prov["recaption"]["facts"] == "- camera_motion: the camera is static (no pan, tilt or zoom)"
    # still contradicted after the second answer: kept, flagged, and the provenance says it was asked
    assert insists["status"] == "candidate" and insists["caption_fields"]["camera_motion"] == "pan"
    assert [g["verdict"] for g in insists["grounding"] if g["field"] == "camera_motion"] == ["contradicts"]
    assert insists["caption_provenance"]["recaption"]["first"]["dense"] == f"A cyclist rides down a trail ({ids[1]})."
