"""A query's group: the output rows of one query shard regrouped one row per query.

The mine task of a query shard builds the groups from that shard's rows (a query lives in exactly
one shard, so no group is ever split), so the grouping scales with the shards and nothing passes
through the driver. Each passage is kept once per query (by id); negatives keep their rank order;
scores are the teacher's, the same as the rows' `scores` column.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass
class Group:
    """One query's group: ids, texts and teacher scores of its positives and negatives."""

    query_id: str
    query: str
    pos: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (text, score), first seen first
    neg: dict[str, tuple[str, float, int]] = field(default_factory=dict)  # id -> (text, score, rank)

    def negatives(self) -> list[tuple[str, str, float]]:
        """(id, text, score) of the negatives, nearest first (ties by id)."""
        return [(d, t, s) for d, (t, s, _) in sorted(self.neg.items(), key=lambda x: (x[1][2], x[0]))]


def group_rows(pairs: pa.Table, n: int) -> tuple[list[Group], dict[str, int]]:
    """A query shard's pairs (`pairs.py`: the `ntuple` layout, null past a pair's negatives) -> one
    group per query in order of first appearance, and counts that add up to the pairs' negatives:
    `negatives` + `negatives_merged` = the pairs' negatives (a negative shared by several positives
    of a query is written once), and `positives` = the distinct (query, positive) pairs."""
    cols = pairs.to_pydict()
    groups: dict[str, Group] = {}
    mentions = 0
    for r, qid in enumerate(cols["query_id"]):
        g = groups.get(qid) or groups.setdefault(qid, Group(qid, cols["query"][r]))
        scores = cols["scores"][r]
        g.pos.setdefault(cols["positive_id"][r], (cols["positive"][r], scores[0]))
        for i in range(1, n + 1):
            d, rank = cols[f"negative_{i}_id"][r], cols[f"negative_{i}_rank"][r]
            if d is None:
                continue
            have = g.neg.get(d)
            if have is None or rank < have[2]:
                g.neg[d] = (cols[f"negative_{i}"][r], scores[i], rank)
            mentions += 1
    out = list(groups.values())
    negatives = sum(len(g.neg) for g in out)
    counts = {"queries": len(out), "positives": sum(len(g.pos) for g in out), "negatives": negatives,
              "negatives_merged": mentions - negatives}
    return out, counts
