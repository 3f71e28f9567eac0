"""Caption QA (captioner.qa), the answer schema and the caption config: no engine needed."""

import json

import numpy as np
import pytest

from captioner.config import CaptionConfig, QAConfig
from captioner.frames import fit_pixels, from_sampled, pick
from captioner.qa import DuplicateTracker, check_answer, check_text, find_loop, strip_boilerplate
from captioner.schema import FieldLimits, json_schema, max_answer_tokens
from spacetime.config import ConfigError, load_config
from tests.helpers import CONFIGS

LIMITS = FieldLimits()
QA = QAConfig()
CLIP = "0123456789abcdef0123"


def answer(**changes) -> str:
    value = dict(clip_id=CLIP, subjects=["a cyclist"], actions=["rides down a dirt track"],
                 scene="a forest trail in summer", camera_motion="tracking", shot_type="wide",
                 lighting="bright sunlight through trees", style="live action, handheld sports footage",
                 on_screen_text="", dense="A cyclist in a red jersey rides down a dirt track between tall trees.",
                 short="A cyclist rides through a forest.")
    value.update(changes)
    return json.dumps(value)


def test_valid_answer_passes_and_is_cleaned():
    result = check_answer(answer(dense="  A cyclist   rides.\n Dust rises. "), "stop", CLIP, QA, LIMITS)
    assert result.ok and result.answer.dense == "A cyclist rides. Dust rises."
    assert set(result.answer.fields()) == {"subjects", "actions", "scene", "camera_motion", "shot_type", "lighting",
                                           "style", "on_screen_text", "dense", "short"}


def test_truncated_answer_fails_even_if_it_parses():
    result = check_answer(answer(), "length", CLIP, QA, LIMITS, max_tokens=512)
    assert not result.ok and result.reason == "truncated at max_tokens=512"


@pytest.mark.parametrize("text, reason", [
    ('{"clip_id": "' + CLIP + '", "subjects": ["a', "invalid JSON"),
    ("", "empty answer"),
    (answer(camera_motion="spinning"), "schema: camera_motion"),
    (json.dumps({**json.loads(answer()), "mood": "happy"}), "schema: mood"),
    (answer(subjects="a cyclist"), "schema: subjects"),
    (answer(dense="x" * 2000), "schema: dense longer than 1500"),
])
def test_schema_failures(text, reason):
    result = check_answer(text, "stop", CLIP, QA, LIMITS)
    assert not result.ok and result.reason.startswith(reason), result.reason


def test_wrong_clip_id_is_a_failure():
    result = check_answer(answer(clip_id="ffffffffffffffffffff"), "stop", CLIP, QA, LIMITS)
    assert not result.ok and result.reason.startswith("clip id mismatch") and CLIP in result.reason


def test_empty_captions_fail():
    assert check_answer(answer(dense="   "), "stop", CLIP, QA, LIMITS).reason == "empty dense caption"
    assert check_answer(answer(short="\n"), "stop", CLIP, QA, LIMITS).reason == "empty short caption"


def test_boilerplate_is_stripped_or_flagged():
    text = answer(dense="The video shows a cyclist riding down a trail.", short="In this video, a bike.")
    stripped = check_answer(text, "stop", CLIP, QA, LIMITS)
    assert stripped.ok
    assert stripped.answer.dense == "A cyclist riding down a trail." and stripped.answer.short == "A bike."
    assert any("The video shows" in n for n in stripped.notes)
    flagged = check_answer(text, "stop", CLIP, QAConfig(boilerplate="flag"), LIMITS)
    assert not flagged.ok and flagged.reason == "boilerplate opening in dense: 'The video shows'"
    # only at the start, only whole words, and a caption that is nothing but boilerplate is empty
    assert strip_boilerplate("A dog. The video shows more.", QA.boilerplate_openings)[1] is None
    assert strip_boilerplate("The videos of dogs", ["The video"])[1] is None
    assert check_answer(answer(short="The clip shows"), "stop", CLIP, QA, LIMITS).reason == "empty short caption"
    configured = QAConfig(boilerplate_openings=["Here we see"])
    assert check_answer(answer(dense="Here we see a dog."), "stop", CLIP, configured, LIMITS).answer.dense == "A dog."


def test_repetition_loops_fail():
    loop = "A cyclist rides down a trail. " + "the bike the bike " * 6
    result = check_answer(answer(dense=loop), "stop", CLIP, QA, LIMITS)
    assert not result.ok and result.reason.startswith("repetition loop") and result.reason.endswith("in dense")
    assert find_loop("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 4, 24) == "a"
    # short runs ("ha ha ha ha"), runs of punctuation (table rules) and normal prose are not loops
    assert find_loop("ha ha ha ha " + "-" * 40 + " " + "=" * 30, 4, 24) is None
    prose = json.loads(answer())["dense"] + " Then the cyclist turns left, passes a fallen log and stops by a river."
    assert check_answer(answer(dense=prose), "stop", CLIP, QA, LIMITS).ok
    # a text that keeps cycling through a few phrases (no run of one unit) has too few distinct 3-grams
    # a whole passage repeated is a loop too
    passage = " ".join(["a man walks", "a dog runs", "a man walks", "the sun sets", "a dog runs"] * 4)
    assert check_answer(answer(dense=passage), "stop", CLIP, QA, LIMITS).reason.startswith("repetition loop")
    # a text shuffling a few phrases (no run of one unit) has too few distinct word 3-grams
    shuffled = ("a man walks the sun sets a man walks a dog runs a man walks a dog runs a dog runs a dog runs "
                "the sun sets a dog runs a man walks a man walks a dog runs a man walks")
    assert find_loop(shuffled, 4, 24) is None
    assert check_answer(answer(dense=shuffled), "stop", CLIP, QA, LIMITS).reason.startswith("repetitive text")


def test_duplicates_across_clips():
    tracker = DuplicateTracker()
    assert tracker.add("clip-a", "A dog runs on a beach.") is None
    assert tracker.add("clip-a", "A dog runs on a beach.") is None  # the same clip again is not a duplicate
    assert tracker.add("clip-b", "a dog  runs on a BEACH.") == "clip-a"
    assert tracker.add("clip-c", "A cat sleeps.") is None


def test_free_text_check_for_upsampling():
    assert check_text('{"dense": "The video shows a cat on a skateboard."}', "stop", QA, 100) == (
        "A cat on a skateboard.", None)
    assert check_text('{"dense": "a cat"', "stop", QA, 100) == (None, "invalid JSON")
    assert check_text('{"dense": "a cat"}', "length", QA, 100)[1] == "truncated at the token limit"
    assert check_text('{"dense": "' + "x" * 101 + '"}', "stop", QA, 100)[1].startswith("schema")


def test_schema_binds_the_clip_id_and_bounds_lengths():
    limits = FieldLimits(dense_chars=120, short_chars=40, text_chars=40, item_chars=20, max_items=3)
    schema = json_schema(CLIP, limits)
    assert schema["properties"]["clip_id"] == {"type": "string", "const": CLIP}
    assert schema["required"][0] == "clip_id" and schema["additionalProperties"] is False
    strings = [p for p in schema["properties"].values() if p.get("type") == "string" and "enum" not in p
               and "const" not in p]
    assert strings and all("maxLength" in p for p in strings)
    # the bound covers the longest possible answer, every character a 6-byte escape
    longest = json.loads(answer(subjects=["x" * 20] * 3, actions=["x" * 20] * 3, scene="x" * 40,
                                lighting="x" * 40, style="x" * 40, on_screen_text="x" * 40, dense="x" * 120,
                                short="x" * 40, camera_motion="tracking", shot_type="extreme_close_up"))
    escaped = json.dumps(longest, separators=(",", ":")).replace("x", "\\u00e9")
    assert len(escaped.encode()) <= max_answer_tokens(limits)


def test_caption_config_is_strict_and_checks_token_budget(tmp_path):
    path = tmp_path / "caption.yaml"
    path.write_text("engine: vllm\nsampling:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match="sampling.temprature"):
        load_config(CaptionConfig, path)
    with pytest.raises(ConfigError, match="max_model_len"):
        load_config(CaptionConfig, None, ["vllm.max_model_len=1024", "sampling.max_tokens=2048"])
    cfg = load_config(CaptionConfig, None, ["sampling.max_tokens=null", "limits.dense_chars=100"])
    assert cfg.max_tokens() == max_answer_tokens(cfg.limits)
    assert load_config(CaptionConfig, None, ["openai.api_key_env=MY_KEY"]).openai.api_key_env == "MY_KEY"
    for shipped in (CONFIGS / "caption/default.yaml", CONFIGS / "caption/tiny.yaml"):
        assert load_config(CaptionConfig, shipped).engine == "vllm"
    assert not load_config(CaptionConfig, CONFIGS / "caption/tiny.yaml").model.startswith("~")


def test_frames_are_evenly_picked_resized_and_described():
    assert pick(16, 4) == [0, 5, 10, 15] and pick(3, 8) == [0, 1, 2]
    assert fit_pixels(1920, 1080, 448 * 448) == (596, 336) and fit_pixels(64, 48, 448 * 448) == (64, 48)
    clip = dict(clip_id="c", start_frame=100, end_frame=150, num_frames=50, fps=25.0, start_time=4.0,
                end_time=6.0, sampled_idx=[100, 112, 124, 136, 148])
    video = from_sampled(clip, np.zeros((5, 360, 640, 3), np.uint8), n_frames=3, max_pixels=320 * 180)
    assert video.frames.shape == (3, 180, 320, 3)
    assert video.metadata["frames_indices"] == [0, 24, 48] and video.metadata["total_num_frames"] == 50
    assert video.metadata["fps"] == 25.0 and video.duration == 2.0 and video.metadata["do_sample_frames"] is False
    with pytest.raises(ValueError, match="no sampled frames"):
        from_sampled(clip, np.zeros((0, 0, 0, 3), np.uint8), 3, 1000)
