"""Model-free near-duplicate detection of clips from their sampled frames.

Method
------
Fingerprint: one 64-bit code per sampled frame (``frame_hashes``). The frame is converted to grey,
resized to 32x32 with area interpolation and transformed with a 2-D DCT (``cv2.dct``). The 21
lowest-frequency AC coefficients (u, v < 5, ordered by u + v; the DC term is dropped, so brightness
offsets do not matter) are divided by their root mean square (so contrast does not matter either)
and each is coded in 3 bits as a *thermometer code* against the levels -0.8, 0 and +0.8 (bit k set
when the coefficient exceeds level k). 21 x 3 = 63 bits, the 64th is always 0. With a thermometer
code the Hamming distance of two frames is the L1 distance of their quantised coefficients: a
coefficient that moves one level costs one bit, where the classic pHash (the sign of 63
coefficients against their median) flips a bit for every coefficient that crosses the median.
Coefficients are interleaved (0, 3, 6, ..., 1, 4, ..., 2, 5, ...) so that each LSH band holds
low and higher frequencies alike.

Similarity of two clips (``similarity``): the fraction of the sampled frames of the SHORTER clip
that have a frame in the other clip within Hamming distance ``max_distance``; clips with as many
frames take the larger of the two directions, so the measure is symmetric. A trimmed copy is
contained in its original, so its frames all have a partner; sampled frames of a copy are taken at
another phase of the 0.5 s sampling grid, so "its partner" is up to 0.25 s away, which in fast
footage changes the picture a lot: that is why the default ``min_similarity`` is 0.5, not higher.

Index (``NearDupIndex``): LSH banding. Each 64-bit code is cut into ``bands`` bands (4 x 16 bits by
default); a dict maps (band, value) to the clips that have a frame with that band value. A query
verifies (with ``similarity``) only the clips that share at least ``min_band_hits`` (default 1)
distinct (band, value) keys with its frames, so its cost grows with the number of candidates, not
with the size of the index. The index is incremental (``add``; ``dedup`` decides one batch against
itself and the index, then indexes the clips kept) and round-trips through a pyarrow table.
``group`` finds the groups of near-duplicates within one batch and keeps the best of each.

Measured (benchmarks/near_duplicates.py; real footage: bikes.mp4 cut into its shots, 100-frame
windows and whole, bigbuckbunny.mp4 and carphone_pristine.mp4 whole and as halves, plus copies of
each re-encoded at crf 35 and half size, trimmed by 10 %, 20 % and at the worst sampling phase,
10 % off both ends, cropped 5 % per side, and a combination; 128 clips of 2-16 sampled frames, 1439
duplicate and 5720 distinct pairs, the distinct pairs mostly different shots of the same street):

- defaults (max_distance=10, min_similarity=0.5, bands=4, min_band_hits=1), through the index:
  precision 1.000, recall 0.985-0.986 (libx264's output varies slightly between runs; 0.993 with
  every pair verified: banding loses 0.7 %); every copy matched its original (7 kinds x 16 clips);
  the closest two different bikes shots came to was similarity 0.33.
  Held-out set (other windows, crf 30 at 3/4 size, 15 % trims at either end, 3 % and 7 % crops, a
  colour grade, a combination; 532 duplicate / 4864 distinct pairs): precision 1.000, recall 0.985.
- sweep: max_distance 10 is the largest with no false positive (11: 15 at min_similarity 0.5, still
  precision 0.99; 12: 94); min_similarity 0.5 vs 0.34 loses 0.6 % recall and asks for half of
  the shorter clip's frames instead of one in three. The classic pHash (63 median-thresholded
  coefficients of the 8x8 corner) peaks at recall 0.967 at precision 0.99 (max_distance 18,
  min_similarity 0.34); at min_similarity 0.5 it reaches 0.949.
- per frame at distance <= 10: 90 % of a duplicate's frames find a partner, 0.06 % of a distinct
  clip's frames do; the misses are frames of fast pans and passing cars sampled 0.25 s apart.
- banding: bands=4 verifies 3.7 % of the clips from OTHER files per query; min_band_hits=2 cuts that
  to 0.1 % at recall 0.964 (for large indexes); bands=3 loses 7 % recall, bands=8 verifies nearly all.
- stress (not meant to match): 10 % crop per side 16/16 still matched, 15 % 4/16, horizontal flip
  0/16, 12 % black bars added 8/16; half the frame rate 16/16; a 50 % trim 16/16 (it is contained).
- cost: 0.31 ms per frame to hash (~1.8 ms per clip), ~0.8 ms per query of a 128-clip index.

Ordering the decisions
----------------------
A near-duplicate decision depends on what came before it: a clip is rejected when it matches a clip
kept by an EARLIER unit (published clips are never withdrawn), and within one unit (a run of
``write.unit_sources`` sources in processing order: dataset version, then sorted URI) the best of a
group by ``dedup.keep`` wins. The same rules decide duplicate sources (the first URI with a content
digest is the original). So the decisions follow unit order, while Ray Data finishes rows in any
order. They used to be made at write time, after every stage: half the captioning and extraction of
the README demo went to clips that were then thrown away.

They are now made by a gate, ``curation.duplicates.DedupGate``: a stage right after the fingerprint
(after the aesthetic score when ``dedup.keep`` ranks by it), run by ONE actor, which holds the rows of
a unit until all of them, and every earlier unit, have arrived, then decides the unit and lets its
rows go on. A duplicate source's rows lose their clips and a near-duplicate's row loses its frames:
no aesthetic, caption, thumbnail, preview or extraction work reaches them. The candidates are the
clips that passed the filters before the gate; a clip that survives the gate and later fails the
aesthetic filter or extraction still holds its place in the index (its near-duplicates look like it,
and would fare the same). Why not the other designs:

- a two-phase plan (every source to its fingerprint, then the survivors on) holds the whole run's
  frames between the phases and ends streaming; the gate holds only the frames of units still open,
  which Ray Data's in-order dispatch keeps to a few units' worth;
- deciding on the driver, which sees rows only after the last stage, is what cost the wasted work.

Each decided unit's decisions are recorded (``OUT/.work/dedup/<unit>.json``: duplicate sources,
digests first seen, near-duplicates and the fingerprints of the survivors) BEFORE any of its rows goes
on, so a killed run's rerun replays them rather than deciding again, an incremental run replays the
earlier versions' units to rebuild the index, and the decisions depend on the units alone: not on
timing, worker counts, kills or reruns (tests/test_curate_resume.py checks the bytes). A source an
infrastructure fault deferred is left out of its unit's decisions (``missing``); the rerun decides it
against every recorded unit (a copy of it that went on in its place stays the original). If the gate's actor is lost, the rows it held are lost with it: their
sources are left for the rerun, which completes them (nothing is published incomplete).

Limits: clips of 1-2 sampled frames are decided by one frame; horizontal flips, crops above ~10 % per
side, rotations and added bars (crop them first, as the borders filter does) are not matched; colour
is ignored (greyscale); flat frames (rms of the coefficients below 8) all hash alike; the same shot
at different times (e.g. two halves of a static shot) often matches (61 % of such pairs): it looks
the same, and a visual hash cannot tell.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import pyarrow as pa

__all__ = [
    "DEFAULT_BANDS",
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MIN_BAND_HITS",
    "DEFAULT_MIN_SIMILARITY",
    "HASH_NAME",
    "NearDupIndex",
    "frame_hashes",
    "group",
    "hamming",
    "similarity",
]

# Identifies the fingerprint: tables written with another hash are refused by from_table.
HASH_NAME = "dct21-therm3-v1"
DEFAULT_MAX_DISTANCE = 10
DEFAULT_MIN_SIMILARITY = 0.5
DEFAULT_BANDS = 4
DEFAULT_MIN_BAND_HITS = 1

_THUMB = 32  # grey thumbnail side before the DCT
_LEVELS = np.array([-0.8, 0.0, 0.8], np.float32)  # thermometer levels, in units of the coefficients' rms
_RMS_FLOOR = 8.0  # below this the frame is flat (real frames measured >= 98); coefficients shrink to 0
# The 21 lowest AC frequencies of the 5x5 corner, by u + v, then max(u, v), then (u, v).
_COEFS = sorted(((u, v) for u in range(5) for v in range(5) if (u, v) != (0, 0)),
                key=lambda t: (t[0] + t[1], max(t), t))[:21]
_ORDER = [k for start in range(3) for k in range(start, 21, 3)]  # interleaved across the bands
_ROWS = np.array([_COEFS[k][0] for k in _ORDER])
_COLS = np.array([_COEFS[k][1] for k in _ORDER])
_SCHEMA = pa.schema([("clip_id", pa.string()), ("hashes", pa.list_(pa.uint64())), ("score", pa.float64())],
                    metadata={b"spacetime.dedup.hash": HASH_NAME.encode()})


def frame_hashes(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """One 64-bit code per frame: uint64 [N] for uint8 RGB frames [N, H, W, 3] (or grey [N, H, W]).

    Frames of different sizes may be passed as a sequence. See the module docstring for the code.
    """
    out = np.zeros((len(frames), 64), np.uint8)
    for n, frame in enumerate(frames):
        frame = np.ascontiguousarray(frame)
        if frame.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {frame.dtype}")
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        thumb = cv2.resize(grey, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
        coefs = cv2.dct(thumb)[_ROWS, _COLS]
        coefs /= max(float(np.sqrt(np.mean(coefs * coefs))), _RMS_FLOOR)
        out[n, :63] = (coefs[:, None] > _LEVELS[None, :]).reshape(-1)
    return np.packbits(out, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances of two uint64 code arrays: uint8 [len(a), len(b)]."""
    a, b = _codes(a), _codes(b)
    return np.bitwise_count(a[:, None] ^ b[None, :])


def similarity(a: np.ndarray, b: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE) -> float:
    """Fraction of the frames of the shorter fingerprint with a frame of the other one within Hamming
    distance ``max_distance`` (equal lengths: the larger of both directions; an empty one: 0.0)."""
    a, b = _codes(a), _codes(b)
    if not len(a) or not len(b):
        return 0.0
    close = hamming(a, b) <= max_distance
    a_found = float(close.any(axis=1).mean())
    b_found = float(close.any(axis=0).mean())
    if len(a) != len(b):
        return a_found if len(a) < len(b) else b_found
    return max(a_found, b_found)


def _codes(hashes: np.ndarray | Sequence[int]) -> np.ndarray:
    if not isinstance(hashes, np.ndarray):  # e.g. Python ints read back from JSON: up to 2**64 - 1
        try:
            return np.array(hashes, np.uint64).reshape(-1)
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"hashes must be 64-bit unsigned codes: {e}") from None
    arr = hashes
    if arr.dtype != np.uint64:
        if arr.size and (arr.dtype.kind not in "iu" or arr.min() < 0):
            raise ValueError(f"hashes must be uint64, got {arr.dtype}")
        arr = arr.astype(np.uint64)
    return arr.reshape(-1)


def _band_layout(bands: int) -> list[tuple[int, int]]:
    """(shift, width) of each band, from the most significant bits; widths differ by at most 1."""
    if not 1 <= bands <= 64:
        raise ValueError(f"bands must be in 1..64, got {bands}")
    widths = [64 // bands + (1 if k < 64 % bands else 0) for k in range(bands)]
    layout, top = [], 64
    for w in widths:
        top -= w
        layout.append((top, w))
    return layout


def _rank(score: float) -> float:
    return -math.inf if math.isnan(score) else score


class NearDupIndex:
    """Incremental index of clip fingerprints with LSH-banded lookup.

    ``add`` clips (ids must be unique), ``query`` a fingerprint for the indexed clips that are its
    near-duplicates (similarity >= ``min_similarity`` at ``max_distance``). ``verified`` counts the
    similarity checks done by ``query`` (the candidates banding found), ``len`` the indexed clips.
    Same adds in the same order give the same results and the same ``to_table``.
    """

    def __init__(self, max_distance: int = DEFAULT_MAX_DISTANCE, min_similarity: float = DEFAULT_MIN_SIMILARITY,
                 bands: int = DEFAULT_BANDS, min_band_hits: int = DEFAULT_MIN_BAND_HITS) -> None:
        if not 0 <= max_distance <= 64:
            raise ValueError(f"max_distance must be in 0..64, got {max_distance}")
        if not 0.0 < min_similarity <= 1.0:
            raise ValueError(f"min_similarity must be in (0, 1], got {min_similarity}")
        self.max_distance = int(max_distance)
        self.min_similarity = float(min_similarity)
        self.bands = int(bands)
        self._layout = _band_layout(self.bands)
        if not 1 <= min_band_hits <= self.bands:
            raise ValueError(f"min_band_hits must be in 1..bands ({self.bands}), got {min_band_hits}")
        self.min_band_hits = int(min_band_hits)
        self._ids: list[str] = []
        self._hashes: list[np.ndarray] = []
        self._scores: list[float] = []
        self._number: dict[str, int] = {}
        self._postings: dict[tuple[int, int], list[int]] = {}
        self.verified = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._number

    def _keys(self, hashes: np.ndarray) -> set[tuple[int, int]]:
        keys: set[tuple[int, int]] = set()
        for band, (shift, width) in enumerate(self._layout):
            values = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
            keys.update((band, int(v)) for v in values)
        return keys

    def add(self, clip_id: str, hashes: np.ndarray, score: float = 0.0) -> None:
        """Index a clip; its ``score`` ranks it in ``group``/``dedup`` (higher is kept)."""
        clip_id = str(clip_id)
        if clip_id in self._number:
            raise ValueError(f"clip {clip_id!r} is already indexed")
        codes = _codes(hashes).copy()
        number = len(self._ids)
        self._number[clip_id] = number
        self._ids.append(clip_id)
        self._hashes.append(codes)
        self._scores.append(float(score))
        for key in self._keys(codes):
            self._postings.setdefault(key, []).append(number)

    def hashes(self, clip_id: str) -> np.ndarray:
        return self._hashes[self._number[clip_id]]

    def score(self, clip_id: str) -> float:
        return self._scores[self._number[clip_id]]

    def candidates(self, hashes: np.ndarray) -> list[str]:
        """Indexed clips sharing at least ``min_band_hits`` distinct (band, value) keys with the frames of
        ``hashes``, in the order they were added."""
        return [self._ids[k] for k in self._candidate_numbers(_codes(hashes))]

    def _candidate_numbers(self, codes: np.ndarray) -> list[int]:
        hits: Counter[int] = Counter()
        for key in self._keys(codes):
            hits.update(self._postings.get(key, ()))
        return sorted(k for k, n in hits.items() if n >= self.min_band_hits)

    def query(self, hashes: np.ndarray) -> list[tuple[str, float]]:
        """Indexed near-duplicates of a fingerprint: (clip_id, similarity), most similar first (ties by
        clip_id). Only the clips ``candidates`` names are verified (each adds 1 to ``verified``)."""
        codes = _codes(hashes)
        out = []
        for k in self._candidate_numbers(codes):
            self.verified += 1
            s = similarity(codes, self._hashes[k], self.max_distance)
            if s >= self.min_similarity:
                out.append((self._ids[k], s))
        out.sort(key=lambda t: (-t[1], t[0]))
        return out

    def dedup(self, clips: Sequence[tuple[str, np.ndarray, float]]) -> dict[str, str]:
        """Decide one batch against the batch itself and the index, then index the clips kept.

        Within the batch, ``group`` keeps the best clip of each group of near-duplicates. A kept clip
        that matches an indexed clip is a duplicate of its most similar match (indexed clips were
        kept earlier, so they stay whatever the scores). A clip indexed already (the same id: decided
        again, as a retried clip that failed after its first decision is) does not match itself.
        Returns duplicate clip_id -> the clip_id kept in its place (never itself a key); clips absent
        from the result are kept and indexed.
        """
        within = group(clips, self.max_distance, self.min_similarity, self.bands, self.min_band_hits)
        out: dict[str, str] = {}
        kept = sorted((c for c in clips if c[0] not in within), key=lambda c: c[0])
        for clip_id, hashes, _score in kept:
            matches = [m for m in self.query(hashes) if m[0] != clip_id]  # never a duplicate of itself
            if matches:
                out[clip_id] = matches[0][0]
        for dup, best in within.items():
            out[dup] = out.get(best, best)
        for clip_id, hashes, score in kept:
            if clip_id not in out and clip_id not in self:  # (indexed already: the clip decided again)
                self.add(clip_id, hashes, score)
        return out

    def to_table(self) -> pa.Table:
        """clip_id string, hashes list<uint64>, score float64; rows in the order added."""
        lengths = np.array([len(h) for h in self._hashes], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = np.concatenate(self._hashes) if self._hashes else np.zeros(0, np.uint64)
        hashes = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.uint64()))
        return pa.Table.from_arrays(
            [pa.array(self._ids, pa.string()), hashes, pa.array(self._scores, pa.float64())], schema=_SCHEMA)

    @classmethod
    def from_table(cls, table: pa.Table, max_distance: int = DEFAULT_MAX_DISTANCE,
                   min_similarity: float = DEFAULT_MIN_SIMILARITY, bands: int = DEFAULT_BANDS,
                   min_band_hits: int = DEFAULT_MIN_BAND_HITS) -> NearDupIndex:
        """An index holding the rows of ``to_table`` (in their order). A table whose schema metadata
        names another hash is refused; the decision parameters are not stored, pass them again."""
        meta = table.schema.metadata or {}
        name = meta.get(b"spacetime.dedup.hash")
        if name is not None and name.decode() != HASH_NAME:
            raise ValueError(f"table holds {name.decode()} fingerprints, this code makes {HASH_NAME}")
        index = cls(max_distance, min_similarity, bands, min_band_hits)
        ids = table.column("clip_id").to_pylist()
        scores = table.column("score").to_pylist()
        col = table.column("hashes").combine_chunks()
        if isinstance(col, pa.ChunkedArray):  # an empty table
            col = pa.array([], pa.list_(pa.uint64()))
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False).astype(np.uint64)
        null = col.is_null().to_numpy(zero_copy_only=False)
        for k, (clip_id, score) in enumerate(zip(ids, scores, strict=True)):
            hashes = np.zeros(0, np.uint64) if null[k] else values[offsets[k]:offsets[k + 1]]
            index.add(clip_id, hashes, math.nan if score is None else score)
        return index


def group(clips: Iterable[tuple[str, np.ndarray, float]], max_distance: int = DEFAULT_MAX_DISTANCE,
          min_similarity: float = DEFAULT_MIN_SIMILARITY, bands: int = DEFAULT_BANDS,
          min_band_hits: int = DEFAULT_MIN_BAND_HITS) -> dict[str, str]:
    """Near-duplicate groups within one batch: connected components of the "near-duplicate" relation
    (so A~B and B~C put A and C together). In each group the clip with the highest score is kept
    (ties and NaN scores: NaN ranks last, then the smaller clip_id wins); returns every other member
    -> the kept clip_id. The result does not depend on the order of ``clips``; ids must be unique."""
    items = sorted(clips, key=lambda c: c[0])
    index = NearDupIndex(max_distance, min_similarity, bands, min_band_hits)
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for clip_id, hashes, score in items:
        index.add(clip_id, hashes, score)
        parent[clip_id] = clip_id
    for clip_id, hashes, _score in items:
        for other, _s in index.query(hashes):
            a, b = root(clip_id), root(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for clip_id, _hashes, _score in items:
        members.setdefault(root(clip_id), []).append(clip_id)
    out: dict[str, str] = {}
    for ids in members.values():
        best = min(ids, key=lambda c: (-_rank(index.score(c)), c))
        out.update({c: best for c in ids if c != best})
    return out
