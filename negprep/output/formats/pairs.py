"""The pairs of a query shard: the one input every row format is built from.

One row per (query, positive) pair: `query_id`, `query`, `positive_id`, `positive`,
`positive_score` (and `positive_guide_score` with a guide), then its negatives side by side,
nearest first: `negative_{i}`, `negative_{i}_id`, `negative_{i}_score`, `negative_{i}_rank` (and
`negative_{i}_guide_score`) for i = 1..num_negatives, null past the negatives the pair got; and
`scores`, the teacher's [positive, negative_1, ...], null where the negative is. Any other column
(`cluster_id`, `batch_id`) belongs to the pair and goes to each of its rows. This is the `ntuple`
layout with nulls allowed, so pairs staged for topic batches are `ntuple` files.
"""

from __future__ import annotations

NEGATIVE = ("", "_id", "_score", "_rank", "_guide_score")  # the suffixes of a negative's columns


def negative_columns(i: int) -> list[str]:
    """The columns of the i-th negative (1-based)."""
    return [f"negative_{i}{s}" for s in NEGATIVE]


def pair_columns(pairs: dict[str, list]) -> list[str]:
    """The columns that belong to the pair as a whole (query, positive, cluster, batch): every row of
    the pair carries them."""
    return [c for c in pairs if not c.startswith("negative_") and c != "scores"]


def negatives_of(pairs: dict[str, list], r: int, n: int) -> list[int]:
    """The 1-based indices of the negatives pair `r` got."""
    return [i for i in range(1, n + 1) if pairs[f"negative_{i}_id"][r] is not None]


def select(pairs: dict[str, list], keep: list[bool]) -> dict[str, list]:
    """The pairs where `keep` is true."""
    return {c: [v for v, k in zip(col, keep, strict=True) if k] for c, col in pairs.items()}


def written(pairs: dict[str, list], n: int, which: str) -> list[bool]:
    """Which pairs a format writes: `whole` (all n negatives), `with_negatives` (at least one) or `all`."""
    got = [len(negatives_of(pairs, r, n)) for r in range(len(pairs["query_id"]))]
    if which == "whole":
        return [g == n for g in got]
    return [g > 0 for g in got] if which == "with_negatives" else [True] * len(got)
