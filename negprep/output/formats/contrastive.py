"""Row formats for text-embedding models (sentence-transformers' losses): `triplet` and `ntuple`."""

from __future__ import annotations

from negprep.output.formats.entry import RowFormat
from negprep.output.formats.pairs import NEGATIVE, negatives_of, pair_columns


def triplet_rows(pairs: dict[str, list], n: int) -> dict[str, list]:
    """One row per (query, positive, negative), the pair's negatives nearest first."""
    carry = pair_columns(pairs)
    neg = [f"negative{s}" for s in NEGATIVE if f"negative_1{s}" in pairs]
    out: dict[str, list] = {c: [] for c in [*carry, *neg, "scores"]}
    for r in range(len(pairs["query_id"])):
        for i in negatives_of(pairs, r, n):
            for c in carry:
                out[c].append(pairs[c][r])
            for c in neg:
                out[c].append(pairs[c.replace("negative", f"negative_{i}", 1)][r])
            out["scores"].append([pairs["scores"][r][0], pairs["scores"][r][i]])
    return out


def _texts(n: int, fmt: str) -> list[str]:
    return ["query", "positive", *(["negative"] if fmt == "triplet" else [f"negative_{i}" for i in range(1, n + 1)])]


def _configs(fmt: str):
    def configs(n: int) -> dict[str, list[str]]:
        return {"mnrl": _texts(n, fmt), "distill": [*_texts(n, fmt), "scores"]}
    return configs


def _usage(fmt: str):
    def usage(out_path: str, n: int) -> list[str]:
        return [
            "# the card's configs select columns for sentence-transformers' losses:",
            f'mnrl = datasets.load_dataset("{out_path}", "mnrl", split="train")        '
            "# MultipleNegativesRankingLoss",
            f'distill = datasets.load_dataset("{out_path}", "distill", split="train")  '
            "# MarginMSELoss, DistillKLDivLoss",
            "```",
            "",
            f"`mnrl` holds {', '.join(f'`{c}`' for c in _texts(n, fmt))}, in the order MultipleNegativesRankingLoss "
            "expects; `distill` adds `scores` = [teacher(query, positive), teacher(query, negative), ...], the labels "
            "of MarginMSELoss and DistillKLDivLoss. The id, score and rank columns of `default` tell where every "
            "negative came from.",
        ]
    return usage


TRIPLET = RowFormat(
    name="triplet",
    rows=triplet_rows,
    configs=_configs("triplet"),
    usage=_usage("triplet"),
    rows_per_pair=lambda n: n,
    pairs="with_negatives",
)

# a pair with all n negatives is its own row, as it is: `ntuple` is the pairs' layout
NTUPLE = RowFormat(
    name="ntuple",
    rows=lambda pairs, n: pairs,
    configs=_configs("ntuple"),
    usage=_usage("ntuple"),
    rows_per_pair=lambda n: 1,
    pairs="whole",
)
