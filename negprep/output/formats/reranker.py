"""Row formats for rerankers (sentence-transformers' CrossEncoder losses): `labeled-pair` and
`labeled-list`, the layouts of `mine_hard_negatives(output_format=...)` with ids and scores added.

A pair's rows are one group: its positive, labelled 1, then its negatives, labelled 0, nearest
first. Every pair is written, one with no negative as its positive alone; with topic batches only
pairs with every negative are (a batch holds whole groups). `score`/`scores` are the teacher's
(the guide's when the job has one, else the mining model's: the manifest's `teacher`),
`mining_score`/`mining_scores` the mining model's, `rank` null for the positive.
"""

from __future__ import annotations

from negprep.output.formats.entry import RowFormat
from negprep.output.formats.pairs import negatives_of, pair_columns

# a pair's columns a reranker row keeps (texts and the rest are its own columns)
_KEEP = ("query_id", "positive_id", "query")


def _docs(pairs: dict[str, list], r: int, n: int) -> list[tuple[str, str, float, float, int | None, float]]:
    """(id, text, label, teacher score, rank, mining score) of pair `r`'s positive, then its negatives."""
    scores = pairs["scores"][r]
    out = [(pairs["positive_id"][r], pairs["positive"][r], 1.0, scores[0], None, pairs["positive_score"][r])]
    out += [(pairs[f"negative_{i}_id"][r], pairs[f"negative_{i}"][r], 0.0, scores[i], pairs[f"negative_{i}_rank"][r],
             pairs[f"negative_{i}_score"][r]) for i in negatives_of(pairs, r, n)]
    return out


def _extra(pairs: dict[str, list]) -> list[str]:
    """The pair's columns beyond the texts and scores (cluster_id, batch_id): every row carries them."""
    return [c for c in pair_columns(pairs) if c not in (*_KEEP, "positive", "positive_score", "positive_guide_score")]


def labeled_pair_rows(pairs: dict[str, list], n: int) -> dict[str, list]:
    """One row per (query, passage): the pair's positive (label 1), then each negative (label 0)."""
    extra = _extra(pairs)
    names = [*_KEEP, "passage_id", "passage", "label", "score", "rank", "mining_score", *extra]
    out: dict[str, list] = {c: [] for c in names}
    for r in range(len(pairs["query_id"])):
        for doc in _docs(pairs, r, n):
            for c in (*_KEEP, *extra):
                out[c].append(pairs[c][r])
            for c, v in zip(("passage_id", "passage", "label", "score", "rank", "mining_score"), doc, strict=True):
                out[c].append(v)
    return out


def labeled_list_rows(pairs: dict[str, list], n: int) -> dict[str, list]:
    """One row per (query, positive): `docs` [positive, negatives...], `labels` [1, 0, ...], `scores`."""
    extra = _extra(pairs)
    lists = ("doc_ids", "docs", "labels", "scores", "ranks", "mining_scores")
    out: dict[str, list] = {c: [] for c in [*_KEEP, *lists, *extra]}
    for r in range(len(pairs["query_id"])):
        for c in (*_KEEP, *extra):
            out[c].append(pairs[c][r])
        for c, values in zip(lists, zip(*_docs(pairs, r, n), strict=True), strict=True):
            out[c].append(list(values))
    return out


def _pair_usage(out_path: str, n: int) -> list[str]:
    return [
        "# the card's configs select columns for sentence-transformers' CrossEncoder losses:",
        f'bce = datasets.load_dataset("{out_path}", "bce", split="train")          # BinaryCrossEntropyLoss',
        f'distill = datasets.load_dataset("{out_path}", "distill", split="train")  # MSELoss on the teacher\'s score',
        "```",
        "",
        "`bce` holds `query`, `passage`, `label` (1 for the positive, 0 for a mined negative); `distill` holds "
        "`query`, `passage` and `score`, the teacher's score, for MSELoss. Each (query, positive) pair is one group "
        f"of rows: its positive, then up to {n} negatives. `positive_id` names the pair a row belongs to; the id, "
        "rank and `mining_score` columns of `default` tell where every negative came from.",
    ]


def _list_usage(out_path: str, n: int) -> list[str]:
    return [
        "# the card's configs select columns for sentence-transformers' CrossEncoder losses:",
        f'listwise = datasets.load_dataset("{out_path}", "listwise", split="train")  # LambdaLoss, ListNetLoss, '
        "PListMLELoss",
        f'distill = datasets.load_dataset("{out_path}", "distill", split="train")    # ListNetLoss on the teacher\'s '
        "scores",
        "```",
        "",
        f"`listwise` holds `query`, `docs` (the positive, then up to {n} negatives, nearest first) and `labels` "
        "(1, then 0s); `distill` holds `query`, `docs` and `scores`, the teacher's score of each doc, for a listwise "
        "loss that reads graded labels. The `doc_ids`, `ranks` and `mining_scores` columns of `default` tell where "
        "every negative came from.",
    ]


LABELED_PAIR = RowFormat(
    name="labeled-pair",
    rows=labeled_pair_rows,
    configs=lambda n: {"bce": ["query", "passage", "label"], "distill": ["query", "passage", "score"]},
    usage=_pair_usage,
    rows_per_pair=lambda n: n + 1,
    grouped=True,
    purpose="rerankers (cross-encoders)",
    task="text-ranking",
)

LABELED_LIST = RowFormat(
    name="labeled-list",
    rows=labeled_list_rows,
    configs=lambda n: {"listwise": ["query", "docs", "labels"], "distill": ["query", "docs", "scores"]},
    usage=_list_usage,
    rows_per_pair=lambda n: 1,
    grouped=True,
    purpose="rerankers (cross-encoders)",
    task="text-ranking",
)
