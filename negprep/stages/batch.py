"""Batch stage: the mined rows of all query shards -> data files in training-batch order.

A global stage after mine, with `batch_size` (TAS-Balanced). The mine tasks write their files to a
staging folder in the work directory; then one Ray task reads only the id and cluster columns of every staged file,
looks up a key of each text (the corpus's `text_key`, a hash of the normalised query text), and
composes the batch plan (`negprep.rules.batching.compose`): integers only, handed to the next tasks
through the object store. One Ray task per output file then takes its rows from the staged files,
adds `batch_id` and writes `data/train-*.parquet`; each output file holds whole batches, in order.

With `batch_guard` (the default) the plan task also keeps apart rows whose passages are labelled
positives of each other's questions (`negprep.rules.guard.known_positive_pairs`), or positive-like for
them (`negprep.rules.guard.conflicting_pairs`): under an in-batch loss they would be false negatives.
The scores are the model's that vetted the negatives, with its rule: a bi-encoder guide's
embeddings, margins and z-score rule, else the mining model's (`guard_scorer`). Positive scores
come from the same embeddings. Only this task reads vectors: the rows' queries, passages and their
queries' positives, which the guide or embed stage has embedded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from negprep import execution
from negprep.config import Job
from negprep.errors import NegprepError
from negprep.execution import Executor, Resources
from negprep.input.shards import Shard, text_key
from negprep.models.vectors import table_vectors
from negprep.output.formats import FORMATS
from negprep.output.writer import Writer
from negprep.paths import File, Files, stage_key
from negprep.rules import batching
from negprep.rules.guard import Conflicts, conflicting_pairs, known_positive_pairs, positive_keys, zscore_caps
from negprep.schemas import spec
from negprep.stages.base import Run, Stage
from negprep.stages.embed import encoders


def passage_id_columns(layout: str, n: int) -> list[str]:
    """The passage id columns of a staged row (`triplet`, or `ntuple`: rows or pairs): the positive,
    then the negative(s)."""
    return ["positive_id", "negative_id"] if layout == "triplet" else ["positive_id"] + [
        f"negative_{i}_id" for i in range(1, n + 1)
    ]


def batch_unit(job: Job) -> tuple[str, int]:
    """(the staged layout, rows per staged row): a grouped format (reranker rows) stages whole pairs
    in the `ntuple` layout, each becoming `rows_per_pair` rows, so a batch holds whole groups."""
    fmt = FORMATS[job.format]
    return ("ntuple", fmt.rows_per_pair(job.num_negatives)) if fmt.grouped else (job.format, 1)


def row_keys(staged: Files, corpus: Files, queries: Files, id_columns: list[str],
             clusters: Files | None = None) -> dict[str, np.ndarray]:
    """Per staged row, in file order: query and passage ids (n, m), file, row in file, cluster, query
    key and passage keys (n, m); with `clusters` (the cluster stage's files) also the query's second
    cluster and margin."""
    tables = [f.read_parquet(columns=["query_id", "cluster_id", *id_columns]) for f in staged]
    t = pa.concat_tables(tables)
    pids = {d for c in id_columns for d in pc.unique(t.column(c)).to_pylist()}
    pkey = corpus.lookup(pids, "text_key")
    qtext = queries.lookup(set(pc.unique(t.column("query_id")).to_pylist()), "text")
    qkey = {q: text_key(s) for q, s in qtext.items()}
    texts = np.array([[pkey[d] for d in t.column(c).to_pylist()] for c in id_columns], dtype=np.int64)
    out = {}
    if clusters is not None:
        ids = t.column("query_id").to_pylist()
        second = clusters.lookup(set(ids), "second_cluster_id", key="query_id")
        margin = clusters.lookup(set(ids), "cluster_margin", key="query_id")
        out = {"second": np.array([second[q] for q in ids], dtype=np.int64),
               "margin": np.array([margin[q] for q in ids], dtype=np.float64)}
    return out | {
        "query_id": np.array(t.column("query_id").to_pylist(), dtype=object),
        "passage_id": np.array([t.column(c).to_pylist() for c in id_columns], dtype=object).T.reshape(
            t.num_rows, len(id_columns)),
        "file": np.repeat(np.arange(len(tables), dtype=np.int32), [x.num_rows for x in tables]),
        "row": np.concatenate([np.arange(x.num_rows, dtype=np.int64) for x in tables]),
        "cluster": np.asarray(t.column("cluster_id").to_numpy(zero_copy_only=False), dtype=np.int64),
        "query": np.array([qkey[q] for q in t.column("query_id").to_pylist()], dtype=np.int64),
        "texts": texts.T.reshape(t.num_rows, len(id_columns)),
    }


@dataclass(frozen=True)
class GuardScorer:
    """What the in-batch guard scores with: one model's embedding files and that model's rule."""

    model: str  # the model's name in the job, for the stats
    queries: Files  # query embedding files (one per query shard)
    passages: Files  # passage embedding files holding every row's passages and its query's positives
    candidates: Files  # the search stage's candidates: each query's positives (the margins' reference)
    relative_margin: float | None = None
    absolute_margin: float | None = None
    max_score: float | None = None
    max_zscore: float | None = None  # a bi-encoder guide's z-score rule, over its window scores:
    window_scores: Files | None = None  # the guide stage's files (candidate_guide_scores per query)


def guard_scorer(run: Run) -> GuardScorer | None:
    """The guard's scorer for a run: the model and rule that vetted the mined negatives. None with
    `batch_guard: false`, or when that rule has no margin, max_score or max_zscore (it vets
    nothing; the labels still guard).

    A bi-encoder guide: its query and passage embeddings (the whole corpus's when the guide stage
    found it embedded, else the window candidates and positives it wrote to `guide-texts/`; see
    `Guide._passages`) and its margins. Without a guide, the mining model's embeddings and the
    job's margins. A cross-encoder guide scores (query, passage) pairs one by one: scoring every
    in-batch pair with it would cost about as much as mining again, so its jobs are guarded by the
    mining model and the job's own margins.
    """
    job, read = run.job, run.read
    g = job.guide if job.guide and job.guide.type == "biencoder" else None
    rule = (g.relative_margin, g.absolute_margin, g.max_score) if g else (
        job.relative_margin, job.absolute_margin, job.max_score)
    # no margin and no max_score: the rule vets nothing (naive mining), so nothing is positive-like by it
    if not job.batch_guard or all(v is None for v in (*rule, g.max_zscore if g else None)):
        return None
    candidates = run.search.folder.files([s.name for s in read.query_shards])
    if g is None:
        return GuardScorer(job.model, run.embed.queries.files(read.query_shards),
                           run.embed.passages.files(read.corpus_shards), candidates, *rule)
    passages, queries = encoders(run, g.model, g, run.devices.get("guide", "cpu"))
    shards = read.corpus_shards
    cached = set(passages.folder.ls(".parquet"))
    if not all(s.embedding in cached for s in shards):
        texts = run.work.sub("guide-texts", stage_key(run.search.folder.url, (job.range_min, job.range_max)))
        if not texts.exists("shards.json"):
            raise NegprepError(f"batch_guard: the guide's passage shards are missing ({texts.url}/shards.json)")
        shards = tuple(map(Shard.from_dict, texts.read_json("shards.json")))
    scores = run.guide.folder.files([s.name for s in read.query_shards]) if g.max_zscore is not None else None
    return GuardScorer(g.model, queries.files(read.query_shards), passages.files(shards), candidates, *rule,
                       max_zscore=g.max_zscore, window_scores=scores)


def _vectors(files: Files, ids: set[str], what: str) -> tuple[dict[str, int], np.ndarray]:
    """(row by id, float32 matrix) of `ids` in embedding files; every id must be there."""
    import pyarrow.dataset as pads

    folder = files.folder
    ds = pads.dataset([folder.path(n) for n in files.names], format="parquet", filesystem=folder.fs)
    t = ds.to_table(columns=["id", "embedding"], filter=pc.field("id").isin(pa.array(sorted(ids), pa.string())))
    got, vecs = table_vectors(t)
    row = {d: i for i, d in enumerate(got)}
    if missing := ids - row.keys():
        raise NegprepError(f"batch_guard: {len(missing)} {what} have no embedding in {folder.url} "
                           f"(e.g. {sorted(missing)[:3]}); was the guide or embed stage's cache removed?")
    return row, vecs


def guard_conflicts(scorer: GuardScorer | None, query_ids: np.ndarray, passage_ids: np.ndarray,
                    query_keys: np.ndarray, text_keys: np.ndarray) -> Conflicts:
    """The `conflicts` callable of `batching.compose` over the staged rows: a passage that is a
    labelled positive of another row's query (`known_positive_pairs`), and with `scorer`
    one that scores as positive-like for it under the scorer's rule (`conflicting_pairs`).

    Args:
        query_ids: (n,) each row's query id.
        passage_ids: (n, m) each row's passage ids (positive, negatives).
        query_keys: (n,) each row's query key.
        text_keys: (n, m) each row's passage text keys.
    """
    qkey = np.asarray(query_keys, dtype=np.int64)
    known = positive_keys(qkey, text_keys)

    def labelled(rows: np.ndarray) -> np.ndarray:
        return rows[known_positive_pairs(qkey[rows], text_keys[rows], known)]

    if scorer is None:
        return labelled
    qids = sorted(set(query_ids.tolist()))
    positives = scorer.candidates.lookup(set(qids), "positive_ids", key="query_id")
    if missing := set(qids) - positives.keys():
        raise NegprepError(f"batch_guard: {len(missing)} queries are not in the candidates "
                           f"(e.g. {sorted(missing)[:3]})")
    qrow, qvec = _vectors(scorer.queries, set(qids), "queries")
    need = set(passage_ids.reshape(-1).tolist()) | {d for q in qids for d in positives[q]}
    prow, pvec = _vectors(scorer.passages, need, "passages")
    # each query's lowest positive score, from the same embeddings (the rule's reference)
    pq = np.array([qrow[q] for q in qids for _ in positives[q]], dtype=np.int64)
    pp = np.array([prow[d] for q in qids for d in positives[q]], dtype=np.int64)
    ref = np.full(len(qvec), np.nan)
    np.fmin.at(ref, pq, np.einsum("ij,ij->i", qvec[pq].astype(np.float64), pvec[pp].astype(np.float64)))
    qi = np.array([qrow[q] for q in query_ids.tolist()], dtype=np.int64)
    pi = np.array([[prow[d] for d in r] for r in passage_ids.tolist()], dtype=np.int64).reshape(passage_ids.shape)
    cap = np.full(len(qvec), np.inf)
    if scorer.max_zscore is not None and scorer.window_scores is not None:
        # the z-score rule: a passage standing out above the query's window candidates, as in mining
        window = scorer.window_scores.lookup(set(qids), "candidate_guide_scores", key="query_id")
        idx = [q for q in qids if window.get(q)]
        width = max((len(window[q]) for q in idx), default=0)
        if idx and width:
            padded = np.full((len(idx), width), np.nan)
            for i, q in enumerate(idx):
                padded[i, : len(window[q])] = np.asarray(window[q], dtype=np.float64)
            cap[[qrow[q] for q in idx]] = zscore_caps(padded, scorer.max_zscore)

    def conflicts(rows: np.ndarray) -> np.ndarray:
        local = conflicting_pairs(qvec[qi[rows]], pvec[pi[rows]], ref[qi[rows]], qkey[rows],
                                          scorer.relative_margin, scorer.absolute_margin, scorer.max_score,
                                          cap[qi[rows]])
        return np.concatenate([rows[local], labelled(rows)]).reshape(-1, 2)

    return conflicts


def compose_plan(staged: Files, corpus: Files, queries: Files, job: Job, clusters: Files | None = None,
                 guard: GuardScorer | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(stats, plan): the batch plan of all staged rows, cut into at most as many output files as
    were staged (Ray task). With `clusters`, boundary queries may move to their second cluster;
    with `guard`, rows that would be false negatives of each other never share a batch."""
    t0 = time.perf_counter()
    layout, per = batch_unit(job)
    batch_size, partial, files = job.batch_size // per, job.partial_batches, len(staged)
    k = row_keys(staged, corpus, queries, passage_id_columns(layout, job.num_negatives), clusters)
    conflicts = guard_conflicts(guard, k["query_id"], k["passage_id"], k["query"], k["texts"]) if job.batch_guard \
        else None
    plan = batching.compose(k["cluster"], k["query"], k["texts"], batch_size, job.seed, partial,
                           second=k.get("second"), margin=k.get("margin"), conflicts=conflicts)
    sizes = np.bincount(plan.batch_id, minlength=len(plan.mixed))
    cuts = batching.split_files(sizes, max(1, min(files, len(sizes))))
    # counted in rows of the output: a staged pair of a grouped format is `per` rows
    c = {k: v * per if k.startswith("rows") else v for k, v in plan.counts.items()}
    stats = {
        **c,
        # what TAS-Balanced is for: the share of rows whose batch holds one cluster only
        "single_cluster_share": round((c["rows_batched"] - c["rows_merged"]) / max(1, c["rows"]), 4),
        "mixed_share": round(c["rows_merged"] / max(1, c["rows"]), 4),
        "batch_size": job.batch_size,
        "partial_batches": partial,
        "batch_guard": job.batch_guard,
        "guard_model": None if guard is None else guard.model,  # whose scores the guard used (None: labels only)
        "files": len(cuts) - 1,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out = {"file": k["file"][plan.order], "row": k["row"][plan.order], "batch_id": plan.batch_id, "cuts": cuts,
           "cluster": plan.cluster}
    return stats, out


def _groups(table: pa.Table, fmt: str) -> tuple[str, ...]:
    """The optional field groups of contract `fmt` that `table` carries (guide scores, clusters, ...)."""
    have = set(table.column_names)
    found = []
    for f in spec(fmt)["fields"]:
        g = f.get("group")
        if g and g not in found and (f["name"] in have or ("{i}" in f["name"] and f["name"].format(i=1) in have)):
            found.append(g)
    return tuple(found)


def write_part(staged: Files, plan: dict[str, np.ndarray], part: int, dst: File, writer: Writer) -> int:
    """Write output file `part` of the plan: its rows taken from the staged files, plus batch_id (Ray task)."""
    a, b = int(plan["cuts"][part]), int(plan["cuts"][part + 1])
    src, rows = plan["file"][a:b], plan["row"][a:b]
    pieces, where = [], []
    for f in np.unique(src):
        mask = src == f
        pieces.append(staged.folder.read_parquet(staged.names[f]).take(pa.array(rows[mask])))
        where.append(np.flatnonzero(mask))
    if pieces:
        table = pa.concat_tables(pieces).take(pa.array(np.argsort(np.concatenate(where), kind="stable")))
    else:
        table = staged.folder.read_parquet(staged.names[0]).slice(0, 0)
    table = table.append_column("batch_id", pa.array(plan["batch_id"][a:b], pa.int32()))
    # a query moved to its second cluster (batching.rebalance) is written with the cluster it trains in
    table = table.set_column(table.schema.get_field_index("cluster_id"), "cluster_id",
                             pa.array(plan["cluster"][a:b], pa.int32()))
    groups = tuple(g for g in _groups(table, "ntuple" if writer.stages_pairs else writer.fmt) if g != "batches")
    if writer.stages_pairs:  # whole pairs, in batch order: each becomes its group of rows
        table = writer.pair_rows(table)
    return writer.write_rows(dst, table, (*groups, "batches")).num_rows


def run_batches(ex: Executor, writer: Writer, corpus: Files, queries: Files, job: Job,  # noqa: PLR0913
                clusters: Files | None = None, guard: GuardScorer | None = None) -> dict:
    """Compose batches over every file `writer` staged, write the output data files through it, remove
    the staging folder.

    Returns the batch stats for the manifest (rows, batches, rows merged or left out, ...).
    """
    staged = writer.staging
    names = staged.ls(".parquet")
    if not names:
        raise RuntimeError(f"{staged.url}: no mined files to compose batches from")
    files = staged.files(names)
    res = Batch.RESOURCES
    stats_ref, plan_ref = ex.submit(compose_plan, files, corpus, queries, job, clusters, guard, res=res["plan"],
                                    returns=2)
    stats = execution.get(stats_ref)
    parts = stats["files"]
    calls = [(files, plan_ref, i, writer.data_file(i, parts), writer) for i in range(parts)]
    written = ex.map(write_part, calls, res["writer"], desc="batch")
    if sum(written) != stats["rows_batched"]:
        raise RuntimeError(f"batch stage wrote {sum(written)} rows, planned {stats['rows_batched']}")
    staged.rm("", recursive=True)
    return stats


class Batch(Stage):
    """Rewrites the mined rows in topic-batch order. Its input, the mined rows, is new on every
    run, so it has nothing to reuse."""

    name = "batch"
    RESOURCES = {"plan": Resources(cpus=1), "writer": Resources(cpus=1)}

    def enabled(self, job: Job) -> bool:
        return job.batch_size is not None

    def resources(self, run: Run) -> dict[str, Resources]:
        return self.RESOURCES

    def run(self, run: Run, force: bool) -> None:
        clusters = run.cluster.folder.files([s.name for s in run.read.query_shards])
        run.batch = run_batches(run.ex, run.writer, run.read.corpus, run.read.query_texts, run.job, clusters,
                                guard_scorer(run))
