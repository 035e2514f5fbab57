"""Input rows checked against their contracts and normalised into corpus, queries and qrels.

Every check rejects rows with a reason, the row's line and a message; nothing is decided here
about stopping. `normalise` then applies the job's on_bad_input policy: strict raises the first
problem as one line, lenient returns the rejected rows (schemas/rejected_input.yaml) for the read
stage to keep. Every input is checked before anything expensive runs: columns present and of the
right type, ids present and unique, texts non-empty and not absurdly long, qrels naming known
queries and passages, and each line parseable.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from collections import Counter
from typing import Any

import numpy as np
import polars as pl

from negprep.config import Job, PairsInput
from negprep.errors import InputError
from negprep.input.files import fingerprints, input_files
from negprep.input.shards import text_key
from negprep.input.tables import LINE, NOT_UTF8, PREFIX, RawTable, load_table
from negprep.storage import redact

log = logging.getLogger(__name__)

_ID = ("_id", "id", "doc_id", "docid", "corpus_id", "query_id", "qid")
_QREL_Q = ("query-id", "query_id", "qid")
_QREL_D = ("corpus-id", "corpus_id", "doc_id", "docid", "pid")

#: why an input row can be rejected (schemas/rejected_input.yaml)
REASONS = (
    "malformed_json",
    "not_utf8",
    "csv_error",
    "wrong_type",
    "missing_id",
    "empty_text",
    "text_too_long",
    "duplicate_id",
    "duplicate_judgment",
    "duplicate_pair",
    "score_not_a_number",
    "unknown_query_id",
    "unknown_doc_id",
    "rejected_query_id",
    "rejected_doc_id",
)
_TEXT_CORPUS = ("text", "passage", "contents", "body")
_TEXT_QUERY = ("text", "query", "question")
_SCORE = ("score", "relevance", "label")
# value types accepted besides strings: (JSON value types, Parquet column types); ids may be numbers
_ID_TYPES = ({"a number"}, {"integer"})
_SCORE_TYPES = ({"a number"}, {"integer", "float"})
_TEXT_TYPES: tuple[set[str], set[str]] = (set(), set())
# normalised columns, prefixed so they never overwrite an input column shown in a rejected row
_C_ID, _C_TEXT, _C_Q, _C_D, _C_SCORE, _C_REF, _C_WHY, _C_WHERE, _C_FIRST = (
    f"{PREFIX}{c}__" for c in ("id", "text", "q", "d", "score", "ref", "why", "where", "first")
)
_REJECTED_SCHEMA = {"line": pl.Int64, "reason": pl.String, "detail": pl.String, "row": pl.String}


# Python's whitespace (str.isspace), which counts the ASCII separators \x1c-\x1f that polars'
# default strip (Unicode White_Space) keeps: a text of them alone is as empty as one of spaces
_SPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def _blank(col: str) -> pl.Expr:
    return pl.col(col).str.strip_chars(_SPACE).str.len_chars() == 0


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
                    schema=_REJECTED_SCHEMA,
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
            df = df.with_columns(pl.col(LINE).min().over(key).alias(_C_FIRST))
        else:
            df = df.join(first, on=LINE, how="left", maintain_order="left")
            df = df.with_columns(pl.col(_C_FIRST).fill_null(pl.col(LINE)))
        shown = pl.concat_str([pl.col(k).str.slice(0, 80) for k in key], separator="', '")
        detail = pl.format(f"{what} '{{}}' (first on {self.t.unit} {{}})", shown, pl.col(_C_FIRST))
        return self.reject(df, pl.col(LINE) != pl.col(_C_FIRST), reason, detail).drop(_C_FIRST)

    def frame(self) -> pl.DataFrame:
        """The rejected rows, with input and file."""
        if not self.rejected:
            return pl.DataFrame(schema={"input": pl.String, "file": pl.String, **_REJECTED_SCHEMA})
        df = pl.concat(self.rejected, how="vertical_relaxed")
        return df.select(
            pl.lit(self.role, pl.String).alias("input"), pl.lit(redact(self.name), pl.String).alias("file"), pl.all()
        ).sort("line", maintain_order=True)

    def message(self, line: int, detail: str) -> str:
        return f"{self.name}: {self.t.unit} {line}: {detail}"


def _text_expr(text_col: str, title_col: str | None, tmpl: str) -> pl.Expr:
    text = pl.col(text_col).cast(pl.String).fill_null("")
    if not title_col:
        return text
    title = pl.col(title_col).cast(pl.String).fill_null("")
    # "{title} {text}" -> title + " " + text, as polars expressions
    pieces = [title if p == "{title}" else text if p == "{text}" else pl.lit(p) for p in _template_parts(tmpl)]
    return pl.when(title.str.strip_chars() == "").then(text).otherwise(pl.concat_str(pieces).str.strip_chars())


def corpus_rows(rows: Rows, job: Job) -> pl.DataFrame:
    """The corpus rows that pass the per-row checks (duplicates are found afterwards)."""
    id_col = rows.pick(_ID, "id")
    text_col = rows.pick(_TEXT_CORPUS, "text")
    title_col = rows.pick(("title",), "title", required=False)
    df = rows.t.frame
    df = rows.check_type(df, id_col, _ID_TYPES)
    for c in (text_col, title_col):
        if c:
            df = rows.check_type(df, c, _TEXT_TYPES)
    df = df.with_columns(
        pl.col(id_col).cast(pl.String).alias(_C_ID),
        _text_expr(text_col, title_col, job.read.title_template).alias(_C_TEXT),
    )
    df = rows.reject(df, _blank(_C_ID), "missing_id", pl.format("no id ('{}' is empty)", pl.lit(id_col)))
    df = rows.reject(df, _blank(_C_TEXT), "empty_text", pl.format("empty text (id '{}')", pl.col(_C_ID)))
    return rows.too_long(df, _C_TEXT, job.read.max_text_chars)


def _template_parts(tmpl: str) -> list[str]:
    return [p for p in re.split(r"(\{title\}|\{text\})", tmpl) if p]


def query_rows(rows: Rows, job: Job) -> pl.DataFrame:
    """The query rows that pass the per-row checks (duplicates are found afterwards)."""
    id_col = rows.pick(_ID, "id")
    text_col = rows.pick(_TEXT_QUERY, "text")
    df = rows.check_type(rows.t.frame, id_col, _ID_TYPES)
    df = rows.check_type(df, text_col, _TEXT_TYPES)
    df = df.with_columns(pl.col(id_col).cast(pl.String).alias(_C_ID), pl.col(text_col).cast(pl.String).alias(_C_TEXT))
    df = rows.reject(df, _blank(_C_ID), "missing_id", pl.format("no id ('{}' is empty)", pl.lit(id_col)))
    df = rows.reject(df, _blank(_C_TEXT), "empty_text", pl.format("empty query text (id '{}')", pl.col(_C_ID)))
    return rows.too_long(df, _C_TEXT, job.read.max_text_chars, "query text")


def qrel_rows(rows: Rows, job: Job) -> pl.DataFrame:
    """The qrels rows that pass the per-row checks (duplicates and references come afterwards)."""
    q = rows.pick(_QREL_Q, "query id")
    d = rows.pick(_QREL_D, "passage id")
    s = rows.pick(_SCORE, "score", required=False)
    df = rows.check_type(rows.t.frame, q, _ID_TYPES)
    df = rows.check_type(df, d, _ID_TYPES)
    if s:
        df = rows.check_type(df, s, _SCORE_TYPES)
    score = pl.col(s).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False) if s else pl.lit(1.0)
    df = df.with_columns(
        pl.col(q).cast(pl.String).alias(_C_Q), pl.col(d).cast(pl.String).alias(_C_D), score.alias(_C_SCORE)
    )
    df = rows.reject(df, _blank(_C_Q), "missing_id", pl.format("no query id ('{}' is empty)", pl.lit(q)))
    df = rows.reject(df, _blank(_C_D), "missing_id", pl.format("no passage id ('{}' is empty)", pl.lit(d)))
    if s:
        bad = pl.col(_C_SCORE).is_null() | pl.col(_C_SCORE).is_nan() | pl.col(_C_SCORE).is_infinite()
        df = rows.reject(df, bad, "score_not_a_number", pl.format("score '{}' is not a number", pl.col(s)))
    return df


def id_lines(rows: Rows) -> pl.DataFrame:
    """(id, line, reason) of every parsed row of an input with an id column; reason is null for rows
    the per-row checks kept. What a qrel's reference is checked against."""
    if rows.t.frame.height == 0:
        return pl.DataFrame(schema={_C_REF: pl.String, LINE: pl.Int64, _C_WHY: pl.String})
    ids = rows.t.frame.select(pl.col(rows.pick(_ID, "id")).cast(pl.String).alias(_C_REF), pl.col(LINE))
    if rows.rejected:
        why = pl.concat(rows.rejected).select(pl.col("line").alias(LINE), pl.col("reason").alias(_C_WHY))
        return ids.join(why.unique(LINE, keep="first"), on=LINE, how="left", maintain_order="left")
    return ids.with_columns(pl.lit(None, pl.String).alias(_C_WHY))


def id_status(ids: pl.DataFrame) -> pl.DataFrame:
    """Per id of `id_lines` (one input, or one bucket of ids gathered from its pieces): whether a
    row with it was kept (`ok`), else the line and reason of its first rejected row."""
    bad = pl.col(_C_WHY).is_not_null()
    return ids.sort(LINE).group_by(_C_REF, maintain_order=True).agg(
        (~bad).any().alias("ok"),
        pl.col(LINE).filter(bad).first().alias(_C_WHERE),
        pl.col(_C_WHY).filter(bad).first(),
    )


def _references(rows: Rows, qrels: pl.DataFrame, col: str, what: str, status: pl.DataFrame,
                src: tuple[str, str]) -> pl.DataFrame:
    """A qrel must name a usable row of the input `src` (its name and unit): unknown ids and ids of
    rejected rows are rejected. `status` is that input's `id_status`."""
    name = pl.lit(src[0].rsplit("/", 1)[-1])
    noun = "query" if what == "query" else "passage"
    qrels = qrels.join(status.rename({_C_REF: col}), on=col, how="left", maintain_order="left")
    qrels = rows.reject(
        qrels,
        pl.col("ok").is_null(),
        f"unknown_{what}_id",
        pl.format(f"unknown {noun} id '{{}}' (not in {{}})", pl.col(col), name),
    )
    detail = pl.format(
        f"{noun} '{{}}' is a rejected row of {{}} ({src[1]} {{}}: {{}})",
        pl.col(col),
        name,
        pl.col(_C_WHERE),
        pl.col(_C_WHY),
    )
    return rows.reject(qrels, ~pl.col("ok"), f"rejected_{what}_id", detail).drop("ok", _C_WHERE, _C_WHY)


def _text_id(prefix: str, text: str) -> str:
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:16]


def _from_pairs(rows: Rows, spec: PairsInput, job: Job) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    qcol = rows.pick(tuple(dict.fromkeys((spec.query_column, "query", "anchor"))), "query")
    pcol = rows.pick((spec.positive_column,), "positive")
    df = rows.check_type(rows.t.frame, qcol, _TEXT_TYPES)
    df = rows.check_type(df, pcol, _TEXT_TYPES)
    df = df.with_columns(pl.col(qcol).cast(pl.String).alias(_C_Q), pl.col(pcol).cast(pl.String).alias(_C_D))
    df = rows.reject(df, _blank(_C_Q), "empty_text", pl.format("empty query ('{}')", pl.lit(qcol)))
    df = rows.reject(df, _blank(_C_D), "empty_text", pl.format("empty positive ('{}')", pl.lit(pcol)))
    df = rows.too_long(df, _C_Q, job.read.max_text_chars, "query")
    df = rows.too_long(df, _C_D, job.read.max_text_chars, "positive")
    df = rows.dedup(df, [_C_Q, _C_D], "duplicate_pair", "duplicate pair")
    # ids are content hashes, so the same text is one passage / one query however often it occurs
    df = df.with_columns(
        pl.col(_C_Q).map_elements(lambda t: _text_id("q", t), return_dtype=pl.String).alias("query_id"),
        pl.col(_C_D).map_elements(lambda t: _text_id("d", t), return_dtype=pl.String).alias("doc_id"),
    )
    corpus = df.select(pl.col("doc_id").alias("id"), pl.col(_C_D).alias("text")).unique("id", maintain_order=True)
    queries = df.select(pl.col("query_id").alias("id"), pl.col(_C_Q).alias("text")).unique("id", maintain_order=True)
    qrels = df.select("query_id", "doc_id", pl.lit(1.0, pl.Float32).alias("score"))
    return corpus, queries, qrels


def normalise(job: Job, tables: dict[str, RawTable], policy: str | None = None) -> dict[str, Any]:
    """Check every input against its contract and normalise it.

    Returns the corpus, queries and qrels (positives) frames, the rejected rows
    (schemas/rejected_input.yaml), per-input stats (rows read = used + unused + rejected by reason)
    and `problems`, one message per rejected row, first ones first. Under `policy` (default: the
    job's on_bad_input) `strict`, any rejected row raises InputError with the first message instead.
    The read stage does the same piece by piece (negprep.stages.read), with these functions.
    """
    rows = {role: Rows(role, t) for role, t in tables.items()}
    for r in rows.values():
        require_rows(r, r.t.frame.height)
    if "pairs" in rows:
        corpus, queries, positives = _from_pairs(rows["pairs"], job.input, job)
        used, unused = {"pairs": positives.height}, {"pairs": {}}
    else:
        c, q, r = rows["corpus"], rows["queries"], rows["qrels"]
        corpus = c.dedup(corpus_rows(c, job), [_C_ID], "duplicate_id", "duplicate id")
        queries, positives, unused = link(job, q, query_rows(q, job), id_lines(q), r, qrel_rows(r, job),
                                          id_status(id_lines(c)), (c.name, c.t.unit))
        corpus = corpus.select(pl.col(_C_ID).alias("id"), pl.col(_C_TEXT).alias("text"))
        used = {"corpus": corpus.height, "queries": queries.height, "qrels": positives.height}
        unused["corpus"] = {}
    stats, rejected = account(rows, used, unused, policy or job.on_bad_input, positives.height)
    return {
        "corpus": corpus,
        "queries": queries,
        "qrels": positives,
        "exclusions": twin_exclusions(queries, positives),
        "rejected": rejected,
        "stats": stats,
    }


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


def link(job: Job, q: Rows, queries: pl.DataFrame, query_ids: pl.DataFrame, r: Rows, qrels: pl.DataFrame,
         doc_status: pl.DataFrame, corpus: tuple[str, str]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Queries and qrels after their per-row checks -> (queries with a positive, positives, unused
    counts): duplicates, references to queries and passages (`doc_status`: the corpus's
    `id_status` for the qrels' passage ids; `corpus`: its name and unit), positives."""
    queries = q.dedup(queries, [_C_ID], "duplicate_id", "duplicate id")
    qrels = r.dedup(qrels, [_C_Q, _C_D], "duplicate_judgment", "duplicate judgment of")
    qrels = _references(r, qrels, _C_Q, "query", id_status(query_ids), (q.name, q.t.unit))
    qrels = _references(r, qrels, _C_D, "doc", doc_status, corpus)
    positives = qrels.filter(pl.col(_C_SCORE) > 0).select(
        pl.col(_C_Q).alias("query_id"),
        pl.col(_C_D).alias("doc_id"),
        pl.col(_C_SCORE).cast(pl.Float32).alias("score"),
    )
    judged = queries[_C_ID].is_in(positives["query_id"].implode())
    unused = {"queries": {"no_positive": int((~judged).sum())},
              "qrels": {"not_positive": qrels.height - positives.height}}
    if unused["queries"]["no_positive"]:
        # normal for BEIR: queries.jsonl holds every split's queries
        log.info("%s: %d queries have no positive in this split: not used", q.name, unused["queries"]["no_positive"])
    queries = queries.filter(judged).select(pl.col(_C_ID).alias("id"), pl.col(_C_TEXT).alias("text"))
    return queries, positives, unused


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
        raise InputError(_strict_message(rows, rejected))
    if positives == 0:
        role = "pairs" if "pairs" in rows else "qrels"
        s = stats[role]
        why = ", ".join(f"{k} {v}" for k, v in {**s["rejected"], **unused.get(role, {})}.items()) or "no rows"
        raise InputError(f"{rows[role].name}: no usable (query, positive) pair ({why})")
    return stats, all_rejected


def twin_exclusions(queries: pl.DataFrame, positives: pl.DataFrame) -> pl.DataFrame:
    """(query_id, doc_id) for every positive of another query whose normalised text equals this
    query's: two ids of one question must never get each other's positives as negatives."""
    keys = queries.select(pl.col("id").alias("query_id"),
                          pl.col("text").map_elements(text_key, return_dtype=pl.Int64).alias("key"))
    twins = keys.filter(pl.col("key").is_duplicated())
    own = positives.select("query_id", "doc_id")
    shared = twins.join(own.join(twins, on="query_id").select("key", "doc_id"), on="key").select("query_id", "doc_id")
    return shared.join(own, on=["query_id", "doc_id"], how="anti").unique().sort("query_id", "doc_id")


def _strict_message(rows: dict[str, Rows], rejected: dict[str, pl.DataFrame]) -> str:
    role = next(r for r, df in rejected.items() if df.height)
    first = rejected[role].row(0, named=True)
    counts = Counter(x for df in rejected.values() for x in df["reason"].to_list())
    total = sum(counts.values())
    more = ""
    if total > 1:
        more = f" ({total} problems in all: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()) + ")"
    hint = "; on_bad_input: lenient sets bad rows aside instead"
    return rows[role].message(first["line"], first["detail"]) + more + hint


def check_inputs(job: Job) -> dict[str, dict]:
    """`negprep validate`: read and check every input on this machine (no Ray). Under
    on_bad_input: strict the first problem raises, as in a run; returns per-input stats."""
    files = input_files(job)
    fingerprints(files, job.storage)
    tables = {role: load_table(url, job.storage) for role, url in files.items()}
    stats = normalise(job, tables)["stats"]
    return {role: {**s, "path": redact(files[role])} for role, s in stats.items()}


# --- the same checks piece by piece (negprep.stages.read): per-row checks in each piece's task,
# duplicate passage ids by bucket of ids across all pieces, then queries and qrels in one task

_CHECKS = {"corpus": corpus_rows, "queries": query_rows, "qrels": qrel_rows}


def check_piece(job: Job, role: str, table: RawTable, piece_of_several: bool = False,
                columns: dict[str, str] | None = None) -> tuple[Rows, pl.DataFrame]:
    """One piece of a corpus, queries or qrels input through its per-row checks: its `Rows` (with
    the rows it rejected and the columns it picked or lacks) and the rows kept, with the input's
    own columns and the normalised ones. `columns`: the file's columns (`file_columns`)."""
    rows = Rows(role, table, piece_of_several, columns)
    if table.frame.height == 0:
        return rows, pl.DataFrame(schema={LINE: pl.Int64})
    return rows, _CHECKS[role](rows, job)


def bucketed_ids(role: str, rows: Rows, kept: pl.DataFrame, buckets: int) -> pl.DataFrame:
    """What a piece contributes to the buckets of passage ids, with a `bucket` column: a corpus
    piece every parsed row's (id, line, reason), a qrels piece the passage ids its rows name."""
    if role == "corpus":
        ids = id_lines(rows)
    elif kept.height:
        ids = kept.select(pl.col(_C_D).alias(_C_REF)).unique(maintain_order=True)
    else:
        ids = pl.DataFrame(schema={_C_REF: pl.String})
    # polars' hash is stable within a version; the read stage's key holds the polars version
    return ids.with_columns((pl.col(_C_REF).hash(seed=7) % buckets).cast(pl.Int32).alias("bucket")).sort("bucket")


def duplicate_lines(ids: pl.DataFrame) -> pl.DataFrame:
    """(line, first line) of every kept row whose id a kept row on an earlier line already has,
    from one bucket's `bucketed_ids` of all corpus pieces: duplicates across pieces, in file order."""
    kept = ids.filter(pl.col(_C_WHY).is_null())
    kept = kept.with_columns(pl.col(LINE).min().over(_C_REF).alias(_C_FIRST))
    return kept.filter(pl.col(LINE) != pl.col(_C_FIRST)).drop(_C_REF, _C_WHY, "bucket", strict=False)


def reference_status(ids: pl.DataFrame, docs: pl.DataFrame) -> pl.DataFrame:
    """`id_status` of the passage ids that qrels name (`docs`), from one bucket of corpus ids."""
    return id_status(ids.join(docs.select(_C_REF).unique(), on=_C_REF, how="semi"))


def piece_passages(rows: Rows, kept: pl.DataFrame, duplicates: pl.DataFrame) -> pl.DataFrame:
    """A corpus piece's passages (id, text) once the `duplicate_lines` in it are rejected."""
    if kept.height == 0:
        return pl.DataFrame(schema={"id": pl.String, "text": pl.String})
    kept = rows.dedup(kept, [_C_ID], "duplicate_id", "duplicate id", first=duplicates)
    return kept.select(pl.col(_C_ID).alias("id"), pl.col(_C_TEXT).alias("text"))


def joined(role: str, url: str, fmt: str, kept: list[pl.DataFrame], rejected: list[pl.DataFrame],
           rows_read: int) -> tuple[Rows, pl.DataFrame]:
    """The `Rows` of a whole input (or piece) from its pieces' kept rows and rejected rows
    (`Rows.frame()`), and the kept rows as one frame."""
    frame = pl.concat(kept, how="diagonal_relaxed") if kept else pl.DataFrame(schema={LINE: pl.Int64})
    raw = [c for c in frame.columns if not c.startswith(PREFIX) or c == LINE]
    rows = Rows(role, RawTable(url, fmt, frame.select(raw)))
    rows.rows_read = rows_read
    rows.rejected = [df.select(list(_REJECTED_SCHEMA)) for df in rejected if df.height]
    return rows, frame


def link_pieces(job: Job, q: Rows, queries: pl.DataFrame, query_ids: pl.DataFrame, r: Rows, qrels: pl.DataFrame,
                doc_status: pl.DataFrame, c: Rows, passages: int) -> dict[str, Any]:
    """`normalise`'s result for an input read piece by piece (without the corpus, already in shards)."""
    queries, positives, unused = link(job, q, queries, query_ids, r, qrels, doc_status, (c.name, c.t.unit))
    used = {"corpus": passages, "queries": queries.height, "qrels": positives.height}
    rows = {"corpus": c, "queries": q, "qrels": r}
    stats, rejected = account(rows, used, {"corpus": {}, **unused}, job.on_bad_input, positives.height)
    return {"queries": queries, "qrels": positives, "exclusions": twin_exclusions(queries, positives),
            "rejected": rejected, "stats": stats}
