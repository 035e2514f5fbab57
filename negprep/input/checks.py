"""Input rows checked against their contracts and normalised into corpus, queries and qrels.

Every check rejects rows with a reason, the row's line and a message; nothing is decided here
about stopping. `normalise` then applies the job's on_bad_input policy: strict raises the first
problem as one line, lenient returns the rejected rows (schemas/rejected_input.yaml) for the read
stage to keep. Every input is checked before anything expensive runs: columns present and of the
right type, ids present and unique, texts non-empty and not absurdly long, qrels naming known
queries and passages, and each line parseable.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

import polars as pl

from negprep.config import Job, PairsInput
from negprep.input.files import fingerprints, input_files
from negprep.input.rows import FIRST, REJECTED_SCHEMA, Rows, account, require_rows
from negprep.input.shards import text_key
from negprep.input.tables import LINE, PREFIX, RawTable, load_table
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
_C_ID, _C_TEXT, _C_Q, _C_D, _C_SCORE, _C_REF, _C_WHY, _C_WHERE = (
    f"{PREFIX}{c}__" for c in ("id", "text", "q", "d", "score", "ref", "why", "where")
)


# Python's whitespace (str.isspace), which counts the ASCII separators \x1c-\x1f that polars'
# default strip (Unicode White_Space) keeps: a text of them alone is as empty as one of spaces
_SPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())


def _blank(col: str) -> pl.Expr:
    return pl.col(col).str.strip_chars(_SPACE).str.len_chars() == 0


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
        queries, positives, unused = judged_queries(job, q, query_rows(q, job), id_lines(q), r, qrel_rows(r, job),
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


def judged_queries(job: Job, q: Rows, queries: pl.DataFrame, query_ids: pl.DataFrame, r: Rows, qrels: pl.DataFrame,
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


def twin_exclusions(queries: pl.DataFrame, positives: pl.DataFrame) -> pl.DataFrame:
    """(query_id, doc_id) for every positive of another query whose normalised text equals this
    query's: two ids of one question must never get each other's positives as negatives."""
    keys = queries.select(pl.col("id").alias("query_id"),
                          pl.col("text").map_elements(text_key, return_dtype=pl.Int64).alias("key"))
    twins = keys.filter(pl.col("key").is_duplicated())
    own = positives.select("query_id", "doc_id")
    shared = twins.join(own.join(twins, on="query_id").select("key", "doc_id"), on="key").select("query_id", "doc_id")
    return shared.join(own, on=["query_id", "doc_id"], how="anti").unique().sort("query_id", "doc_id")


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
    kept = kept.with_columns(pl.col(LINE).min().over(_C_REF).alias(FIRST))
    return kept.filter(pl.col(LINE) != pl.col(FIRST)).drop(_C_REF, _C_WHY, "bucket", strict=False)


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
    rows.rejected = [df.select(list(REJECTED_SCHEMA)) for df in rejected if df.height]
    return rows, frame


def link_pieces(job: Job, q: Rows, queries: pl.DataFrame, query_ids: pl.DataFrame, r: Rows, qrels: pl.DataFrame,
                doc_status: pl.DataFrame, c: Rows, passages: int) -> dict[str, Any]:
    """`normalise`'s result for an input read piece by piece (without the corpus, already in shards)."""
    queries, positives, unused = judged_queries(job, q, queries, query_ids, r, qrels, doc_status, (c.name, c.t.unit))
    used = {"corpus": passages, "queries": queries.height, "qrels": positives.height}
    rows = {"corpus": c, "queries": q, "qrels": r}
    stats, rejected = account(rows, used, {"corpus": {}, **unused}, job.on_bad_input, positives.height)
    return {"queries": queries, "qrels": positives, "exclusions": twin_exclusions(queries, positives),
            "rejected": rejected, "stats": stats}
