"""Pieces of an input file: the unit of parallel, bounded-memory reading in the read stage.

A big file is cut into pieces that Ray tasks read at once, each holding only its own piece:

- Parquet by row groups (consecutive groups up to `read.piece_mb` of uncompressed data; one
  larger row group is one piece);
- JSONL, CSV and TSV by byte ranges: a line belongs to the piece where it starts, so a piece reads
  from the first line start in its range to the first line start after it;
- a compressed file (`.gz`, `.zst`) as one whole-file piece: it cannot be entered in the middle.

A text piece learns its first line from a first pass that counts the newlines of every range
(`count_newlines`), so line numbers in messages are the file's own, however it was cut. A CSV field
may hold a newline inside quotes; a piece that ends inside one says so (`RawTable.open_quote_at_end`)
and the read stage reads that file whole instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pyarrow.parquet as pq

from negprep.errors import InputError
from negprep.input.tables import RawTable, compression, csv_header, decompress, parquet_table, parse_table, table_format
from negprep.paths import locate

_CHUNK = 1 << 20  # bytes read at a time while looking for a line start or counting newlines


@dataclass(frozen=True)
class Piece:
    """One piece of one input file: a byte range (text), a row-group range (Parquet) or the whole file."""

    role: str
    url: str
    fmt: str
    index: int = 0
    start: int = 0  # first byte (text) or first row group (Parquet)
    end: int = -1  # one past the last byte or row group; -1: the whole file
    first_line: int = 1  # the number of the piece's first line (text) or row (Parquet)
    last: bool = True  # the file's last piece

    @property
    def whole(self) -> bool:
        return self.end < 0

    @property
    def name(self) -> str:
        """Its folder name: the same cut of the same file always has the same name."""
        return f"{self.role}-whole" if self.whole else f"{self.role}-{self.start:015d}-{self.end:015d}"


def plan(role: str, url: str, size: int, piece_bytes: int, storage: dict | None = None) -> list[Piece]:
    """Cut one input file into pieces of about `piece_bytes` (text pieces lack `first_line` until
    `with_lines` has the newline counts)."""
    fmt = table_format(url)
    whole = [Piece(role, url, fmt)]
    if compression(url) or (fmt != "parquet" and size <= piece_bytes):
        return whole
    if fmt == "parquet":  # cut by the row groups' uncompressed size: the memory a reader needs
        folder, name = locate(url, storage)
        try:
            with folder.open(name) as f:
                meta = pq.ParquetFile(f).metadata
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the reader with its reason
            return whole
        pieces, first, row, group_bytes, start = [], 1, 1, 0, 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            if g > start and group_bytes + rg.total_byte_size > piece_bytes:
                pieces.append(Piece(role, url, fmt, len(pieces), start, g, first, last=False))
                start, first, group_bytes = g, row, 0
            group_bytes += rg.total_byte_size
            row += rg.num_rows
        pieces.append(Piece(role, url, fmt, len(pieces), start, meta.num_row_groups, first, last=True))
        return pieces if len(pieces) > 1 else whole
    n = math.ceil(size / piece_bytes)
    return [Piece(role, url, fmt, k, k * piece_bytes, min(size, (k + 1) * piece_bytes), 0, last=k == n - 1)
            for k in range(n)]


def with_lines(pieces: list[Piece], newlines: list[int]) -> list[Piece]:
    """Text pieces with their first line, from the newlines counted in each byte range: a piece's
    first line starts after the first newline at or after its start (or at its start, after one)."""
    out, before = [], 0
    for p, n in zip(pieces, newlines, strict=True):
        out.append(replace(p, first_line=before + 1))  # corrected in `read` when the range starts mid-line
        before += n
    return out


def count_newlines(piece: Piece, storage: dict | None = None) -> int:
    """Newlines in the piece's raw byte range (a Ray task of the read stage's first pass)."""
    folder, name = locate(piece.url, storage)
    n, left = 0, piece.end - piece.start
    with folder.open(name) as f:
        f.seek(piece.start)
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def read(piece: Piece, storage: dict | None = None) -> RawTable:
    """The rows of one piece, numbered as in the whole file."""
    folder, name = locate(piece.url, storage)
    try:
        if piece.whole:
            return _whole(folder, name, piece)
        with folder.open(name) as f:
            if piece.fmt == "parquet":
                table = pq.ParquetFile(f).read_row_groups(list(range(piece.start, piece.end)))
                return parquet_table(table, piece.url, piece.first_line)
            size = folder.fs.size(folder.path(name))
            a, b = _line_start(f, piece.start, size), _line_start(f, piece.end, size)
            f.seek(a)
            data = f.read(max(0, b - a))
            header = None
            if piece.fmt in ("csv", "tsv") and piece.start > 0:
                f.seek(0)
                header = csv_header(f.read(_CHUNK), piece.url, piece.fmt)
    except FileNotFoundError:
        raise InputError(f"{piece.url}: file not found") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise InputError(f"{piece.url}: cannot read: {e}") from None
    first = piece.first_line + (1 if a > piece.start else 0)
    return parse_table(data, piece.fmt, piece.url, first, header)


def _whole(folder, name: str, piece: Piece) -> RawTable:
    return parse_table(decompress(folder.read_bytes(name), piece.url), piece.fmt, piece.url)


def _line_start(f, pos: int, size: int) -> int:
    """The first line start at or after byte `pos` (`size` when none)."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos - 1)
    at = pos - 1
    while chunk := f.read(_CHUNK):
        i = chunk.find(b"\n")
        if i >= 0:
            return at + i + 1
        at += len(chunk)
    return size
