"""The mining rules as pure functions over arrays. Most of negprep's tests are on this file.

Candidates of a query come as a row of a (queries x K) score matrix, sorted by descending score,
with the query's labelled positives already removed: column j is the candidate of rank j (0 =
nearest non-positive). NaN marks padding where fewer than K candidates exist.

Rules follow NV-Retriever's positive-aware mining. The reference is the query's *lowest* positive
score, so a candidate that beats any positive by the margin is dropped whichever positive a row
is for. Every candidate in the window is kept or dropped for exactly one reason, the first rule in
`REASONS` order that rejects it, so the counts add up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KEEP = 0
#: Drop reasons, in the order they are checked. Index i + 1 is the code in `reason` matrices.
REASONS = ("max_score", "min_score", "absolute_margin", "relative_margin")
OUTSIDE = -1  # outside [range_min, range_max) or padding: not a candidate at all


@dataclass(frozen=True)
class Rules:
    """What makes a candidate a negative (the job's top-level mining keys)."""

    num_negatives: int = 5
    range_min: int = 0
    range_max: int = 50
    relative_margin: float | None = None
    absolute_margin: float | None = None
    max_score: float | None = None
    min_score: float | None = None
    sampling: str = "top"
    seed: int = 42


def margin_thresholds(ref: np.ndarray, relative: float | None, absolute: float | None) -> np.ndarray:
    """Highest score a candidate may have given the positive score(s) `ref` (inf when no margin).

    The relative margin moves the threshold *down* by m x |ref| whatever the sign of ref, so for a
    negative positive score (-0.2, m = 0.1) the threshold is -0.22, never -0.18.
    """
    ref = np.asarray(ref, dtype=np.float64)
    thr = np.full(ref.shape, np.inf)
    if relative is not None:
        thr = np.minimum(thr, ref - relative * np.abs(ref))
    if absolute is not None:
        thr = np.minimum(thr, ref - absolute)
    return thr


def classify(scores: np.ndarray, ref: np.ndarray, rules: Rules) -> np.ndarray:
    """Reason code per candidate: KEEP, 1 + index into REASONS, or OUTSIDE.

    Args:
        scores: (n, K) candidate scores by rank, NaN for padding.
        ref: (n,) the lowest positive score of each query (NaN: no positive score known, so the
            margin rules cannot hold and every candidate is dropped by them).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    code = np.full((n, k), OUTSIDE, dtype=np.int8)
    ranks = np.arange(k)
    window = (ranks >= rules.range_min) & (ranks < rules.range_max)
    live = window[None, :] & ~np.isnan(scores)
    code[live] = KEEP
    checks = (
        (rules.max_score is not None, lambda: scores > rules.max_score),
        (rules.min_score is not None, lambda: scores < rules.min_score),
        (
            rules.absolute_margin is not None,
            lambda: ~(scores <= margin_thresholds(ref, None, rules.absolute_margin)[:, None]),
        ),
        (
            rules.relative_margin is not None,
            lambda: ~(scores <= margin_thresholds(ref, rules.relative_margin, None)[:, None]),
        ),
    )
    for i, (active, rejects) in enumerate(checks):
        if active:
            hit = (code == KEEP) & rejects()
            code[hit] = i + 1
    return code


def row_seed(seed: int, *keys: str) -> int:
    """A stable 64-bit seed from the job seed and ids (never Python's salted hash())."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(seed).encode())
    for k in keys:
        h.update(b"\x00" + k.encode())
    return int.from_bytes(h.digest(), "little")


def choose(keep: np.ndarray, n: int, sampling: str, seeds: np.ndarray | None = None) -> np.ndarray:
    """Pick up to n kept candidates per row; (rows, n) rank indices ascending, -1 where short.

    `top` takes the n nearest kept candidates. `random` draws n of the kept ones uniformly without
    replacement, from a generator seeded per row (so a row's draw does not depend on which other
    rows share its block or worker).
    """
    rows, k = keep.shape
    if sampling == "top":
        key = np.where(keep, np.arange(k)[None, :], k).astype(np.float64)
    elif sampling == "random":
        if seeds is None:
            raise ValueError("random sampling needs per-row seeds")
        key = np.empty((rows, k))
        for r in range(rows):
            key[r] = np.random.default_rng(int(seeds[r])).random(k)
        key[~keep] = np.inf
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    m = min(n, k)
    picked = np.argsort(key, axis=1, kind="stable")[:, :m]
    picked = np.where(np.take_along_axis(keep, picked, axis=1), picked, -1)
    # nearest first, shortfalls (-1) at the end
    picked = np.sort(np.where(picked < 0, k, picked), axis=1)
    picked[picked == k] = -1
    if m < n:
        picked = np.pad(picked, ((0, 0), (0, n - m)), constant_values=-1)
    return picked


def reason_counts(code: np.ndarray) -> dict[str, int]:
    """Candidates in the window, kept, and dropped per reason."""
    counts = {"candidates": int((code != OUTSIDE).sum()), "kept": int((code == KEEP).sum())}
    for i, name in enumerate(REASONS):
        counts[f"dropped_{name}"] = int((code == i + 1).sum())
    return counts


def pad_rows(rows: list[np.ndarray], k: int | None = None, fill: float = np.nan) -> np.ndarray:
    """Stack ragged 1-d rows into an (n, K) float array padded with `fill`."""
    k = max((len(r) for r in rows), default=0) if k is None else k
    out = np.full((len(rows), k), fill, dtype=np.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:k]
    return out
