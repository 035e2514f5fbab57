"""The output folder's one writer (`Writer`), and its life: refused if it holds a dataset (unless
overwriting), marked `_INCOMPLETE` while a run writes it, and finished by `_SUCCESS`.

A reader that sees `_SUCCESS` sees a whole dataset; a folder with `_INCOMPLETE` and no `_SUCCESS`
is what a killed run left, and the next run replaces it without --overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from negprep.errors import ConfigError
from negprep.paths import File, Folder
from negprep.schemas import conform

INCOMPLETE = "_INCOMPLETE"  # in an output while a run writes it; `_SUCCESS` replaces it at the end


def has_files(out: Folder) -> bool:
    """Whether `out` holds anything but a write probe left by an interrupted pre-flight check."""
    return any(not n.startswith(".negprep-write-check") for n in out.ls())


def unfinished(out: Folder) -> bool:
    """An output a killed negprep run left behind (no `_SUCCESS`): safe to replace."""
    return out.exists(INCOMPLETE) and not out.exists("_SUCCESS")


def check_output(out: Folder, overwrite: bool) -> None:
    """Refuse an output that holds a finished dataset unless overwriting."""
    if has_files(out) and not overwrite and not unfinished(out):
        raise ConfigError(f"{out.url}: output exists; pass --overwrite to replace it")


def prepare_output(out: Folder, overwrite: bool) -> None:
    """Empty the output before the first file of a run goes in; an overwrite removes `_SUCCESS`
    first, so no reader takes a half-replaced folder for a dataset."""
    check_output(out, overwrite)
    if has_files(out):
        # object stores have no rename: the marker goes first, then the manifest, then the data
        out.rm("_SUCCESS")
        out.rm("manifest.json")
        out.rm("", recursive=True)
    # a run in progress: if it is killed, the rerun replaces this output without --overwrite
    out.write_bytes(INCOMPLETE, b"")


def finish_output(out: Folder) -> None:
    """The last write of a run: `_SUCCESS` in, `_INCOMPLETE` out."""
    out.write_bytes("_SUCCESS", b"")
    out.rm(INCOMPLETE)


@dataclass(frozen=True)
class Writer:
    """Everything a run writes into its output folder goes through here; stages hand it rows and
    statistics. Ray tasks carry it (it pickles with its folders).

    - `prepare` (the mine stage, first): the output emptied or refused, `_INCOMPLETE` in; the
      staging folder emptied;
    - `write_rows` and `write_exports` (the mine tasks, then the batch stage's writer tasks): a
      file of rows cast to the format's contract into `data/` (with topic batches the mine tasks
      write to `staging`, and the batch stage writes `data/` in batch order), and a query shard's
      grouped exports;
    - `write_rejected`, then `publish` (the publish stage, last): the rejected input rows, then the
      manifest, the card, the report and `_SUCCESS`.
    """

    out: Folder
    fmt: str
    n: int  # num_negatives
    staging: Folder | None = None  # with batch_size: the mined files before the batch stage orders them
    exports: tuple[str, ...] = ()
    export_settings: dict = field(default_factory=dict)

    @property
    def data(self) -> Folder:
        return self.out.sub("data")

    @property
    def mined(self) -> Folder:
        """Where the mine tasks write: `data/`, or the staging folder with topic batches."""
        return self.staging or self.data

    def prepare(self, overwrite: bool) -> None:
        prepare_output(self.out, overwrite)
        if self.staging:
            self.staging.rm("", recursive=True)

    def data_file(self, part: int, parts: int) -> File:
        return self.data.file(f"train-{part:05d}-of-{parts:05d}.parquet")

    def write_rows(self, dst: File, table: pa.Table, groups: tuple[str, ...] = ()) -> pa.Table:
        """`table` cast to the format's contract (with the optional field `groups`) into `dst`."""
        table = conform(table, self.fmt, n=self.n, where=dst.uri, groups=groups)
        dst.write_parquet(table)
        return table

    def write_exports(self, dst: File, table: pa.Table) -> dict[str, int]:
        """The grouped exports of a query shard's rows (`table`, written to `dst`); their counts."""
        if not self.exports:
            return {}
        from negprep.output.formats import write_exports

        stem = dst.name.removesuffix(".parquet")
        return write_exports(self.out, list(self.exports), stem, table, self.fmt, self.n, self.export_settings)

    def write_rejected(self, data: bytes) -> str:
        """The rejected input rows next to the data; their path in the output."""
        name = "rejected/input.parquet"
        self.out.write_bytes(name, data)
        return name

    def publish(self, manifest: dict) -> None:
        """The manifest, the card and the report, then `_SUCCESS`: the last writes of a run."""
        from negprep.output.report import publish_docs

        self.out.write_json("manifest.json", manifest)
        publish_docs(self.out, manifest)
        finish_output(self.out)
