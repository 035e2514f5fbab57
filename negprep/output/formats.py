"""Grouped exports: the output rows regrouped one row per query, in the layouts trainers read as is.

FlagEmbedding (`flagembedding/*.jsonl`: query, pos, neg, pos_scores, neg_scores) and Tevatron
(`tevatron/*.parquet`: query_id, query, positive_passages / negative_passages as
{docid, text, score}) train on groups: a query with every positive and its negatives. The mine
task of a query shard builds them from that shard's rows (a query lives in exactly one shard, so
no group is ever split), so the grouping scales with the shards and nothing passes through the
driver. Each passage is written once per query (by id); negatives keep their rank order; scores
are the teacher's, the same as the rows' `scores` column.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from negprep.paths import Folder
from negprep.schemas import conform

SUFFIX = {"flagembedding": ".jsonl", "tevatron": ".parquet"}


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


def group_rows(table: pa.Table, fmt: str, n: int) -> tuple[list[Group], dict[str, int]]:
    """Output rows of one query shard (`triplet` or `ntuple`, with `scores`) -> one group per query
    in order of first appearance, and counts that add up to the rows:
    `negatives` + `negatives_merged` = the rows' negatives (a negative shared by several positives
    of a query is written once), and `positives` = the distinct (query, positive) pairs."""
    names = ["negative"] if fmt == "triplet" else [f"negative_{i}" for i in range(1, n + 1)]
    cols = table.to_pydict()
    groups: dict[str, Group] = {}
    mentions = 0
    for r, qid in enumerate(cols["query_id"]):
        g = groups.get(qid) or groups.setdefault(qid, Group(qid, cols["query"][r]))
        scores = cols["scores"][r]
        g.pos.setdefault(cols["positive_id"][r], (cols["positive"][r], scores[0]))
        for i, name in enumerate(names, 1):
            d, rank = cols[f"{name}_id"][r], cols[f"{name}_rank"][r]
            have = g.neg.get(d)
            if have is None or rank < have[2]:
                g.neg[d] = (cols[name][r], scores[i], rank)
            mentions += 1
    out = list(groups.values())
    negatives = sum(len(g.neg) for g in out)
    counts = {"queries": len(out), "positives": sum(len(g.pos) for g in out), "negatives": negatives,
              "negatives_merged": mentions - negatives}
    return out, counts


def flagembedding_table(groups: list[Group], prompt: str = "", temperature: float | None = None) -> pa.Table:
    """FlagEmbedding's training rows (schemas/flagembedding.yaml); scores divided by `temperature`."""
    scale = 1.0 / temperature if temperature else 1.0
    cols: dict[str, list] = {"query": [], "pos": [], "neg": [], "pos_scores": [], "neg_scores": []}
    for g in groups:
        negs = g.negatives()
        cols["query"].append(g.query)
        cols["pos"].append([t for t, _ in g.pos.values()])
        cols["neg"].append([t for _, t, _ in negs])
        cols["pos_scores"].append([s * scale for _, s in g.pos.values()])
        cols["neg_scores"].append([s * scale for _, _, s in negs])
    if prompt:
        cols["prompt"] = [prompt] * len(groups)
    return conform(pa.table(cols), "flagembedding", groups=("prompt",) if prompt else ())


def tevatron_table(groups: list[Group]) -> pa.Table:
    """Tevatron's training rows (schemas/tevatron.yaml)."""
    cols: dict[str, list] = {"query_id": [], "query": [], "positive_passages": [], "negative_passages": []}
    for g in groups:
        cols["query_id"].append(g.query_id)
        cols["query"].append(g.query)
        cols["positive_passages"].append([{"docid": d, "text": t, "score": s} for d, (t, s) in g.pos.items()])
        cols["negative_passages"].append([{"docid": d, "text": t, "score": s} for d, t, s in g.negatives()])
    return conform(pa.table(cols), "tevatron")


def write_jsonl(folder: Folder, name: str, table: pa.Table) -> None:
    """One JSON object per line, written atomically like every other file."""
    buf = io.BytesIO()
    pl.from_arrow(table).write_ndjson(buf)
    folder.write_bytes(name, buf.getvalue())


def write_exports(out: Folder, names: list[str], stem: str, table: pa.Table, fmt: str, n: int,
                  settings: dict) -> dict[str, int]:
    """Write the grouped exports `names` of one query shard's output rows as `<out>/<export>/<stem>.*`;
    returns the counts of the groups (the same for every export)."""
    groups, counts = group_rows(table, fmt, n)
    for name in names:
        if name == "flagembedding":
            data = flagembedding_table(groups, settings.get("prompt") or "", settings.get("flagembedding_temperature"))
            write_jsonl(out.sub(name), stem + SUFFIX[name], data)
        else:
            out.sub(name).write_parquet(stem + SUFFIX[name], tevatron_table(groups))
    return counts
