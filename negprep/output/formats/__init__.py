"""The output's formats, as plug-ins: one module per family, one registry entry per format.

- Row formats (`FORMATS`, the job's `format`): the rows of `data/`. Each is a `RowFormat` built
  from a query shard's pairs (`pairs.py`): `contrastive.py` (`triplet`, `ntuple`, for
  text-embedding models), `reranker.py` (`labeled-pair`, `labeled-list`, for cross-encoders).
- Grouped exports (`EXPORTS`, the job's `exports`): a query shard's written pairs regrouped one
  row per query (`groups.group_rows`), in a layout a trainer reads as is: `flagembedding.py`,
  `tevatron.py`.

Each entry holds its contract (`schemas/<name>.yaml`), how its rows are built and written, its
`datasets` configs in the card and the card's lines on training with it. Adding a format is a
module here, its schema, and its entry in a registry; the config accepts exactly the names the
registries hold.
"""

from __future__ import annotations

import pyarrow as pa

from negprep.output.formats import contrastive, flagembedding, reranker, tevatron
from negprep.output.formats.entry import Export, RowFormat
from negprep.output.formats.groups import Group, group_rows
from negprep.paths import Folder

#: every row format by its name in the job's `format`
FORMATS: dict[str, RowFormat] = {f.name: f for f in (contrastive.TRIPLET, contrastive.NTUPLE, reranker.LABELED_PAIR,
                                                     reranker.LABELED_LIST)}

#: every grouped export by its name in the job's `exports`
EXPORTS: dict[str, Export] = {e.name: e for e in (flagembedding.EXPORT, tevatron.EXPORT)}


def write_exports(out: Folder, names: list[str], stem: str, pairs: pa.Table, n: int,
                  settings: dict) -> dict[str, int]:
    """Write the grouped exports `names` of one query shard's written pairs (with at least one
    negative each) as `<out>/<export>/<stem>.*`; returns the counts of the groups (the same for
    every export)."""
    groups, counts = group_rows(pairs, n)
    for name in names:
        e = EXPORTS[name]
        e.write(out.sub(name), stem + e.suffix, e.table(groups, settings))
    return counts


__all__ = ["EXPORTS", "FORMATS", "Export", "Group", "RowFormat", "group_rows", "write_exports"]
