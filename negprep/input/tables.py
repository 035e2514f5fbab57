"""Input tables: JSONL, CSV/TSV and Parquet files as polars frames, with the line of every row.

A row that cannot be parsed (malformed JSON, bytes that are not UTF-8, a CSV quoting error) is
kept as a `Problem` with its line number instead of stopping the read: the job's `on_bad_input`
policy decides later whether to stop or to set it aside. Where a format has value types (JSON,
Parquet) the reader records which values are not strings, so the contract checks in the read
stage can tell a number from a string and name the line of a wrong-typed value.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sys
from array import array
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from negprep.errors import InputError
from negprep.paths import locate

#: helper columns the read stage adds; input columns may not use the prefix
PREFIX = "__negprep_"
LINE = PREFIX + "line__"  # 1-based line (text formats) or row (Parquet) of each row
MAX_FIELDS = 10_000  # more distinct JSON keys than this is not a table
NOT_UTF8 = "not_utf8"  # cell type of a Parquet byte string that does not decode

_COMPRESSION = {".gz": "gzip", ".zst": "zstd"}
_BOM = b"\xef\xbb\xbf"
_SURROGATE = re.compile("[\ud800-\udfff]")
_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}


@dataclass(frozen=True)
class Problem:
    """A row that could not be parsed: where it is, why, and its raw text."""

    line: int
    reason: str
    detail: str
    raw: str


@dataclass
class RawTable:
    """One input file as read: a frame (one column per field, plus `LINE`) and what was wrong."""

    url: str
    fmt: str
    frame: pl.DataFrame
    problems: list[Problem] = field(default_factory=list)
    #: JSON and Parquet: column -> type ("a number", "an object", ..., NOT_UTF8) -> lines of values that
    #: are not strings; compact arrays, since a corpus with numeric ids has one entry per row
    cell_types: dict[str, dict[str, array]] = field(default_factory=dict)
    #: CSV/TSV: the data ended inside a quoted field (a piece cut inside a record that spans lines)
    open_quote_at_end: bool = False
    #: Parquet: column -> type of a column that is not a string column ("integer", "float", "list", ...)
    column_types: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def unit(self) -> str:
        return "row" if self.fmt == "parquet" else "line"

    @property
    def columns(self) -> list[str]:
        return [c for c in self.frame.columns if c != LINE]

    @property
    def rows_read(self) -> int:
        return self.frame.height + len(self.problems)


def compression(url: str) -> str | None:
    """gzip or zstd for a compressed text file (.gz, .zst), from its name; None otherwise."""
    name = url.rstrip("/").lower()
    return next((codec for ext, codec in _COMPRESSION.items() if name.endswith(ext)), None)


def table_format(url: str) -> str:
    """jsonl, parquet, csv or tsv, from the file name (a .gz or .zst text file too); InputError for
    anything else."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    codec = compression(name)
    if codec:
        name = name.rsplit(".", 1)[0]
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext) and not (codec and fmt == "parquet"):
            return fmt
    raise InputError(f"{url}: unknown table format (use .jsonl, .parquet, .csv or .tsv; .gz or .zst for text)")


def decompress(data: bytes, url: str) -> bytes:
    """The bytes of a file, decompressed when its name says it is compressed."""
    codec = compression(url)
    if not codec:
        return data
    try:
        return pa.input_stream(pa.BufferReader(data), compression=codec).read()
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{url}: not a readable {codec} file: {str(e).splitlines()[0]}") from None


def load_table(url: str, storage_options: dict | None = None) -> RawTable:
    """Read a whole input file; raises InputError only when the file as a whole is unusable."""
    fmt = table_format(url)
    folder, name = locate(url, storage_options)
    try:
        data = folder.read_bytes(name)
    except FileNotFoundError:
        raise InputError(f"{url}: file not found") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise InputError(f"{url}: cannot read: {e}") from None
    return parse_table(decompress(data, url), fmt, url)


def parse_table(data: bytes, fmt: str, url: str, first: int = 1, header: list[str] | None = None) -> RawTable:
    """Parse the bytes of a file in format `fmt` (see `table_format`); `url` names it in messages.

    A piece of a text file (negprep.input.pieces) starts at line `first`; a CSV/TSV piece after the
    first gets the file's `header`.
    """
    if fmt == "jsonl":
        t = _parse_jsonl(data, url, first)
    elif fmt == "parquet":
        t = parquet_table(_read_parquet(data, url), url)
    elif fmt in ("csv", "tsv"):
        t = _parse_csv(data, url, "\t" if fmt == "tsv" else ",", first, header)
    else:
        raise InputError(f"{url}: unknown table format {fmt!r}")
    t.sha256 = hashlib.sha256(data).hexdigest()
    return _no_reserved(t)


def _no_reserved(t: RawTable) -> RawTable:
    reserved = [c for c in t.columns if c.startswith(PREFIX)]
    if reserved:
        raise InputError(f"{t.url}: column name '{reserved[0]}' is reserved (prefix {PREFIX})")
    return t


def _frame(columns: list[str], rows: list[dict], lines: list[int]) -> pl.DataFrame:
    schema = {c: pl.String for c in columns}
    df = pl.from_dicts(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    return df.with_columns(pl.Series(LINE, lines, dtype=pl.Int64))


def _printable(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _parse_jsonl(data: bytes, url: str, first: int = 1) -> RawTable:
    data = data.removeprefix(_BOM)
    rows: list[dict] = []
    lines: list[int] = []
    problems: list[Problem] = []
    types: dict[str, dict[str, array]] = {}
    keys: dict[str, None] = {}
    # split on b"\n" only: str.splitlines would also break at U+2028 and friends, valid inside JSON
    for n, raw in enumerate(data.split(b"\n"), first):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(n, "not_utf8", f"bytes that are not UTF-8 at byte {e.start + 1}", _printable(raw)))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(Problem(n, "malformed_json", f"malformed JSON: {e.msg} (column {e.colno})", text))
            continue
        except (ValueError, RecursionError) as e:  # huge integers, absurd nesting
            problems.append(Problem(n, "malformed_json", f"malformed JSON: {str(e).splitlines()[0][:120]}", text))
            continue
        if not isinstance(obj, dict):
            what = _json_type(obj)
            problems.append(Problem(n, "malformed_json", f"expected a JSON object, got {what}", text))
            continue
        row, bad = {}, None
        for k, v in obj.items():
            if _SURROGATE.search(k) or (isinstance(v, str) and _SURROGATE.search(v)):
                bad = f"field '{_SURROGATE.sub('?', k)}': a \\u escape that is not a character (lone surrogate)"
                break
            if v is None or isinstance(v, str):
                row[k] = v
            else:
                row[k] = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else json.dumps(v)
                types.setdefault(k, {}).setdefault(_json_type(v), array("q")).append(n)
        if bad:
            problems.append(Problem(n, "not_utf8", bad, _SURROGATE.sub("\ufffd", text)))
            continue
        for k in row:
            if k not in keys:
                keys[k] = None
                if len(keys) > MAX_FIELDS:
                    raise InputError(f"{url}: line {n}: more than {MAX_FIELDS} distinct fields; not a table")
        rows.append(row)
        lines.append(n)
    # types recorded for a row later rejected by another check are harmless: lookups go by line
    return RawTable(url, "jsonl", _frame(list(keys), rows, lines), problems, cell_types=types)


def _json_type(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "an array"
    if v is None:
        return "null"
    return "a string"


def _parse_csv(data: bytes, url: str, sep: str, first: int = 1, header: list[str] | None = None) -> RawTable:
    data = data.removeprefix(_BOM)
    # surrogateescape keeps undecodable bytes as lone surrogates, so a bad byte costs one record
    text = data.decode("utf-8", "surrogateescape")
    src = list(io.StringIO(text, newline=""))  # lines as csv sees them (\n, \r\n or \r)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long fields are judged by read.max_text_chars
    reader = csv.reader(iter(src), delimiter=sep, quotechar='"', strict=True)
    rows: list[dict] = []
    lines: list[int] = []
    problems: list[Problem] = []
    open_at_end = False
    end = 0
    while True:
        start = end + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = reader.line_num
            raw = "".join(src[start - 1 : end])
            at = start + first - 1
            span = f" (the record runs over lines {at}-{end + first - 1})" if end > start else ""
            if header is None:
                raise InputError(f"{url}: line {at}: header: CSV quoting error: {e}{span}") from None
            open_at_end = end == len(src) and "unexpected end of data" in str(e)
            problems.append(Problem(at, "csv_error", f"CSV quoting error: {e}{span}", _clean(raw)))
            continue
        end = reader.line_num
        if not rec:
            continue  # a blank line is not a row
        raw = "".join(src[start - 1 : end])
        start += first - 1
        if header is None:
            if any(_SURROGATE.search(h) for h in rec):
                raise InputError(f"{url}: line {start}: header: bytes that are not UTF-8")
            dup = sorted({h for h in rec if rec.count(h) > 1})
            if dup:
                hint = "; the first line is read as the header: is it missing?" if all(_numeric(h) for h in rec) else ""
                raise InputError(f"{url}: line {start}: header: column '{dup[0]}' appears twice{hint}")
            header = rec
            continue
        if any(_SURROGATE.search(v) for v in rec):
            problems.append(Problem(start, "not_utf8", "bytes that are not UTF-8", _clean(raw)))
            continue
        if len(rec) != len(header):
            detail = f"{len(rec)} fields where the header has {len(header)} (a stray separator or quote?)"
            problems.append(Problem(start, "csv_error", detail, _clean(raw)))
            continue
        rows.append(dict(zip(header, rec, strict=True)))
        lines.append(start)
    t = RawTable(url, "csv" if sep == "," else "tsv", _frame(header or [], rows, lines), problems)
    t.open_quote_at_end = open_at_end
    return t


def csv_header(data: bytes, url: str, fmt: str) -> list[str]:
    """The header of a CSV/TSV file from its first bytes (pieces after the first need it)."""
    text = data.removeprefix(_BOM).decode("utf-8", "surrogateescape")
    for rec in csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",", quotechar='"'):
        if rec:
            return rec
    raise InputError(f"{url}: no header in the first {len(data):,} bytes")


def _numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _clean(raw: str) -> str:
    """Raw text safe to store: undecodable bytes (lone surrogates) become U+FFFD."""
    return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _read_parquet(data: bytes, url: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as e:  # noqa: BLE001 - any decoder failure means the file as a whole is unusable
        raise InputError(f"{url}: not a readable Parquet file: {str(e).splitlines()[0]}") from None


def parquet_table(table: pa.Table, url: str, first: int = 1) -> RawTable:
    """Parquet rows (a whole file, or row groups starting at row `first`) as a `RawTable`."""
    names = table.column_names
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise InputError(f"{url}: column '{dup[0]}' appears twice")
    cols: dict[str, pl.Series] = {}
    column_types: dict[str, str] = {}
    cell_types: dict[str, dict[str, array]] = {}
    for name, col in zip(names, table.columns, strict=True):
        typ = col.type
        if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
            s = pl.Series(name, col.cast(pa.large_string()))
        elif pa.types.is_null(typ):
            s = pl.Series(name, [None] * len(col), dtype=pl.String)
        elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_binary_view(typ):
            # text written without the UTF-8 annotation is still text; bytes that do not decode are marked
            values = []
            for i, b in enumerate(col.to_pylist(), first):
                try:
                    values.append(None if b is None else b.decode("utf-8"))
                except UnicodeDecodeError:
                    cell_types.setdefault(name, {}).setdefault(NOT_UTF8, array("q")).append(i)
                    values.append(_printable(b))
            s = pl.Series(name, values, dtype=pl.String)
        elif pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ):
            s = pl.Series(name, col)
            column_types[name] = (
                "integer" if pa.types.is_integer(typ) else "float" if pa.types.is_floating(typ) else "boolean"
            )
        else:
            # dates, decimals, lists, structs...: kept as text so a rejected row can still be shown
            column_types[name] = str(typ)
            try:
                s = pl.Series(name, col.cast(pa.large_string()))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                s = pl.Series(name, [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()])
        cols[name] = s
    df = pl.DataFrame(list(cols.values())) if cols else pl.DataFrame()
    df = df.with_columns(pl.Series(LINE, range(first, first + table.num_rows), dtype=pl.Int64))
    return _no_reserved(RawTable(url, "parquet", df, [], cell_types=cell_types, column_types=column_types))
