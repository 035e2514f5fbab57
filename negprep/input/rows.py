"""One input's rows on their way through the checks (`Rows`): the columns a check picks, and every
rejected row with its reason, line and message."""

from __future__ import annotations

import difflib
from collections import Counter

import numpy as np
import polars as pl

from negprep.errors import InputError
from negprep.input.tables import LINE, NOT_UTF8, PREFIX, RawTable
from negprep.storage import redact

FIRST = f"{PREFIX}first__"  # a normalised column: the first line of an id (prefixed: never an input column)
REJECTED_SCHEMA = {"line": pl.Int64, "reason": pl.String, "detail": pl.String, "row": pl.String}


class Rows:
    """One input's rows on their way through the checks; rejects keep reason, line and message."""

    def __init__(self, role: str, table: RawTable, piece_of_several: bool = False,
                 columns: dict[str, str] | None = None):
        self.role, self.t = role, table
        self.name = table.url
        self.rows_read = table.rows_read  # the whole input's, when `table` holds several pieces' rows
        self.rejected: list[pl.DataFrame] = []
        # JSON lines name their own keys, so one piece of a file may lack a column, or an alias of it, that the
        # others have. A piece records what it picked (`picked`: what -> [column, rank among the names] or None)
        # and what it lacks (`absent`: the error a whole read would raise); the read stage then has the pieces
        # that picked otherwise checked again with the file's `columns` (what -> column), as a whole read picks
        self.piece_of_several = piece_of_several
        self.columns = columns or {}
        self.picked: dict[str, list | None] = {}
        self.absent: list[str] = []
        if table.problems:
            p = table.problems
            self.rejected.append(
                pl.DataFrame(
                    {
                        "line": [x.line for x in p],
                        "reason": [x.reason for x in p],
                        "detail": [x.detail for x in p],
                        "row": [x.raw for x in p],
                    },
                    schema=REJECTED_SCHEMA,
                )
            )

    def pick(self, names: tuple[str, ...], what: str, required: bool = True) -> str | None:
        cols = self.t.columns
        if what in self.columns:  # the file's choice: rows of this piece without it have it empty
            return self._present(self.columns[what])
        for rank, n in enumerate(names):
            if n in cols:
                self.picked[what] = [n, rank]
                return n
        self.picked[what] = None
        if not required:
            return None
        hint = ""
        near = difflib.get_close_matches(names[0], cols, n=1, cutoff=0.6)
        if near:
            hint = f"; did you mean '{near[0]}'?"
        elif cols and all(c.strip().lstrip("-").isdigit() for c in cols):
            hint = "; the first line is read as the header: is it missing?"
        found = ", ".join(cols) if cols else "no columns"
        message = f"{self.name}: no {what} column (looked for {', '.join(names)}; found {found}){hint}"
        if not self.piece_of_several:
            raise InputError(message)
        self.absent.append(message)
        return self._present(names[0])

    def _present(self, col: str) -> str:
        """`col`, added empty where this piece's rows lack it: each row is then checked as a whole read checks it."""
        if col not in self.t.columns:
            self.t.frame = self.t.frame.with_columns(pl.lit(None, pl.String).alias(col))
        return col

    def reject(self, df: pl.DataFrame, bad: pl.Expr, reason: str, detail: pl.Expr | str) -> pl.DataFrame:
        """Rows of `df` where `bad` holds (or is null) go to the rejected rows; the rest is returned."""
        mask = df.select(bad.fill_null(True).alias("m"))["m"]
        if not mask.any():
            return df
        hit = df.filter(mask)
        cols = self.t.columns
        row = pl.struct([pl.col(c) for c in cols]).struct.json_encode() if cols else pl.lit("{}")
        text = pl.lit(detail, pl.String) if isinstance(detail, str) else detail.cast(pl.String).fill_null("")
        reason_col = pl.lit(reason, pl.String).alias("reason")
        self.rejected.append(hit.select(pl.col(LINE).alias("line"), reason_col, text.alias("detail"), row.alias("row")))
        return df.filter(~mask)

    def check_type(self, df: pl.DataFrame, col: str, allowed: tuple[set[str], set[str]]) -> pl.DataFrame:
        """A wrong-typed Parquet column stops the job (every row would fail); JSON values fail per row."""
        ctype = self.t.column_types.get(col)
        if ctype is not None and ctype not in allowed[1]:
            expected = " or ".join(["string", *sorted(allowed[1])])
            raise InputError(f"{self.name}: column '{col}' has type {ctype}, expected {expected}")
        for kind, lines in (self.t.cell_types.get(col) or {}).items():
            at = pl.col(LINE).is_in(pl.Series(np.frombuffer(lines, dtype=np.int64)).implode())
            if kind == NOT_UTF8:
                df = self.reject(df, at, "not_utf8", pl.format("'{}': bytes that are not UTF-8", pl.lit(col)))
            elif kind not in allowed[0]:
                detail = pl.format("'{}' is {}, expected a string", pl.lit(col), pl.lit(kind))
                df = self.reject(df, at, "wrong_type", detail)
        return df

    def too_long(self, df: pl.DataFrame, col: str, limit: int | None, what: str = "text") -> pl.DataFrame:
        if not limit:
            return df
        n = pl.col(col).str.len_chars()
        return self.reject(
            df,
            n > limit,
            "text_too_long",
            pl.format(f"{what} of {{}} characters is longer than read.max_text_chars ({limit})", n),
        )

    def dedup(self, df: pl.DataFrame, key: list[str], reason: str, what: str,
              first: pl.DataFrame | None = None) -> pl.DataFrame:
        """Keep the first row of each key; later ones are rejected naming the first one's line.

        `first` (LINE -> first line of its key) gives the first lines when `df` is one piece of an
        input whose duplicates were found across pieces (negprep.stages.read)."""
        if first is None:
            df = df.with_columns(pl.col(LINE).min().over(key).alias(FIRST))
        else:
            df = df.join(first, on=LINE, how="left", maintain_order="left")
            df = df.with_columns(pl.col(FIRST).fill_null(pl.col(LINE)))
        shown = pl.concat_str([pl.col(k).str.slice(0, 80) for k in key], separator="', '")
        detail = pl.format(f"{what} '{{}}' (first on {self.t.unit} {{}})", shown, pl.col(FIRST))
        return self.reject(df, pl.col(LINE) != pl.col(FIRST), reason, detail).drop(FIRST)

    def frame(self) -> pl.DataFrame:
        """The rejected rows, with input and file."""
        if not self.rejected:
            return pl.DataFrame(schema={"input": pl.String, "file": pl.String, **REJECTED_SCHEMA})
        df = pl.concat(self.rejected, how="vertical_relaxed")
        return df.select(
            pl.lit(self.role, pl.String).alias("input"), pl.lit(redact(self.name), pl.String).alias("file"), pl.all()
        ).sort("line", maintain_order=True)

    def message(self, line: int, detail: str) -> str:
        return f"{self.name}: {self.t.unit} {line}: {detail}"


def require_columns(absent: list[list[str]]) -> None:
    """Every piece of a file with rows lacks a required column (`Rows.absent` of each): the error a
    whole read stops with."""
    if absent and all(absent):
        raise InputError(absent[0][0])


def file_columns(picked: list[dict[str, list | None]]) -> tuple[dict[str, str], list[int]]:
    """From every piece's `Rows.picked`: the column a whole read picks for each field (the
    first-ranked name any piece has), and the pieces that picked otherwise (pieces without rows
    picked nothing and are left as they are)."""
    columns: dict[str, list] = {}
    for p in picked:
        for what, v in p.items():
            if v and (what not in columns or v[1] < columns[what][1]):
                columns[what] = v
    chosen = {what: v[0] for what, v in columns.items()}
    redo = [i for i, p in enumerate(picked) if p and any((p.get(w) or [None])[0] != c for w, c in chosen.items())]
    return chosen, redo


def require_rows(rows: Rows, parsed: int) -> None:
    """An input with no parsed row at all stops the job, naming its first problem if it has one."""
    if parsed:
        return
    problems = [df for df in rows.rejected if df.height]
    if problems:
        p = pl.concat(problems).sort("line").row(0, named=True)
        raise InputError(f"{rows.message(p['line'], p['detail'])} (and no row of the file is readable)")
    raise InputError(f"{rows.name}: no rows")


def account(rows: dict[str, Rows], used: dict[str, int], unused: dict[str, dict[str, int]], policy: str,
            positives: int) -> tuple[dict[str, dict], pl.DataFrame]:
    """Per-input stats (rows read = used + unused + rejected by reason) and all rejected rows; under
    `strict` the first rejected row raises, and no positive at all always does."""
    rejected = {role: r.frame() for role, r in rows.items()}
    stats: dict[str, dict] = {}
    for role, r in rows.items():
        rej = rejected[role]
        by_reason = dict(sorted(Counter(rej["reason"].to_list()).items()))
        s = {
            "rows_read": r.rows_read,
            "rows_used": used[role],
            **{f"rows_unused_{k}": v for k, v in unused[role].items()},
            "rows_rejected": rej.height,
            "rejected": by_reason,
            "problems": [r.message(ln, d) for ln, d in zip(rej["line"][:5], rej["detail"][:5], strict=True)],
        }
        balance = s["rows_used"] + sum(unused[role].values()) + s["rows_rejected"]
        if balance != s["rows_read"]:  # a bug, never bad input: every row must land in exactly one place
            raise RuntimeError(f"{role}: rows read {s['rows_read']} != used + unused + rejected {balance}")
        stats[role] = s
    all_rejected = pl.concat(list(rejected.values()))
    if policy == "strict" and all_rejected.height:
        raise InputError(strict_message(rows, rejected))
    if positives == 0:
        role = "pairs" if "pairs" in rows else "qrels"
        s = stats[role]
        why = ", ".join(f"{k} {v}" for k, v in {**s["rejected"], **unused.get(role, {})}.items()) or "no rows"
        raise InputError(f"{rows[role].name}: no usable (query, positive) pair ({why})")
    return stats, all_rejected


def strict_message(rows: dict[str, Rows], rejected: dict[str, pl.DataFrame]) -> str:
    """The one line `on_bad_input: strict` stops with: the first rejected row, and how many more."""
    role = next(r for r, df in rejected.items() if df.height)
    first = rejected[role].row(0, named=True)
    counts = Counter(x for df in rejected.values() for x in df["reason"].to_list())
    total = sum(counts.values())
    more = ""
    if total > 1:
        more = f" ({total} problems in all: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + ")"
    hint = "; on_bad_input: lenient sets bad rows aside instead"
    return rows[role].message(first["line"], first["detail"]) + more + hint
