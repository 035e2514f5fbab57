"""What the format registries hold (`negprep.output.formats`): a `RowFormat` per row format of
`data/` (the job's `format`), an `Export` per grouped export (the job's `exports`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from negprep.output.formats.groups import Group
from negprep.paths import Folder


@dataclass(frozen=True)
class RowFormat:
    """One row format: its name is the job's `format` and its contract (`schemas/<name>.yaml`).

    Every format is built from the same input, a query shard's *pairs* (`pairs.py`): one row per
    (query, positive) with its chosen negatives side by side, nearest first, null where the pair got
    fewer than `num_negatives`, with texts, scores and the teacher's `scores`."""

    name: str
    rows: Callable[[dict[str, list], int], dict[str, list]]  # (pairs, num_negatives) -> the format's columns
    configs: Callable[[int], dict[str, list[str]]]  # num_negatives -> the card's column-selecting configs
    usage: Callable[[str, int], list[str]]  # (output path, num_negatives) -> the card's lines on loading and losses
    rows_per_pair: Callable[[int], int]  # the rows a pair with every negative makes (cluster counts, batch sizes)
    pairs: str = "all"  # which pairs it writes (`pairs.written`): whole, with_negatives or all
    grouped: bool = False  # a pair's rows are one group: topic batches keep groups whole (pairs are staged)
    purpose: str = "text-embedding models"  # what the card says the data trains
    task: str = "sentence-similarity"  # the card's Hub task category


@dataclass(frozen=True)
class Export:
    """One grouped export: its name is the job's `exports` entry, its folder under the output and
    its contract (`schemas/<name>.yaml`)."""

    name: str
    suffix: str  # of its files: <output>/<name>/<query shard><suffix>
    table: Callable[[list[Group], dict], pa.Table]  # (groups, the job's `export` settings) -> rows of the contract
    write: Callable[[Folder, str, pa.Table], None]  # (its folder, file name, table)
    card_lines: Callable[[str, dict], list[str]]  # (output path, the job's config) -> the card's lines on training
    card_config: bool = False  # a `datasets` config of its own in the card (`load_dataset(OUT, name)`)


def write_parquet(folder: Folder, name: str, table: pa.Table) -> None:
    """The writer of a Parquet export."""
    folder.write_parquet(name, table)
