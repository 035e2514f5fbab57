"""Trainer formats of the grouped exports (`exports`): one module each, one entry in `EXPORTS`.

A grouped export regroups a query shard's output rows one row per query (`groups.group_rows`), in
a layout a trainer reads as is. Each format module defines one `Export`: its contract
(`schemas/<name>.yaml`), how its table is built from the groups and written, the config it adds
to the dataset card and the card's lines on how to train with it. Adding a format is a module
here, its schema, and its name in `EXPORTS`; the config accepts exactly the names in `EXPORTS`.
"""

from __future__ import annotations

import pyarrow as pa

from negprep.output.formats import flagembedding, tevatron
from negprep.output.formats.entry import Export
from negprep.output.formats.groups import Group, group_rows
from negprep.paths import Folder

#: every grouped export by its name in the job's `exports`
EXPORTS: dict[str, Export] = {e.name: e for e in (flagembedding.EXPORT, tevatron.EXPORT)}


def write_exports(out: Folder, names: list[str], stem: str, table: pa.Table, fmt: str, n: int,
                  settings: dict) -> dict[str, int]:
    """Write the grouped exports `names` of one query shard's output rows as `<out>/<export>/<stem>.*`;
    returns the counts of the groups (the same for every export)."""
    groups, counts = group_rows(table, fmt, n)
    for name in names:
        e = EXPORTS[name]
        e.write(out.sub(name), stem + e.suffix, e.table(groups, settings))
    return counts


__all__ = ["EXPORTS", "Export", "Group", "group_rows", "write_exports"]
