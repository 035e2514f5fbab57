"""What a registry entry of the grouped exports holds (`negprep.output.formats.EXPORTS`): an `Export`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from negprep.output.formats.groups import Group
from negprep.paths import Folder


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
