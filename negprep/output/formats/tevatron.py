"""Tevatron (`tevatron/*.parquet`): query_id, query, positive_passages / negative_passages as {docid, text, score}."""

from __future__ import annotations

import pyarrow as pa

from negprep.output.formats.entry import Export, write_parquet
from negprep.output.formats.groups import Group
from negprep.schemas import conform


def tevatron_table(groups: list[Group]) -> pa.Table:
    """Tevatron's training rows (schemas/tevatron.yaml)."""
    cols: dict[str, list] = {"query_id": [], "query": [], "positive_passages": [], "negative_passages": []}
    for g in groups:
        cols["query_id"].append(g.query_id)
        cols["query"].append(g.query)
        cols["positive_passages"].append([{"docid": d, "text": t, "score": s} for d, (t, s) in g.pos.items()])
        cols["negative_passages"].append([{"docid": d, "text": t, "score": s} for d, t, s in g.negatives()])
    return conform(pa.table(cols), "tevatron")


def card_lines(out_path: str, cfg: dict) -> list[str]:
    """How Tevatron's drivers read the export."""
    return [f"- Tevatron: `--dataset_name {out_path} --dataset_config tevatron` (or `--dataset_name parquet "
            f"--dataset_path '{out_path}/tevatron/*.parquet'`), for `driver.train` and `driver.train_distil` "
            "(every passage has its `score`)."]


EXPORT = Export(
    name="tevatron",
    suffix=".parquet",
    table=lambda groups, s: tevatron_table(groups),
    write=write_parquet,
    card_lines=card_lines,
    card_config=True,
)
