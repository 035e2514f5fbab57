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
import math
from dataclasses import dataclass

import numpy as np

KEEP = 0
#: Drop reasons, in the order they are checked. Index i + 1 is the code in `reason` matrices.
#: A duplicate of a positive is the surest false negative, so it is checked first, then a near-copy
#: (cosine to a positive >= `near_duplicate` under the mining model); then a copy of a
#: better-ranked candidate (one pair's negatives never repeat a text); then the mining model's own
#: bounds and margins; then the guide model's (GISTEmbed) rules: against the positive, then against
#: the query's own candidates (an outlier among them).
REASONS = (
    "duplicate_of_positive",
    "near_duplicate_of_positive",
    "duplicate_of_candidate",
    "max_score",
    "min_score",
    "absolute_margin",
    "relative_margin",
    "guide_max_score",
    "guide_absolute_margin",
    "guide_relative_margin",
    "guide_max_zscore",
)
OUTSIDE = -1  # outside [range_min, range_max) or padding: not a candidate at all


@dataclass(frozen=True)
class Rules:
    """What makes a candidate a negative (the job's top-level mining keys and its guide section)."""

    num_negatives: int = 5
    range_min: int = 0
    range_max: int = 50
    relative_margin: float | None = None
    absolute_margin: float | None = None
    max_score: float | None = None
    min_score: float | None = None
    sampling: str = "top"
    seed: int = 42
    margin_bins: int = 10  # `balanced` sampling: equal-width margin bins per (query, positive)
    near_duplicate: float | None = None  # cosine to a positive from which a candidate is its near-copy
    unit_scores: bool = True  # scores are inner products of unit vectors (embed.normalize)
    guide_relative_margin: float | None = None
    guide_absolute_margin: float | None = None
    guide_max_score: float | None = None
    guide_max_zscore: float | None = None  # drop a guide score this many standard deviations above the window's mean


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


def window_zscores(scores: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """(n, K) each score's z-score against its row's scores where `inside`: (s - mean) / std.

    A row's relevant passages are the upper tail of the guide's scores over its candidates, whatever
    its positive scored, and a z-score needs no unit scale (cross-encoder logits work alike). A row
    with fewer than two finite scores inside, or all of them equal, has no outlier: z = 0. A NaN
    score stays NaN (it cannot be checked).
    """
    s = np.asarray(scores, dtype=np.float64)
    ok = inside & np.isfinite(s)
    cnt = ok.sum(axis=1, keepdims=True)
    x = np.where(ok, s, 0.0)
    mean = x.sum(axis=1, keepdims=True) / np.maximum(cnt, 1)
    std = np.sqrt(np.where(ok, (s - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / np.maximum(cnt, 1))
    spread = (cnt >= 2) & (std > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(spread, (s - mean) / np.where(spread, std, 1.0), 0.0)
    return np.where(np.isnan(s), np.nan, z)


def _above(scores: np.ndarray, thr: np.ndarray) -> np.ndarray:
    # NaN on either side counts as above: a score that cannot be checked is not kept
    return ~(scores <= thr[:, None])


def classify(
    scores: np.ndarray,
    ref: np.ndarray,
    rules: Rules,
    guide: np.ndarray | None = None,
    guide_ref: np.ndarray | None = None,
    duplicate: np.ndarray | None = None,
    repeated: np.ndarray | None = None,
    similarity: np.ndarray | None = None,
) -> np.ndarray:
    """Reason code per candidate: KEEP, 1 + index into REASONS, or OUTSIDE.

    Args:
        scores: (n, K) mining-model candidate scores by rank, NaN for padding.
        ref: (n,) the lowest positive score of each query (NaN: no positive score known, so the
            margin rules cannot hold and every candidate is dropped by them).
        guide: (n, K) guide-model scores of the same candidates, when there is a guide.
        guide_ref: (n,) the guide's lowest positive score of each query.
        duplicate: (n, K) True where the candidate's normalised text equals a positive's.
        repeated: (n, K) True where it equals a better-ranked candidate's (`repeated_texts`).
        similarity: (n, K) the candidate's highest cosine to one of the query's positives (NaN: too
            far by score to be a near-copy, not computed).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n, k = scores.shape
    code = np.full((n, k), OUTSIDE, dtype=np.int8)
    ranks = np.arange(k)
    window = (ranks >= rules.range_min) & (ranks < rules.range_max)
    code[window[None, :] & ~np.isnan(scores)] = KEEP
    g = None if guide is None else np.asarray(guide, dtype=np.float64)
    checks = {
        "duplicate_of_positive": (duplicate is not None, lambda: duplicate),
        "near_duplicate_of_positive": (similarity is not None and rules.near_duplicate is not None,
                                       lambda: similarity >= rules.near_duplicate),
        "duplicate_of_candidate": (repeated is not None, lambda: repeated),
        "max_score": (rules.max_score is not None, lambda: scores > rules.max_score),
        "min_score": (rules.min_score is not None, lambda: scores < rules.min_score),
        "absolute_margin": (rules.absolute_margin is not None,
                            lambda: _above(scores, margin_thresholds(ref, None, rules.absolute_margin))),
        "relative_margin": (rules.relative_margin is not None,
                            lambda: _above(scores, margin_thresholds(ref, rules.relative_margin, None))),
        "guide_max_score": (g is not None and rules.guide_max_score is not None,
                            lambda: ~(g <= rules.guide_max_score)),
        "guide_absolute_margin": (g is not None and rules.guide_absolute_margin is not None,
                                  lambda: _above(g, margin_thresholds(guide_ref, None, rules.guide_absolute_margin))),
        "guide_relative_margin": (g is not None and rules.guide_relative_margin is not None,
                                  lambda: _above(g, margin_thresholds(guide_ref, rules.guide_relative_margin, None))),
        # the statistics are over every window candidate, dropped or kept by an earlier rule
        "guide_max_zscore": (g is not None and rules.guide_max_zscore is not None,
                             lambda: ~(window_zscores(g, code != OUTSIDE) <= rules.guide_max_zscore)),
    }
    for i, name in enumerate(REASONS):
        active, rejects = checks[name]
        if active:
            code[(code == KEEP) & rejects()] = i + 1
    return code


def repeated_texts(keys: np.ndarray, known: np.ndarray, range_min: int, range_max: int) -> np.ndarray:
    """(n, K) True where a candidate in the window [range_min, range_max) has the text key of a
    better-ranked candidate of the same row in the window: the first copy is the one kept.

    Args:
        keys: (n, K) int64 normalised-text keys of the candidates.
        known: (n, K) False where a key is unknown (padding): never a copy.
    """
    n, k = keys.shape
    cols = np.arange(k)
    inside = known & ((cols >= range_min) & (cols < range_max))[None, :]
    rows, cs = np.nonzero(inside)
    out = np.zeros((n, k), dtype=bool)
    if len(rows) == 0:
        return out
    ks = keys[rows, cs]
    order = np.lexsort((cs, ks, rows))  # by row, then key, then rank: a copy follows its first occurrence
    r, kk = rows[order], ks[order]
    again = np.r_[False, (r[1:] == r[:-1]) & (kk[1:] == kk[:-1])]
    out[rows[order][again], cs[order][again]] = True
    return out


def near_copy_bound(threshold: float) -> float:
    """How far a near-copy's query score can be from its positive's: for a unit query and unit
    passages, |q.c - q.p| <= |c - p| = sqrt(2 - 2 cos(c, p)). Candidates farther need no check."""
    return math.sqrt(max(0.0, 2.0 - 2.0 * threshold))


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


def margin_bins(margins: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin (0..bins-1) of each margin between the row's min and max; -1 for NaN.

    One row (1-d). All-equal margins share bin 0; the maximum falls in the last bin.
    """
    m = np.asarray(margins, dtype=np.float64)
    out = np.full(m.shape, -1, dtype=np.int64)
    ok = np.isfinite(m)
    if not ok.any():
        return out
    lo, hi = m[ok].min(), m[ok].max()
    if hi > lo:
        out[ok] = np.clip(np.floor((m[ok] - lo) * bins / (hi - lo)), 0, bins - 1).astype(np.int64)
    else:
        out[ok] = 0
    return out


def balanced(keep: np.ndarray, margins: np.ndarray, n: int, seeds: np.ndarray, bins: int = 10) -> np.ndarray:
    """TAS-Balanced sampling: up to n kept candidates per row, spread evenly over margin bins.

    A row's kept candidates are binned by margin (positive score minus candidate score: by the
    guide model when there is one, else the mining model) into `bins` equal-width bins over the
    row's own range. Each pick chooses a bin uniformly among those with candidates left, then a
    candidate uniformly inside it, without replacement, from a generator seeded per row. Kept
    candidates whose margin is NaN form one extra bin, so no kept candidate is unreachable.
    Returns (rows, n) rank indices ascending, -1 where short, like `choose`.
    """
    rows, k = keep.shape
    out = np.full((rows, n), -1, dtype=np.int64)
    margins = np.asarray(margins, dtype=np.float64)
    for r in range(rows):
        idx = np.flatnonzero(keep[r])
        if len(idx) == 0:
            continue
        b = margin_bins(margins[r, idx], bins)
        b[b < 0] = bins  # the NaN bin
        groups = [list(idx[b == v]) for v in np.unique(b)]  # non-empty bins, in bin order
        rng = np.random.default_rng(int(seeds[r]))
        got = []
        for _ in range(min(n, len(idx))):
            g = int(rng.integers(len(groups)))
            got.append(groups[g].pop(int(rng.integers(len(groups[g])))))
            if not groups[g]:
                groups.pop(g)
        out[r, : len(got)] = np.sort(got)
    return out


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
