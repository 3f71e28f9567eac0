"""Review decisions (spacetime.review) and the review page (curation.review, `spacetime review`).

The page is served by the real command (uvicorn on 127.0.0.1) over a real curation output with
captions (the tiny random VLM: meaningless text, real structure), driven in headless Chromium with
real key events; the loop test goes through the page's own HTTP API into `spacetime calibrate` and
`spacetime caption finetune`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest
import yaml

from spacetime import contract, review
from spacetime.standins import testmedia as tm
from spacetime.store import Store
from tests.helpers import ROOT, free_port, start_local_ray
from tests.test_curate import tiny_config


# ------------------------------------------------------------------------------ the decisions
def test_decisions_append_atomically_and_the_latest_counts(tmp_path):
    store = Store(tmp_path / "review")
    t0 = datetime(2026, 12, 7, tzinfo=timezone.utc)
    review.append(store, "a", "reject", "ann", status="kept", time=t0)
    review.append(store, "a", "accept", "bob", time=t0 + timedelta(seconds=1))  # a second opinion wins
    review.append(store, "b", "edit", "ann", dense="A dog runs.", time=t0 + timedelta(seconds=2))
    review.append(store, "b", "edit", "ann", short="Dog.", time=t0 + timedelta(seconds=3))  # dense stays
    review.append(store, "c", "reject", "ann", time=t0 + timedelta(seconds=4))
    review.append(store, "c", "edit", "ann", dense="Gone.", time=t0 + timedelta(seconds=5))
    files = sorted((tmp_path / "review").iterdir())
    assert len(files) == 6 and all(f.suffix == ".parquet" for f in files)  # one file per decision
    assert pq.read_table(files[0]).schema.equals(review.REVIEW_SCHEMA)
    state = review.current(review.read(store))
    assert state["a"]["verdict"] == "accept" and state["a"]["reviewer"] == "bob"
    assert (state["b"]["verdict"], state["b"]["dense"], state["b"]["short"]) == (None, "A dog runs.", "Dog.")
    assert review.labels(store) == {"a": False, "c": True}
    assert review.gold_captions(store) == {"b": {"dense": "A dog runs.", "short": "Dog."}}  # c was rejected
    for bad, match in ((dict(verdict="maybe"), "verdict 'maybe'"), (dict(verdict="edit"), "needs a dense"),
                       (dict(verdict="accept", dense="x"), "edited by an `edit`")):
        with pytest.raises(ValueError, match=match):
            review.append(store, "d", reviewer="ann", **bad)
    (tmp_path / "review" / "zz.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="zz.parquet: not a review decision file"):
        review.read(store)


# ------------------------------------------------------------------------------ a curated output
@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """Two kept clips and one the motion filter rejected, captioned (tiny VLM); the report's
    thumbnails and previews beside them."""
    from curation.pipeline import run_curation, stop_ray

    root = tmp_path_factory.mktemp("review")
    media = root / "media"
    media.mkdir()
    tm.make_moving(media / "moving.mp4", num_frames=50)
    tm.make_square(media / "square.mp4", num_frames=50)
    tm.make_static(media / "static.mp4", num_frames=50)
    start_local_ray()
    try:
        run_curation([str(media)], str(root / "out"), tiny_config())
    finally:
        stop_ray()
    clips = pq.read_table(root / "out" / contract.CLIPS_MANIFEST).to_pylist()
    assert sorted(c["status"] for c in clips) == ["kept", "kept", "rejected"], [(c["clip_id"], c["reason"]) for c in clips]
    return root / "out"


class Server:
    """`spacetime review OUT` as a user starts it, on a free port."""

    def __init__(self, out, reviewer: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "spacetime", "review", str(out), "--port", str(self.port),
                                      "--reviewer", reviewer, *extra], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while True:
            try:
                self.get("/api/clips")
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.close()
                    raise RuntimeError(f"spacetime review did not start: {self.proc.stdout.read()}")
                time.sleep(0.2)

    def get(self, path: str) -> dict:
        return json.load(urllib.request.urlopen(self.url + path, timeout=10))

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.load(urllib.request.urlopen(req, timeout=10))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def out(curated, tmp_path):
    """A copy of the curated output per test: each test's decisions are its own."""
    return shutil.copytree(curated, tmp_path / "out")


def test_api_lists_filters_and_serves_every_clip_with_its_media(out):
    server = Server(out, "ann")
    try:
        every = server.get("/api/clips")
        assert every["total"] == 3 and every["facets"]["status"] == {"kept": 2, "rejected": 1}
        assert every["facets"]["reason"] == {"motion": 1}
        [rejected] = server.get("/api/clips?status=rejected")["clips"]
        assert rejected["reason"].startswith("motion:") and server.get("/api/clips?reason=motion")["total"] == 1
        assert all(set(c) == {"clip_id", "status", "reason", "reason_key", "bucket", "shard", "flags", "decision"}
                   for c in every["clips"])  # the list's entries; a clip's whole row when opened
        assert [c["clip_id"] for c in server.get("/api/clips?offset=1&limit=1")["clips"]] == [every["clips"][1]["clip_id"]]
        for entry in every["clips"]:
            clip = server.get(f"/api/clips/{entry['clip_id']}")
            media = clip["media"]
            assert media["thumb"], clip["clip_id"]  # every sampled clip has its report thumbnail
            if clip["status"] == "kept":
                video = urllib.request.urlopen(server.url + media["video"], timeout=10).read()
                row = next(r for r in pq.read_table(out / contract.INDEX_PATH).to_pylist() if r["key"] == clip["clip_id"])
                assert video == contract.ShardReader().read(str(out / row["shard"]), clip["clip_id"])["mp4"]
                assert clip["caption"] and clip["grounding"] and "caption_alignment" in clip["scores"]
            else:
                assert media["video"] is None  # a rejected clip has no file in the shards
            with pytest.raises(urllib.error.HTTPError):  # a bad verdict is refused, nothing written
                server.post("/api/decisions", {"clip_id": clip["clip_id"], "verdict": "maybe"})
        with pytest.raises(urllib.error.HTTPError) as err:
            server.post("/api/decisions", {"clip_id": "nope", "verdict": "accept"})
        assert err.value.code == 404
        assert not (out / contract.REVIEW_DIR).exists()
    finally:
        server.close()


def test_an_s3_output_is_reviewed_in_place(curated, s3_server):
    """`spacetime review s3://...`: clips, videos and thumbnails read from the bucket; the decision is
    an object under OUT/review/ there."""
    import boto3

    from spacetime.config import S3Config

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="reviewed")
    for path in curated.rglob("*"):
        if path.is_file() and not path.relative_to(curated).parts[0].startswith("."):
            client.upload_file(str(path), "reviewed", f"out/{path.relative_to(curated).as_posix()}")
    server = Server("s3://reviewed/out", "ann", "--s3-endpoint", s3_server)
    try:
        clips = [server.get(f"/api/clips/{c['clip_id']}") for c in server.get("/api/clips?status=kept")["clips"]]
        assert len(clips) == 2
        video = urllib.request.urlopen(server.url + clips[0]["media"]["video"], timeout=10).read()
        assert video[4:8] == b"ftyp"
        assert urllib.request.urlopen(server.url + clips[0]["media"]["thumb"], timeout=10).read()[:2] == b"\xff\xd8"
        server.post("/api/decisions", {"clip_id": clips[0]["clip_id"], "verdict": "accept"})
    finally:
        server.close()
    store = review.review_store("s3://reviewed/out/review", S3Config(endpoint=s3_server))
    assert review.labels(store) == {clips[0]["clip_id"]: False}


def test_page_accept_reject_edit_survive_a_reload_in_chromium(out, tmp_path):
    """The issue's page test: accept one clip, reject one, edit a caption, reload: all three kept."""
    from tests.browser import Page

    server = Server(out, "ann")
    page = None
    try:
        page = Page(server.url + "/")
        page.wait_for("document.querySelectorAll('#list li').length === 3 && document.getElementById('dense')")
        ids = page.evaluate("Array.from(document.querySelectorAll('#list li')).map(li => li.dataset.clip)")
        shows = "document.getElementById('detail').dataset.clip === '{}'"  # a person looks before deciding
        page.wait_for(shows.format(ids[0]))
        page.press("a")  # the first clip: accepted, the page moves on
        page.wait_for(f"document.getElementById('msg').textContent === 'saved: {ids[0]} accept'")
        page.wait_for(shows.format(ids[1]))
        page.press("r")  # the second: rejected
        page.wait_for(f"document.getElementById('msg').textContent === 'saved: {ids[1]} reject'")
        page.wait_for(shows.format(ids[2]))
        page.press("e")  # the third: its dense caption rewritten
        page.wait_for("document.activeElement.id === 'dense'")
        page.evaluate("document.getElementById('dense').select()")
        page.type_text("A person rewrote this caption.")
        page.press("Enter", ctrl=True)
        page.wait_for(f"document.getElementById('msg').textContent === 'saved: {ids[2]} edit'")
        page.reload()
        page.wait_for("document.querySelectorAll('#list li').length === 3")
        badges = page.evaluate("Object.fromEntries(Array.from(document.querySelectorAll('#list li')).map(li =>"
                               " [li.dataset.clip, Array.from(li.querySelectorAll('.badge')).map(b => b.textContent)]))")
        page.press("j")
        page.press("j")
        page.wait_for(f"document.querySelector('#list li.on').dataset.clip === '{ids[2]}'")
        dense = page.evaluate("document.getElementById('dense').value")
        shot = page.screenshot(tmp_path / "review.png")
        assert not page.errors, page.errors
    finally:
        if page:
            page.close()
        server.close()
    assert "accept" in badges[ids[0]] and "reject" in badges[ids[1]] and "edited" in badges[ids[2]]
    assert dense == "A person rewrote this caption."
    rows = review.read(Store(out / contract.REVIEW_DIR))
    assert [(r["clip_id"], r["verdict"], r["reviewer"]) for r in rows] == [
        (ids[0], "accept", "ann"), (ids[1], "reject", "ann"), (ids[2], "edit", "ann")]
    assert rows[2]["dense"] == "A person rewrote this caption." and rows[2]["short"] is None
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_review_labels_calibrate_a_filter_and_edits_finetune_the_captioner(out, tmp_path, tiny_models):
    """The loop: decisions through the page's HTTP API; `spacetime calibrate motion --labels OUT/review`
    finds the threshold that separates what the person accepted from what they rejected;
    `spacetime caption finetune --data OUT/review` trains on the edited captions, and its loss falls."""
    from tests.test_caption_finetune import ft_config, run_finetune

    server = Server(out, "ann")
    try:
        clips = [server.get(f"/api/clips/{c['clip_id']}") for c in server.get("/api/clips")["clips"]]
        kept = [c for c in clips if c["status"] == "kept"]
        [static] = [c for c in clips if c["status"] == "rejected"]
        server.post("/api/decisions", {"clip_id": static["clip_id"], "verdict": "reject"})
        edits = {}
        for n, clip in enumerate(kept):
            server.post("/api/decisions", {"clip_id": clip["clip_id"], "verdict": "accept"})
            edits[clip["clip_id"]] = f"A grey pattern {'slides' if n else 'drifts'} across the frame."
            view = server.post("/api/decisions", {"clip_id": clip["clip_id"], "verdict": "edit",
                                                  "dense": edits[clip["clip_id"]], "short": "A pattern moves."})
            assert view["decision"]["dense"] == edits[clip["clip_id"]] and view["decision"]["verdict"] == "accept"
    finally:
        server.close()
    done = subprocess.run([sys.executable, "-m", "spacetime", "calibrate", "motion", "--labels",
                           str(out / contract.REVIEW_DIR), "--plot", str(tmp_path / "pr.png")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "3 labelled clips, 1 bad" in done.stdout
    threshold = float(done.stdout.split("--set filters.motion.min_motion=")[1].split()[0])
    assert static["scores"]["motion"] < threshold < min(c["scores"]["motion"] for c in kept)
    assert "(precision 1.000, recall 1.000)" in done.stdout

    from captioner.config import CaptionConfig
    from captioner.finetune import load_examples

    examples = load_examples(out / contract.REVIEW_DIR, CaptionConfig())
    assert {e.clip_id: (e.fields["dense"], e.fields["short"]) for e in examples} == {
        cid: (text, "A pattern moves.") for cid, text in edits.items()}
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump(ft_config(tiny_models, 80)))
    done = run_finetune(out / contract.REVIEW_DIR, tiny_models["vlm"]["path"], tmp_path / "run", config)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["steps"] == 80 and result["train_loss_first"] / result["train_loss_last"] >= 5.0, result


def _spacetime(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spacetime", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_label_studio_export_and_import_round_trip(out, tmp_path):
    """`review OUT export` writes Label Studio tasks (video URL, captions as pre-annotations) and the
    labeling config; the annotations of Label Studio's JSON export of them come back as decisions,
    once, and an export of another output is refused."""
    done = _spacetime("review", str(out), "--port", "9999", "export", "--to", str(tmp_path / "tasks.json"))
    assert done.returncode == 0, done.stderr
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    manifest = {c["clip_id"]: c for c in pq.read_table(out / contract.CLIPS_MANIFEST).to_pylist()}
    assert len(tasks) == 2 and all(manifest[t["data"]["clip_id"]]["status"] == "kept" for t in tasks)
    for task in tasks:
        clip = manifest[task["data"]["clip_id"]]
        assert task["data"]["video"] == f"http://127.0.0.1:9999/media/{clip['clip_id']}.mp4"
        [dense, short] = task["predictions"][0]["result"]
        assert dense["value"]["text"] == [clip["caption"]] and short["value"]["text"] == [clip["caption_fields"]["short"]]
    config = (tmp_path / "tasks.xml").read_text()
    assert '<Choices name="verdict"' in config and '<TextArea name="dense"' in config

    # what Label Studio's JSON export of that project holds after two people worked on it
    first, second = tasks
    who = {"id": 3, "email": "ann@example.com"}
    first["annotations"] = [
        {"id": 11, "completed_by": who, "was_cancelled": False, "created_at": "2026-12-07T10:00:00.100000Z",
         "updated_at": "2026-12-07T10:00:01.500000Z",
         "result": [{"from_name": "verdict", "to_name": "video", "type": "choices", "value": {"choices": ["accept"]}},
                    {"from_name": "dense", "to_name": "video", "type": "textarea",
                     "value": {"text": ["A grey pattern slides to the right."]}},
                    {"from_name": "short", "to_name": "video", "type": "textarea",
                     "value": {"text": [first["data"]["short"]]}}]},  # unchanged: no edit of it
        {"id": 12, "completed_by": 4, "was_cancelled": True, "created_at": "2026-12-07T10:05:00Z",
         "result": [{"from_name": "verdict", "to_name": "video", "type": "choices", "value": {"choices": ["reject"]}}]}]
    second["annotations"] = [
        {"id": 13, "completed_by": 4, "was_cancelled": False, "created_at": "2026-12-07T10:02:00Z",
         "result": [{"from_name": "verdict", "to_name": "video", "type": "choices", "value": {"choices": ["reject"]}}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    done = _spacetime("review", str(out), "import", str(tmp_path / "export.json"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"tasks": 2, "decisions": 3, "added": 3, "already_there": 0}
    again = _spacetime("review", str(out), "import", str(tmp_path / "export.json"))
    assert json.loads(again.stdout)["added"] == 0
    store = Store(out / contract.REVIEW_DIR)
    rows = review.read(store)
    assert len(rows) == 3 and {r["source"] for r in rows} == {"label-studio"}
    assert {r["reviewer"] for r in rows} == {"label-studio:ann@example.com", "label-studio:4"}
    assert review.labels(store) == {first["data"]["clip_id"]: False, second["data"]["clip_id"]: True}
    assert review.gold_captions(store) == {first["data"]["clip_id"]: {"dense": "A grey pattern slides to the right.",
                                                                      "short": None}}
    first["data"]["clip_id"] = "not-in-this-output"
    (tmp_path / "other.json").write_text(json.dumps([first]))
    refused = _spacetime("review", str(out), "import", str(tmp_path / "other.json"))
    assert refused.returncode == 2 and "1 clips are not in" in refused.stderr and "not-in-this-output" in refused.stderr
