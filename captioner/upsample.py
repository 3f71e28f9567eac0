"""`spacetime caption upsample "a cat on a skateboard"`: a short user prompt becomes a dense caption
in the style the DiT was trained on, through the same engines as captioning (answer decoded under a
{"dense": string} schema, same QA and one retry). Few-shot examples: captions of a dataset.
"""

from __future__ import annotations

import random
from pathlib import Path

from captioner.config import CaptionConfig
from captioner.core import Captioner


def dataset_examples(dataset_dir: str | Path, n: int = 3, seed: int = 0) -> list[str]:
    """`n` dense captions drawn (deterministically) from a curation/recaption output's shards."""
    import pyarrow.parquet as pq

    from spacetime import contract

    root = Path(dataset_dir)
    index = [r for r in pq.read_table(root / contract.INDEX_PATH).to_pylist() if r.get("has_caption")]
    chosen = random.Random(seed).sample(index, min(n, len(index)))
    wanted: dict[str, set[str]] = {}
    for row in chosen:
        wanted.setdefault(row["shard"], set()).add(row["key"])
    captions = {}
    for shard, keys in sorted(wanted.items()):
        for sample in contract.read_shard(root / shard):
            if sample["__key__"] in keys:
                dense = contract.read_record(sample, where=str(root / shard)).dense_caption
                if dense:
                    captions[sample["__key__"]] = dense
    return [captions[r["key"]] for r in chosen if r["key"] in captions]


def upsample(prompt: str, cfg: CaptionConfig, examples: list[str] | None = None) -> str:
    """A dense caption for `prompt` (loads the engine; for many prompts use Captioner.upsample)."""
    if not prompt.strip():
        raise ValueError("upsample: empty prompt")
    with Captioner(cfg) as captioner:
        return captioner.upsample(prompt, examples)
