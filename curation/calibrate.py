"""Threshold calibration of a filter from labelled clips.

    spacetime calibrate sharpness --manifest OUT/manifest/clips.parquet --labels labels.csv
    spacetime calibrate sharpness --labels OUT/review     # the decisions of `spacetime review OUT`

labels.csv has a header and the columns `clip_id,bad`: bad=1 for a clip the filter SHOULD reject,
0 for one it should keep. A review folder gives the same labels: a clip a person rejected is bad,
one they accepted is good (the latest decision on each). The filter rejects a clip when its score is past the threshold (below it
for `low` filters, above for `high` ones), so precision = rejected clips that are bad / rejected,
recall = bad clips rejected / bad clips. Prints precision/recall at thresholds and the threshold
that reaches the target precision with the most recall, and writes a PR-curve plot.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spacetime import contract

# filter name -> (score key in manifest scores, side that is bad, config key of its threshold)
FILTERS = {
    "aesthetic": ("aesthetic", "low", "filters.aesthetic.min_score"),
    "sharpness": ("sharpness", "low", "filters.sharpness.min_sharpness"),
    "motion": ("motion", "low", "filters.motion.min_motion"),
    "shake": ("shake", "high", "filters.motion.max_shake"),
    "dark": ("luma_mean", "low", "filters.exposure.min_luma"),
    "bright": ("luma_mean", "high", "filters.exposure.max_luma"),
    "clipped": ("luma_clipped", "high", "filters.exposure.max_clipped"),
    "borders": ("picture_area", "low", "filters.borders.min_area"),
    "alignment": ("caption_alignment", "low", "filters.alignment.min_score"),
}


@dataclass
class Point:
    threshold: float
    precision: float
    recall: float


def pr_curve(scores: np.ndarray, bad: np.ndarray, side: str) -> list[Point]:
    """Precision/recall of rejecting `score < t` (side low) or `score > t` (side high), for a
    threshold between each pair of consecutive distinct scores (and beyond both ends)."""
    values = np.unique(scores)
    cuts = np.concatenate([[values[0] - 1e-9], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-9]])
    points = []
    for t in cuts:
        rejected = scores < t if side == "low" else scores > t
        tp = int((rejected & bad).sum())
        precision = tp / rejected.sum() if rejected.any() else 1.0
        recall = tp / bad.sum() if bad.any() else 1.0
        points.append(Point(float(t), float(precision), float(recall)))
    return points


def choose(points: list[Point], target_precision: float) -> Point | None:
    ok = [p for p in points if p.precision >= target_precision and p.recall > 0]
    return max(ok, key=lambda p: (p.recall, p.precision)) if ok else None


def is_review(labels: str | Path) -> bool:
    """A review folder (OUT/review of `spacetime review`, local or s3://), not a CSV file."""
    return str(labels).startswith("s3://") or Path(labels).is_dir()


def read_labels(labels: str | Path) -> list[tuple[str, int]]:
    """[(clip_id, bad)] from a CSV (clip_id,bad) or from a review folder's accept/reject decisions."""
    if is_review(labels):
        from spacetime import review

        decided = review.labels(review.review_store(str(labels)))
        if not decided:
            raise ValueError(f"{labels}: no clip accepted or rejected there yet (spacetime review OUT)")
        return [(cid, int(bad)) for cid, bad in sorted(decided.items())]
    with open(labels, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"clip_id", "bad"} <= set(reader.fieldnames):
            raise ValueError(f"{labels}: expected a header with columns clip_id,bad")
        return [(r["clip_id"], int(r["bad"])) for r in reader]


def default_manifest(labels: str | Path) -> str:
    """OUT/manifest/clips.parquet of the review folder OUT/review."""
    if not is_review(labels):
        raise ValueError(f"--manifest is needed with a CSV of labels ({labels})")
    return f"{str(labels).rstrip('/').rsplit('/', 1)[0]}/{contract.CLIPS_MANIFEST}"


def load(filter_name: str, manifest: str | Path | None, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, bad) of the labelled clips. `manifest` None: the one beside a review folder."""
    from spacetime.store import Store

    if filter_name not in FILTERS:
        raise ValueError(f"unknown filter {filter_name!r}; one of {', '.join(FILTERS)}")
    key = FILTERS[filter_name][0]
    manifest = str(manifest or default_manifest(labels))
    folder, name = manifest.rsplit("/", 1) if "/" in manifest else (".", manifest)
    rows = {r["clip_id"]: contract.scores_of(r["scores"])
            for r in Store(folder).read_table(name).to_pylist()}
    labelled = read_labels(labels)
    missing = [c for c, _ in labelled if c not in rows or key not in rows[c]]
    if missing:
        raise ValueError(f"{labels}: {len(missing)} labelled clips have no {key!r} score in {manifest} "
                         f"(first: {missing[0]})")
    return np.array([rows[c][key] for c, _ in labelled], float), np.array([b for _, b in labelled], bool)


def calibrate(filter_name: str, manifest: str | Path | None, labels: str | Path, target_precision: float, plot: Path | None) -> Point | None:
    scores, bad = load(filter_name, manifest, labels)
    key, side, config_key = FILTERS[filter_name]
    points = pr_curve(scores, bad, side)
    print(f"{filter_name}: score {key!r}, rejects {'below' if side == 'low' else 'above'} the threshold; "
          f"{len(scores)} labelled clips, {int(bad.sum())} bad")
    print(f"{'threshold':>12} {'precision':>10} {'recall':>8}")
    step = max(1, len(points) // 15)
    for p in points[::step]:
        print(f"{p.threshold:12.5g} {p.precision:10.3f} {p.recall:8.3f}")
    best = choose(points, target_precision)
    if best is None:
        print(f"no threshold reaches precision {target_precision}")
    else:
        print(f"threshold for precision >= {target_precision}: {best.threshold:.5g} "
              f"(precision {best.precision:.3f}, recall {best.recall:.3f}) -> --set {config_key}={best.threshold:.5g}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3.2), dpi=100)
        ax.plot([p.recall for p in points], [p.precision for p in points], marker=".")
        if best:
            ax.plot([best.recall], [best.precision], "r*", markersize=12, label=f"t={best.threshold:.3g}")
            ax.legend()
        ax.set(xlabel="recall", ylabel="precision", title=f"{filter_name} ({key})", xlim=(0, 1.02), ylim=(0, 1.02))
        fig.tight_layout()
        plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot)
        plt.close(fig)
        print(f"PR curve: {plot}")
    return best
