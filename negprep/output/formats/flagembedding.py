"""FlagEmbedding (`flagembedding/*.jsonl`): query, pos, neg, pos_scores, neg_scores, one JSON line per query."""

from __future__ import annotations

import io

import polars as pl
import pyarrow as pa

from negprep.output.formats.entry import Export
from negprep.output.formats.groups import Group
from negprep.paths import Folder
from negprep.schemas import conform


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


def write_jsonl(folder: Folder, name: str, table: pa.Table) -> None:
    """One JSON object per line, written atomically like every other file."""
    buf = io.BytesIO()
    pl.from_arrow(table).write_ndjson(buf)
    folder.write_bytes(name, buf.getvalue())


def card_lines(out_path: str, cfg: dict) -> list[str]:
    """How to train FlagEmbedding on the export, and the temperature its distillation needs."""
    temp = (cfg.get("export") or {}).get("flagembedding_temperature")
    return [
        f"- FlagEmbedding: `--train_data {out_path}/flagembedding` (JSONL with `query`, `pos`, `neg`, "
        "`pos_scores`, `neg_scores`); add `--knowledge_distillation true` to train on the teacher scores. "
        "FlagEmbedding applies a softmax to `pos_scores`/`neg_scores` with no temperature, so raw cosine "
        "scores give nearly flat targets: "
        + (f"these are divided by {temp} (`export.flagembedding_temperature`)." if temp else
           "these are raw; set `export.flagembedding_temperature` (e.g. 0.05) to sharpen them."),
        "  FlagEmbedding needs `transformers<5`: run it in an environment of its own.",
    ]


EXPORT = Export(
    name="flagembedding",
    suffix=".jsonl",
    table=lambda groups, s: flagembedding_table(groups, s.get("prompt") or "", s.get("flagembedding_temperature")),
    write=write_jsonl,
    card_lines=card_lines,
)
