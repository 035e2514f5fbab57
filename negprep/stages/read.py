"""Read stage: inputs (BEIR directory, separate tables, or a pairs table) -> normalised shards.

Runs inside a Ray task, so passage text never passes through the driver. Writes under
`work/input/<key>/`: `corpus/NNNNN.parquet` and `queries/NNNNN.parquet` shards (contracts in
schemas/), `qrels.parquet` (positives of the split), `rejected.parquet` (every row not used, with
its reason) and `stats.json` (rows read = used + rejected, per input).
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import polars as pl
import pyarrow as pa

from negprep.config import Job, PairsInput, TablesInput
from negprep.errors import InputError
from negprep.paths import Folder, locate
from negprep.schemas import conform

_ID = ("_id", "id", "doc_id", "docid", "corpus_id", "query_id", "qid")
_QREL_Q = ("query-id", "query_id", "qid")
_QREL_D = ("corpus-id", "corpus_id", "doc_id", "docid", "pid")


def input_files(job: Job) -> dict[str, str]:
    """The files a job reads, by role (URL strings)."""
    spec = job.input
    if isinstance(spec, TablesInput):
        return {"corpus": spec.corpus, "queries": spec.queries, "qrels": spec.qrels}
    if isinstance(spec, PairsInput):
        return {"pairs": spec.pairs}
    base = spec.rstrip("/")
    return {
        "corpus": f"{base}/corpus.jsonl",
        "queries": f"{base}/queries.jsonl",
        "qrels": f"{base}/qrels/{job.split}.tsv",
    }


def fingerprints(files: dict[str, str], storage_options: dict | None = None) -> dict[str, dict]:
    """Cheap identity of each input (size and modification time or ETag); checks they exist."""
    out = {}
    for role, url in files.items():
        folder, name = locate(url, storage_options)
        try:
            info = folder.fs.info(folder.path(name))
        except FileNotFoundError:
            raise InputError(f"{url}: {role} file not found") from None
        except PermissionError as e:
            raise InputError(f"{url}: cannot read {role} file: {e}") from None
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
        out[role] = {"path": url, "size": int(info.get("size") or 0), "stamp": str(stamp)}
    return out


def read_key(job: Job, fps: dict[str, dict]) -> str:
    ident = [
        job.input if isinstance(job.input, str) else job.input.model_dump(),
        job.split,
        job.read.model_dump(),
        {r: (f["size"], f["stamp"]) for r, f in fps.items()},
    ]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Table readers


def read_table(url: str, storage_options: dict | None = None) -> tuple[pl.DataFrame, str]:
    """A whole input table as a polars frame of strings, plus the sha256 of the file's bytes."""
    folder, name = locate(url, storage_options)
    data = folder.read_bytes(name)
    digest = hashlib.sha256(data).hexdigest()
    lower = name.lower()
    try:
        if lower.endswith((".jsonl", ".json", ".ndjson")):
            df = _read_jsonl(data, url)
        elif lower.endswith((".parquet", ".pq")):
            df = pl.read_parquet(io.BytesIO(data))
        elif lower.endswith((".tsv", ".csv")):
            sep = "\t" if lower.endswith(".tsv") else ","
            df = pl.read_csv(io.BytesIO(data), separator=sep, infer_schema=False, quote_char='"')
        else:
            raise InputError(f"{url}: unknown table format (use .jsonl, .parquet, .csv or .tsv)")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any parser failure becomes a one-line input error
        raise InputError(f"{url}: cannot parse: {str(e).splitlines()[0]}") from None
    return df, digest


def _read_jsonl(data: bytes, url: str) -> pl.DataFrame:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{url}: line {line}: bytes that are not UTF-8") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{url}: line {n}: malformed JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{url}: line {n}: expected a JSON object")
        rows.append({k: None if v is None else str(v) for k, v in obj.items()})
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def _pick(df: pl.DataFrame, names: tuple[str, ...], url: str, what: str, required: bool = True) -> str | None:
    for n in names:
        if n in df.columns:
            return n
    if required:
        raise InputError(f"{url}: no {what} column (looked for {', '.join(names)}; found {', '.join(df.columns)})")
    return None


# ---------------------------------------------------------------------------------------------
# Normalisation


def _split_rejects(df: pl.DataFrame, bad: pl.Expr, reason: str, rejected: list) -> pl.DataFrame:
    mask = df.select(bad.fill_null(True).alias("bad"))["bad"]
    if mask.any():
        rejected.append(df.filter(mask).with_columns(pl.lit(reason).alias("reason")))
    return df.filter(~mask)


def _dedup(df: pl.DataFrame, key: str | list[str], reason: str, rejected: list) -> pl.DataFrame:
    dup = df.with_row_index("_row").filter(pl.col("_row") > pl.col("_row").min().over(key))
    if dup.height:
        rejected.append(dup.drop("_row").with_columns(pl.lit(reason).alias("reason")))
        df = df.unique(subset=key, keep="first", maintain_order=True)
    return df


def normalise(job: Job, frames: dict[str, pl.DataFrame], files: dict[str, str]) -> dict[str, Any]:
    """Pure normalisation: returns corpus, queries, qrels frames, rejected rows and per-input stats."""
    rejected: dict[str, list[pl.DataFrame]] = {r: [] for r in frames}
    if "pairs" in frames:
        corpus, queries, qrels = _from_pairs(frames["pairs"], job.input, files["pairs"], rejected["pairs"])
    else:
        corpus = _corpus(frames["corpus"], job, files["corpus"], rejected["corpus"])
        queries = _queries(frames["queries"], files["queries"], rejected["queries"])
        qrels = _qrels(frames["qrels"], files["qrels"], rejected["qrels"])
        # references must resolve; a qrel naming an unknown id is rejected, never silently ignored
        qrels = _split_rejects(
            qrels, ~pl.col("doc_id").is_in(corpus["id"].implode()), "unknown_doc_id", rejected["qrels"]
        )
        qrels = _split_rejects(
            qrels, ~pl.col("query_id").is_in(queries["id"].implode()), "unknown_query_id", rejected["qrels"]
        )
    positives = qrels.filter(pl.col("score") > 0)
    judged = set(positives["query_id"].to_list())
    unused_q = queries.filter(~pl.col("id").is_in(list(judged)))
    queries = queries.filter(pl.col("id").is_in(list(judged)))
    stats = {}
    for role, df in frames.items():
        rej = rejected[role]
        by_reason: dict[str, int] = {}
        for r in rej:
            by_reason[r["reason"][0]] = by_reason.get(r["reason"][0], 0) + r.height
        stats[role] = {"rows_read": df.height, "rows_rejected": sum(by_reason.values()), "rejected": by_reason}
    if "pairs" in frames:
        stats["pairs"]["rows_used"] = stats["pairs"]["rows_read"] - stats["pairs"]["rows_rejected"]
    else:
        stats["corpus"]["rows_used"] = corpus.height
        stats["queries"]["rows_used"] = queries.height
        stats["queries"]["rows_unused_no_positive"] = unused_q.height
        stats["qrels"]["rows_used"] = positives.height
        stats["qrels"]["rows_unused_not_positive"] = qrels.height - positives.height
    rej_frames = [
        r.select(
            pl.lit(role).alias("input"),
            pl.col("reason"),
            pl.struct(pl.exclude("reason")).struct.json_encode().alias("row"),
        )
        for role, lst in rejected.items()
        for r in lst
    ]
    return {
        "corpus": corpus,
        "queries": queries,
        "qrels": positives,
        "rejected": pl.concat(rej_frames)
        if rej_frames
        else pl.DataFrame(schema={"input": pl.String, "reason": pl.String, "row": pl.String}),
        "stats": stats,
    }


def _clean_text(df: pl.DataFrame, col: str, rejected: list) -> pl.DataFrame:
    return _split_rejects(df, pl.col(col).str.strip_chars().str.len_chars() == 0, "empty_text", rejected)


def _corpus(df: pl.DataFrame, job: Job, url: str, rejected: list) -> pl.DataFrame:
    id_col = _pick(df, _ID, url, "id")
    text_col = _pick(df, ("text", "passage", "contents", "body"), url, "text")
    title_col = _pick(df, ("title",), url, "title", required=False)
    df = df.with_columns(pl.col(id_col).cast(pl.String).alias("id"), pl.col(text_col).cast(pl.String).fill_null(""))
    df = _dedup(df, "id", "duplicate_id", rejected)
    df = _split_rejects(df, pl.col("id").is_null() | (pl.col("id").str.strip_chars() == ""), "missing_id", rejected)
    text = pl.col(text_col)
    if title_col:
        tmpl = job.read.title_template
        pieces: list[pl.Expr] = []
        # build the template with polars expressions: "{title} {text}" -> title + " " + text
        for part in _template_parts(tmpl):
            if part == "{title}":
                pieces.append(pl.col(title_col).cast(pl.String).fill_null(""))
            elif part == "{text}":
                pieces.append(text)
            else:
                pieces.append(pl.lit(part))
        joined = pl.concat_str(pieces).str.strip_chars()
        text = (
            pl.when(pl.col(title_col).cast(pl.String).fill_null("").str.strip_chars() == "")
            .then(pl.col(text_col))
            .otherwise(joined)
        )
    df = df.with_columns(text.alias("text"))
    df = _clean_text(df, "text", rejected)
    return df.select("id", "text")


def _template_parts(tmpl: str) -> list[str]:
    import re

    return [p for p in re.split(r"(\{title\}|\{text\})", tmpl) if p]


def _queries(df: pl.DataFrame, url: str, rejected: list) -> pl.DataFrame:
    id_col = _pick(df, _ID, url, "id")
    text_col = _pick(df, ("text", "query", "question"), url, "text")
    df = df.with_columns(pl.col(id_col).cast(pl.String).alias("id"), pl.col(text_col).cast(pl.String).alias("text"))
    df = _dedup(df, "id", "duplicate_id", rejected)
    df = _clean_text(df, "text", rejected)
    return df.select("id", "text")


def _qrels(df: pl.DataFrame, url: str, rejected: list) -> pl.DataFrame:
    q = _pick(df, _QREL_Q, url, "query id")
    d = _pick(df, _QREL_D, url, "passage id")
    s = _pick(df, ("score", "relevance", "label"), url, "score", required=False)
    df = df.with_columns(
        pl.col(q).cast(pl.String).alias("query_id"),
        pl.col(d).cast(pl.String).alias("doc_id"),
        (pl.col(s).cast(pl.Float32, strict=False) if s else pl.lit(1.0, pl.Float32)).alias("score"),
    )
    df = _split_rejects(df, pl.col("score").is_null(), "score_not_a_number", rejected)
    df = _dedup(df, ["query_id", "doc_id"], "duplicate_judgment", rejected)
    return df.select("query_id", "doc_id", "score")


def _text_id(prefix: str, text: str) -> str:
    return prefix + hashlib.sha256(text.encode()).hexdigest()[:16]


def _from_pairs(df: pl.DataFrame, spec: PairsInput, url: str, rejected: list):
    qcol = spec.query_column if spec.query_column in df.columns else _pick(df, ("query", "anchor"), url, "query")
    pcol = spec.positive_column
    if pcol not in df.columns:
        raise InputError(f"{url}: no positive column '{pcol}' (found {', '.join(df.columns)})")
    df = df.select(pl.col(qcol).cast(pl.String).alias("query"), pl.col(pcol).cast(pl.String).alias("positive"))
    df = _split_rejects(df, pl.col("query").str.strip_chars().str.len_chars() == 0, "empty_query", rejected)
    df = _split_rejects(df, pl.col("positive").str.strip_chars().str.len_chars() == 0, "empty_positive", rejected)
    df = _dedup(df, ["query", "positive"], "duplicate_pair", rejected)
    # ids are content hashes, so the same text is one passage / one query however often it occurs
    df = df.with_columns(
        pl.col("query").map_elements(lambda t: _text_id("q", t), return_dtype=pl.String).alias("query_id"),
        pl.col("positive").map_elements(lambda t: _text_id("d", t), return_dtype=pl.String).alias("doc_id"),
    )
    corpus = df.select(pl.col("doc_id").alias("id"), pl.col("positive").alias("text")).unique("id", maintain_order=True)
    queries = df.select(pl.col("query_id").alias("id"), pl.col("query").alias("text")).unique("id", maintain_order=True)
    qrels = df.select("query_id", "doc_id", pl.lit(1.0, pl.Float32).alias("score"))
    return corpus, queries, qrels


# ---------------------------------------------------------------------------------------------
# The stage


def shard_digest(table: pa.Table) -> str:
    """Content hash of a shard's (id, text) rows: the embedding cache key of the shard."""
    h = hashlib.sha256()
    for col in ("id", "text"):
        for chunk in table.column(col).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    return h.hexdigest()[:24]


def _write_shards(folder: Folder, df: pl.DataFrame, rows: int, contract: str) -> list[dict]:
    shards = []
    table = df.to_arrow()
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows)):
        part = conform(table.slice(start, rows), contract).combine_chunks()
        if part.num_rows == 0:
            continue
        name = f"{i:05d}.parquet"
        folder.write_parquet(name, part)
        shards.append({"name": name, "rows": part.num_rows, "digest": shard_digest(part)})
    return shards


def run_read(job: Job, out: Folder, files: dict[str, str], storage_options: dict | None = None) -> dict:
    """Read and normalise every input, write shards under `out`; returns the stats written."""
    frames, digests = {}, {}
    for role, url in files.items():
        frames[role], digests[role] = read_table(url, storage_options)
    res = normalise(job, frames, files)
    corpus_shards = _write_shards(out.sub("corpus"), res["corpus"], job.read.shard_rows, "corpus")
    query_shards = _write_shards(out.sub("queries"), res["queries"], job.read.query_shard_rows, "queries")
    out.write_parquet("qrels.parquet", conform(res["qrels"].to_arrow(), "qrels"))
    out.write_parquet("rejected.parquet", res["rejected"].to_arrow())
    stats = {
        "inputs": {r: {**res["stats"][r], "path": files[r], "sha256": digests[r]} for r in files},
        "corpus_shards": corpus_shards,
        "query_shards": query_shards,
        "passages": res["corpus"].height,
        "queries": res["queries"].height,
        "positives": res["qrels"].height,
        "rejected_rows": res["rejected"].height,
    }
    out.write_json("stats.json", stats)
    return stats
