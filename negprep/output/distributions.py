"""Distributions for the manifest: fixed-bin histograms of the mine tasks' score samples and exact
count distributions, small enough to keep in JSON. The report draws them (`negprep.output.report`);
nothing here knows about HTML."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BINS = 40  # score and margin histograms; fixed so reports of different runs compare by eye




def edges_for(*arrays: np.ndarray, bins: int = BINS) -> np.ndarray | None:
    """`bins` equal bins spanning the finite values of all `arrays`; None when there are none."""
    data = [np.asarray(a, dtype=np.float64) for a in arrays if a is not None and len(a)]
    data = [a[np.isfinite(a)] for a in data]
    data = [a for a in data if len(a)]
    if not data:
        return None
    lo, hi = min(float(a.min()) for a in data), max(float(a.max()) for a in data)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1)


def hist_counts(a: np.ndarray | None, edges: np.ndarray) -> list[int]:
    """Counts of `a`'s finite values in each bin of `edges`."""
    if a is None or not len(a):
        return [0] * (len(edges) - 1)
    a = np.asarray(a, dtype=np.float64)
    return np.histogram(a[np.isfinite(a)], bins=edges)[0].astype(int).tolist()


def _shared(samples: dict[str, np.ndarray], names: dict[str, str]) -> dict | None:
    """Histograms of several samples over one set of edges (so their bars line up)."""
    arrays = {label: samples.get(key) for label, key in names.items()}
    edges = edges_for(*arrays.values())
    if edges is None:
        return None
    out: dict[str, Any] = {"edges": [round(float(e), 6) for e in edges]}
    for label, a in arrays.items():
        out[label] = hist_counts(a, edges)
    out["sampled"] = {label: 0 if a is None else int(len(a)) for label, a in arrays.items()}
    return out


def merge_distributions(parts: Sequence[dict[str, Sequence[int]]]) -> dict[str, list[int]]:
    """Element-wise sums of the mine tasks' exact count distributions (lists indexed by value)."""
    out: dict[str, list[int]] = {}
    for part in parts:
        for key, counts in (part or {}).items():
            acc = out.setdefault(key, [])
            if len(acc) < len(counts):
                acc.extend([0] * (len(counts) - len(acc)))
            for i, c in enumerate(counts):
                acc[i] += int(c)
    return out


def histograms(samples: dict[str, np.ndarray], distributions: dict[str, list[int]] | None = None) -> dict:
    """The manifest's `histograms`: what the report plots, small enough to keep in JSON.

    Args:
        samples: the mine tasks' concatenated samples (positive_scores, negative_scores, margins,
            negative_ranks, kept_scores, dropped_scores and the guide's, as far as present).
        distributions: exact counts indexed by value (negatives_per_pair, kept_per_query).
    """
    out: dict[str, Any] = {}
    specs = {
        "scores": {"positive": "positive_scores", "negative": "negative_scores"},
        "candidate_scores": {"kept": "kept_scores", "dropped": "dropped_scores"},
        "guide_scores": {"positive": "positive_guide_scores", "negative": "negative_guide_scores"},
        "margins": {"margin": "margins"},
    }
    for name, names in specs.items():
        if any(samples.get(k) is not None and len(samples[k]) for k in names.values()):
            h = _shared(samples, names)
            if h:
                out[name] = h
    ranks = samples.get("negative_ranks")
    if ranks is not None and len(ranks):
        out["negative_ranks"] = {"counts": np.bincount(np.asarray(ranks, dtype=np.int64)).astype(int).tolist()}
    for key, counts in (distributions or {}).items():
        out[key] = {"counts": [int(c) for c in counts]}
    return out
