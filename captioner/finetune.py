"""Fine-tune the captioner VLM on (clip, caption) pairs with transformers + peft; export for vLLM.

    spacetime caption finetune --data DATA --base MODEL --output DIR [--config configs/caption/finetune.yaml]

Train and serve match: every example is built with the captioning code itself — frames sampled by
`captioner.frames.from_mp4` (caption.frames, caption.max_pixels), the request of
`captioner.core.caption_request` (system prompt, instruction with the clip id) and the model's chat
template — and the target is the JSON answer the caption schema describes. Only the answer tokens
are trained on (the prompt's labels are masked).

Data (`--data`), either
  - a curation output folder: every sample of shards/index.parquet whose <key>.txt is not empty;
    the target fields are <key>.json's `caption_fields` where present;
  - OUT/review, the decisions of `spacetime review OUT`: the kept clips whose captions people edited,
    with the edited dense/short captions as the target (the other fields from the record); or
  - a JSONL file, one example a line:
      {"video": "clips/a.mp4", "caption": "A dense caption ..."}
      {"shard": "shards/x/x-000000.tar", "key": "<clip_id>", "fields": {<every answer field>}}
    paths relative to the JSONL file's folder (or absolute); "clip_id" optional (default: the key, or
    a hash of the video path). With only "caption", the structured fields are neutral placeholders
    ("unspecified", camera/shot "unknown") and `short` is the caption's first sentence: the model
    learns the dense caption, not invented structure.
A deterministic share `eval_fraction` of the clips (by clip id hash) is held out for the eval loss.

Output: DIR/checkpoints/step-N (resume: rerun the same command), DIR/adapter (LoRA, mode lora),
DIR/merged (full weights + processor: what `caption.model` points at for vLLM), DIR/metrics.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from captioner.config import CaptionConfig
from spacetime.config import StrictModel
from spacetime.io import atomic_dir

log = logging.getLogger(__name__)


class LoraSettings(StrictModel):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # language-model projections only (vision tower and merger are left to `freeze_vision`)
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # modules trained in full next to the adapter (peft modules_to_save), e.g. ["lm_head"] when the
    # output head must change: new tokens, or the tiny random test model, whose head is untrained
    modules_to_save: list[str] = Field(default_factory=list)


class FinetuneConfig(StrictModel):
    mode: Literal["lora", "full"] = "lora"
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze_vision: bool = True
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 1000
    grad_accum: int = 8
    max_grad_norm: float = 1.0
    eval_fraction: float = 0.1
    eval_every: int = 100
    save_every: int = 200
    seed: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: bf16 on CUDA devices that support it
    caption: CaptionConfig = Field(default_factory=CaptionConfig)  # frames, max_pixels, limits, prompt


@dataclass
class Example:
    clip_id: str
    video: bytes  # the clip's mp4
    fields: dict  # the answer, without clip_id
    span: tuple[int, int] | None = None  # (skip_frames, num_frames) from a curated clip's record


# ---------------------------------------------------------------------------------------- data
def placeholder_fields(caption: str, cfg: CaptionConfig) -> dict:
    short = caption.strip().split(". ")[0].rstrip(".") + "."
    return {"subjects": ["unspecified"], "actions": ["unspecified"], "scene": "unspecified",
            "camera_motion": "unknown", "shot_type": "unknown", "lighting": "unspecified",
            "style": "unspecified", "on_screen_text": "", "dense": caption.strip(),
            "short": short[: cfg.limits.short_chars]}


def load_examples(data: Path, cfg: CaptionConfig) -> list[Example]:
    """Examples from a curation output folder or a JSONL file (see the module docstring)."""
    from spacetime import contract

    data = Path(data)
    examples = []
    if data.is_dir() and not (data / contract.INDEX_PATH).exists() and (data.parent / contract.CLIPS_MANIFEST).exists():
        examples = reviewed_examples(data, cfg)
    elif data.is_dir():
        import pyarrow.parquet as pq

        index = pq.read_table(data / contract.INDEX_PATH).to_pylist()
        for shard in sorted({r["shard"] for r in index}):
            for sample in contract.read_shard(data / shard):
                record = contract.read_record(sample, where=str(data / shard))
                if not record.caption or not record.caption.dense.strip():
                    continue
                fields = record.caption.model_dump(exclude={"provenance"})
                if record.caption.short is None:  # a caption without structured fields
                    fields = placeholder_fields(record.caption.dense, cfg)
                examples.append(Example(record.clip_id, sample[contract.VIDEO_EXT], fields,
                                        (record.skip_frames, record.num_frames)))
    else:
        for n, line in enumerate(data.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                span = None
                if "video" in row:
                    path = (data.parent / row["video"]) if not os.path.isabs(row["video"]) else Path(row["video"])
                    video, default_id = path.read_bytes(), hashlib.sha256(str(path).encode()).hexdigest()[:20]
                else:
                    tar = (data.parent / row["shard"]) if not os.path.isabs(row["shard"]) else Path(row["shard"])
                    with contract.ShardReader() as reader:
                        parts = reader.read(str(tar), row["key"])
                    record = contract.read_record(parts, where=f"{tar}:{row['key']}")
                    video, span, default_id = parts[contract.VIDEO_EXT], (record.skip_frames, record.num_frames), row["key"]
                fields = row.get("fields") or placeholder_fields(row["caption"], cfg)
            except (KeyError, json.JSONDecodeError, OSError) as err:
                raise ValueError(f"{data}:{n}: {type(err).__name__}: {err}; each line needs \"video\" or "
                                 "\"shard\"+\"key\", and \"caption\" or \"fields\"") from None
            examples.append(Example(row.get("clip_id", default_id), video, fields, span))
    if not examples:
        raise ValueError(f"{data}: no (clip, caption) pairs found")
    return examples


def reviewed_examples(folder: Path, cfg: CaptionConfig) -> list[Example]:
    """The captions people edited in `spacetime review OUT` (folder OUT/review) as gold examples: each
    kept clip's record fields, with its dense and short caption as edited. An edited clip that is not
    in the shards (rejected by the pipeline) has no video to train on: it is left out, and said."""
    import pyarrow.parquet as pq

    from spacetime import contract, review

    out = folder.parent
    gold = review.gold_captions(review.review_store(str(folder)))
    shards = {r["clip_id"]: r["shard"] for r in pq.read_table(out / contract.CLIPS_MANIFEST,
                                                               columns=["clip_id", "shard"]).to_pylist()}
    examples, missing = [], []
    with contract.ShardReader() as reader:
        for clip_id, edit in sorted(gold.items()):
            if not shards.get(clip_id):
                missing.append(clip_id)
                continue
            parts = reader.read(str(out / shards[clip_id]), clip_id)
            record = contract.read_record(parts, where=f"{out / shards[clip_id]}:{clip_id}")
            dense = edit["dense"] or (record.caption.dense if record.caption else None)
            if not dense:  # only a short caption was written for an uncaptioned clip
                dense = edit["short"]
            fields = (record.caption.model_dump(exclude={"provenance"}) if record.caption and record.caption.short
                      else placeholder_fields(dense, cfg))
            fields.update(dense=dense, **({"short": edit["short"]} if edit["short"] else {}))
            examples.append(Example(clip_id, parts[contract.VIDEO_EXT], fields, (record.skip_frames, record.num_frames)))
    if missing:
        log.warning("%s: %d edited clips are not in the shards (rejected clips have no video): left out, e.g. %s",
                    folder, len(missing), missing[0])
    return examples


def answer_text(clip_id: str, fields: dict) -> str:
    """The target: the JSON answer in schema order, compact (no whitespace between tokens): guided
    decoding grammars may forbid the spaces json.dumps puts after ':' and ',', and a model trained
    on them is then forced off its training distribution at every field (measured: garbage
    captions until the target was made compact)."""
    from captioner.schema import FIELDS

    return json.dumps({"clip_id": clip_id, **{k: fields[k] for k in FIELDS}}, ensure_ascii=False,
                      separators=(",", ":"))


def encode_example(example: Example, processor, cfg: CaptionConfig) -> dict:
    """Model inputs with labels masked to the answer tokens (same prompt as serving)."""
    import torch

    from captioner.core import ClipTask, caption_request
    from captioner.engines import messages_for
    from captioner.frames import from_mp4

    video = from_mp4(example.video, cfg.frames, cfg.max_pixels, example.span)
    request = caption_request(cfg, ClipTask(example.clip_id, video))
    prompt = processor.apply_chat_template(messages_for(request, {"type": "video"}), tokenize=False,
                                           add_generation_prompt=True)
    meta = {k: video.metadata[k] for k in ("fps", "duration", "total_num_frames", "frames_indices", "video_backend")}
    end = processor.tokenizer.eos_token or "<|im_end|>"
    full = prompt + answer_text(example.clip_id, example.fields) + end
    kwargs = dict(videos=[list(video.frames)], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
    n_prompt = processor(text=[prompt], **kwargs)["input_ids"].shape[1]
    inputs = dict(processor(text=[full], **kwargs))
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    inputs["labels"] = labels
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------ training
def _is_eval(clip_id: str, fraction: float) -> bool:
    return int(hashlib.sha256(clip_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


def build_model(base: str, ft: FinetuneConfig, dtype):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
    if ft.freeze_vision or ft.mode == "lora":
        for name, p in model.named_parameters():
            if "visual" in name:
                p.requires_grad_(not ft.freeze_vision and ft.mode == "full")
    if ft.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout,
                                                 target_modules=ft.lora.target_modules,
                                                 modules_to_save=ft.lora.modules_to_save or None))
    return model


def _save_checkpoint(out: Path, step: int, model, optimizer, scheduler) -> None:
    import torch

    trainable = {k: v for k, v in model.state_dict().items() if k in _trainable_names(model)}
    with atomic_dir(out / "checkpoints" / f"step-{step}") as tmp:
        torch.save({"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "py_rng": random.getstate()},
                   tmp / "state.pt")


def _trainable_names(model) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict() if k in names}


def finetune(data: Path, base: str, output: Path, ft: FinetuneConfig) -> dict:
    """Train, checkpoint, export. Rerunning with the same output resumes from the last checkpoint.
    Returns {"train_loss_first", "train_loss_last", "eval_loss", "steps", "merged", "adapter"}."""
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, get_cosine_schedule_with_warmup

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(ft.seed)
    random.seed(ft.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = ft.bf16 == "on" or (ft.bf16 == "auto" and device == "cuda" and torch.cuda.is_bf16_supported())
    processor = AutoProcessor.from_pretrained(base)
    examples = load_examples(data, ft.caption)
    encoded = [(e.clip_id, encode_example(e, processor, ft.caption)) for e in examples]
    train = [x for c, x in encoded if not _is_eval(c, ft.eval_fraction)] or [x for _, x in encoded]
    held_out = [x for c, x in encoded if _is_eval(c, ft.eval_fraction)]
    log.info("%d examples: %d train, %d held out", len(encoded), len(train), len(held_out))

    model = build_model(base, ft, torch.float32).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ft.learning_rate, weight_decay=ft.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, ft.warmup_steps, ft.max_steps)
    step = 0
    if (ckpt := _latest_checkpoint(output)) is not None:
        state = torch.load(ckpt / "state.pt", weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        random.setstate(state["py_rng"])
        step = state["step"]
        log.info("resuming from %s", ckpt)

    def loss_of(batch) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return model(**{k: v.to(device) for k, v in batch.items()}).loss

    def evaluate() -> float | None:
        if not held_out:
            return None
        model.eval()
        with torch.no_grad():
            value = sum(float(loss_of(b)) for b in held_out) / len(held_out)
        model.train()
        return value

    metrics = open(output / "metrics.jsonl", "a")
    first = last = None
    model.train()
    order = random.Random(ft.seed)
    bar = tqdm(total=ft.max_steps, initial=step, desc="finetune", unit="step", disable=None)
    while step < ft.max_steps:
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(ft.grad_accum):
            loss = loss_of(train[order.randrange(len(train))]) / ft.grad_accum
            loss.backward()
            total += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, ft.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        first = total if first is None else first
        last = total
        row = {"step": step, "loss": total, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "seconds": time.perf_counter() - t0}
        if step % ft.eval_every == 0 or step == ft.max_steps:
            row["eval_loss"] = evaluate()
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        bar.set_postfix(loss=f"{total:.4f}")
        bar.update(1)
        if step % ft.save_every == 0 or step == ft.max_steps:
            _save_checkpoint(output, step, model, optimizer, scheduler)
    bar.close()
    metrics.close()
    result = {"steps": step, "train_loss_first": first, "train_loss_last": last, "eval_loss": evaluate()}
    result.update(export(model, processor, base, output, ft))
    (output / "finetune.json").write_text(json.dumps({**result, "base": base, "config": ft.model_dump(mode="json")},
                                                     indent=1))
    return result


def export(model, processor, base: str, output: Path, ft: FinetuneConfig) -> dict:
    """DIR/merged: full weights (LoRA merged) + processor, loadable by vLLM and transformers;
    DIR/adapter: the LoRA adapter alone (mode lora), for engines that apply adapters."""
    out = {}
    if ft.mode == "lora":
        model.save_pretrained(output / "adapter")
        out["adapter"] = str(output / "adapter")
        model = model.merge_and_unload()
    with atomic_dir(output / "merged") as merged:
        model.save_pretrained(merged)  # in the training dtype (fp32): bf16 would round small LoRA deltas away
        processor.save_pretrained(merged)
        for name in ("chat_template.jinja", "chat_template.json", "README.md"):
            src = Path(base) / name
            if src.exists() and not (merged / name).exists():
                shutil.copy(src, merged / name)
    out["merged"] = str(output / "merged")
    return out
