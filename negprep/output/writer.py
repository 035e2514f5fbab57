"""The output folder's one writer (`Writer`), and its life: refused if it holds a dataset (unless
overwriting), marked `_INCOMPLETE` while a run writes it, and finished by `_SUCCESS`.

A reader that sees `_SUCCESS` sees a whole dataset; a folder with `_INCOMPLETE` and no `_SUCCESS`
is what a killed run left, and the next run replaces it without --overwrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from negprep.errors import ConfigError
from negprep.output.formats import FORMATS, write_exports
from negprep.output.formats.pairs import negatives_of, select, written
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
    - `write_pairs` (the mine tasks): a query shard's pairs as rows of the format (`formats.FORMATS`)
      cast to its contract into `data/`, and its grouped exports; with topic batches the mine
      tasks write to `staging` and the batch stage's writer tasks write `data/` in batch order
      (`write_rows`; `pair_rows` first for a grouped format, whose pairs were staged whole);
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

    @property
    def stages_pairs(self) -> bool:
        """Whether the mine tasks stage pairs (`ntuple` files) rather than rows: a format whose pair
        is a group of rows, under topic batches, which keep groups whole."""
        return self.staging is not None and FORMATS[self.fmt].grouped

    def write_rows(self, dst: File, table: pa.Table, groups: tuple[str, ...] = (),
                   layout: str | None = None) -> pa.Table:
        """`table` cast to the contract `layout` (default the format's; with the optional field
        `groups`) into `dst`."""
        table = conform(table, layout or self.fmt, n=self.n, where=dst.uri, groups=groups)
        dst.write_parquet(table)
        return table

    def write_pairs(self, dst: File, pairs: dict[str, list], groups: tuple[str, ...] = ()) -> tuple[pa.Table, dict]:
        """A query shard's pairs (`formats.pairs`) as rows of the format into `dst` (with topic
        batches of a grouped format, the whole pairs themselves, which the batch stage turns into
        rows), and its grouped exports; the table written and the counts: `pairs_written`,
        `negatives_written` and the exports'."""
        fmt = FORMATS[self.fmt]
        keep = written(pairs, self.n, "whole" if self.stages_pairs else fmt.pairs)
        chosen = select(pairs, keep)
        if self.stages_pairs:
            table = self.write_rows(dst, pa.table(chosen), groups, layout="ntuple")
        else:
            table = self.write_rows(dst, pa.table(fmt.rows(chosen, self.n)), groups)
        got = [len(negatives_of(chosen, r, self.n)) for r in range(len(chosen["query_id"]))]
        counts = {"pairs_written": len(got), "negatives_written": sum(got)}
        if self.exports:
            # the pairs written with at least one negative: a group with no negative would stall a trainer
            stem = dst.name.removesuffix(".parquet")
            source = pa.table(select(pairs, [k and w for k, w in zip(keep, written(pairs, self.n, "with_negatives"),
                                                                          strict=True)]))
            counts["exports"] = write_exports(self.out, list(self.exports), stem, source, self.n,
                                              self.export_settings)
        return table, counts

    def pair_rows(self, staged: pa.Table) -> pa.Table:
        """Staged pairs (with their batch columns) as rows of the format."""
        return pa.table(FORMATS[self.fmt].rows(staged.to_pydict(), self.n))

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
