"""Mine stage: candidates -> negatives -> output rows with texts, one Ray task per query shard.

Applies the rules of `negprep.rules.mining` to a query shard's candidates (and its guide scores),
joins the texts (queries from the shard, passages looked up by id in the corpus shards), checks
the rows against the output contract in schemas/ and writes one data file; with `dropped`, also
every dropped candidate with its rule (schemas/dropped_candidates.yaml). Returns the counts and a
bounded sample of scores for the manifest; the driver never sees text.

It writes the output (or, with `batch_size`, a staging folder the batch stage reorders), so it
runs on every run: its input, the candidates, is what the earlier stages cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from negprep.config import Job
from negprep.execution import Resources
from negprep.output.writer import Writer
from negprep.paths import File, Files, Folder, stage_key
from negprep.results import MineResult
from negprep.rules import mining
from negprep.rules.candidates import Mined, mine_candidates
from negprep.schemas import schema
from negprep.stages.base import Run, Stage

SAMPLE = 100_000  # scores per shard kept for the manifest's quantiles


def rules(job: Job) -> mining.Rules:
    """The mining rules of a job: its top-level keys and its guide's margins."""
    g = job.guide
    return mining.Rules(
        num_negatives=job.num_negatives,
        range_min=job.range_min,
        range_max=job.range_max,
        relative_margin=job.relative_margin,
        absolute_margin=job.absolute_margin,
        max_score=job.max_score,
        min_score=job.min_score,
        sampling=job.sampling,
        seed=job.seed,
        margin_bins=job.margin_bins,
        near_duplicate=job.near_duplicate,
        unit_scores=job.embed.normalize,
        guide_relative_margin=g.relative_margin if g else None,
        guide_absolute_margin=g.absolute_margin if g else None,
        guide_max_score=g.max_score if g else None,
        guide_max_zscore=g.max_zscore if g else None,
    )


def dropped_rows(mined: Mined) -> pa.Table:
    """The audit table: every window candidate a rule dropped, with the rule and both models' scores."""
    code = mined.code
    rows, cols = np.nonzero(code > mining.KEEP)
    g, gref = mined.guide, mined.gref
    table = {
        "query_id": [mined.qids[r] for r in rows],
        "candidate_id": [mined.cids[r][c] for r, c in zip(rows, cols, strict=True)],
        "candidate_rank": cols.astype(np.int32),
        "reason": [mining.REASONS[code[r, c] - 1] for r, c in zip(rows, cols, strict=True)],
        "score": mined.scores[rows, cols].astype(np.float32),
        "positive_score": mined.ref[rows].astype(np.float32),
        "guide_score": pa.nulls(len(rows), pa.float32()) if g is None else g[rows, cols].astype(np.float32),
        "positive_guide_score": pa.nulls(len(rows), pa.float32()) if g is None else gref[rows].astype(np.float32),
    }
    return pa.table(table, schema=schema("dropped_candidates"))


def pairs_for_output(mined: Mined, n: int) -> dict[str, list]:
    """The shard's pairs (`negprep.output.formats.pairs`, texts filled later): per (query, positive)
    its ids, scores, its n negatives' ids, scores and ranks (None past those it got) and the teacher's
    `scores`. The teacher is the guide when there is one, else the mining model."""
    p, qids, cids = mined.pairs, mined.qids, mined.cids
    with_guide = mined.guide is not None
    teacher, pteacher = (mined.guide, p.pguide) if with_guide else (mined.scores, p.pscore)
    cols: dict[str, list] = {"query_id": [qids[q] for q in p.q], "positive_id": list(p.pid),
                             "positive_score": list(p.pscore)}
    if with_guide:
        cols["positive_guide_score"] = list(p.pguide)
    for i in range(1, n + 1):
        cols |= {f"negative_{i}_id": [], f"negative_{i}_score": [], f"negative_{i}_rank": []}
        if with_guide:
            cols[f"negative_{i}_guide_score"] = []
    cols["scores"] = []
    for row, q in enumerate(p.q):
        scores = [float(pteacher[row])]
        for i, j in enumerate(p.picked[row], 1):
            got = j >= 0
            cols[f"negative_{i}_id"].append(cids[q][j] if got else None)
            cols[f"negative_{i}_score"].append(mined.scores[q, j] if got else None)
            cols[f"negative_{i}_rank"].append(int(j) if got else None)
            if with_guide:
                cols[f"negative_{i}_guide_score"].append(mined.guide[q, j] if got else None)
            scores.append(float(teacher[q, j]) if got else None)
        cols["scores"].append(scores)
    return cols


@dataclass(frozen=True)
class MineTask:
    """One query shard's files: what the mine task reads and where it writes."""

    candidates: File
    queries: File
    corpus: Files
    dst: File  # the shard's rows, in `writer.mined`
    rules: mining.Rules
    writer: Writer  # the output's writer: rows cast to the format, the grouped exports
    guide: File | None = None  # the shard's guide scores (schemas/guide_scores.yaml)
    dropped: File | None = None  # the audit of dropped candidates
    clusters: File | None = None  # the shard's query clusters (schemas/clusters.yaml), written as `cluster_id`
    embeddings: Files | None = None  # the corpus's embedding files (mining model), for the near-copy rule


def mine_shard(task: MineTask) -> MineResult:
    """Mine one query shard and write its output data file (and its audit file with `dropped`), as
    a Ray task. Returns the counts and bounded samples of scores for the manifest."""
    t0 = time.perf_counter()
    rules = task.rules
    cand = task.candidates.read_parquet()
    gtable = task.guide.read_parquet() if task.guide else None
    window_ids = {d for c in cand.column("candidate_ids").to_pylist() for d in c[rules.range_min : rules.range_max]}
    pos_ids = {d for col in ("positive_ids", "excluded_ids") for p in cand.column(col).to_pylist() for d in p}
    keys = task.corpus.lookup(window_ids | pos_ids, "text_key")
    vectors = None
    if task.embeddings is not None:
        def vectors(ids: set[str]) -> dict[str, np.ndarray]:
            found = task.embeddings.lookup(ids, "embedding")
            return {d: (v := np.asarray(x, dtype=np.float64)) / max(np.linalg.norm(v), 1e-12) for d, x in found.items()}
    mined, counts = mine_candidates(cand, rules, gtable, keys, vectors)
    cols = pairs_for_output(mined, rules.num_negatives)
    id_cols = [c for c in cols if c.endswith("_id") and c != "query_id"]
    passages = task.corpus.lookup({d for c in id_cols for d in cols[c] if d is not None}, "text")
    qt = task.queries.read_parquet(columns=["id", "text"])
    qtext = dict(zip(qt.column("id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    cols["query"] = [qtext[q] for q in cols["query_id"]]
    for c in id_cols:
        cols[c.removesuffix("_id")] = [None if d is None else passages[d] for d in cols[c]]
    groups = ("guide",) if gtable is not None else ()
    if task.clusters:
        ct = task.clusters.read_parquet()
        cid = dict(zip(ct.column("query_id").to_pylist(), ct.column("cluster_id").to_pylist(), strict=True))
        cols["cluster_id"] = [cid[q] for q in cols["query_id"]]
        groups += ("clusters",)
    table, written = task.writer.write_pairs(task.dst, cols, groups)
    if task.dropped:
        task.dropped.write_parquet(dropped_rows(mined))
    grouped = written.pop("exports", {})
    counts |= written
    counts["rows"] = table.num_rows
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return MineResult(counts, score_samples(mined), count_distributions(mined), grouped)


def count_distributions(mined: Mined) -> dict[str, list[int]]:
    """Exact counts for the report, indexed by value: negatives chosen per (query, positive) pair and
    candidates kept per query. Small (num_negatives + 1 and range_max + 1 entries); the driver sums them."""
    got = (mined.pairs.picked >= 0).sum(axis=1)
    kept = (mined.code == mining.KEEP).sum(axis=1)
    return {
        "negatives_per_pair": np.bincount(got, minlength=mined.pairs.picked.shape[1] + 1).tolist(),
        "kept_per_query": np.bincount(kept, minlength=mined.code.shape[1] + 1).tolist(),
    }


def score_samples(mined: Mined) -> dict[str, np.ndarray]:
    """Bounded random samples of the score distributions the manifest and report describe."""
    rng = np.random.default_rng(0)
    p, code, scores = mined.pairs, mined.code, mined.scores
    picked = p.picked
    rows, cols = np.nonzero(picked >= 0)
    qrow = p.q[rows]
    ranks = picked[rows, cols]
    kept, dropped = code == mining.KEEP, code > mining.KEEP
    sample = {
        "positive_scores": p.pscore,
        "negative_scores": scores[qrow, ranks],
        "negative_ranks": ranks,
        "margins": p.pscore[rows] - scores[qrow, ranks],  # pair positive minus chosen negative
        "kept_scores": scores[kept],
        "dropped_scores": scores[dropped],
    }
    if mined.guide is not None:
        g = mined.guide
        sample |= {
            "positive_guide_scores": p.pguide,
            "negative_guide_scores": g[qrow, ranks],
            "kept_guide_scores": g[kept],
            "dropped_guide_scores": g[dropped],
        }
    for key, arr in sample.items():
        arr = np.asarray(arr, dtype=np.int32 if key == "negative_ranks" else np.float32)
        sample[key] = rng.choice(arr, SAMPLE, replace=False) if len(arr) > SAMPLE else arr
    return sample


class Mine(Stage):
    name = "mine"

    def resources(self, run: Run) -> dict[str, Resources]:
        return {"miner": Resources(cpus=1)}

    def run(self, run: Run, force: bool) -> None:
        job, read = run.job, run.read
        # with batch_size the mined files are staged, then rewritten in batch order by the batch stage
        staging = run.work.sub("unbatched", stage_key(job.output)) if job.batch_size else None
        run.writer = Writer(run.out, job.format, job.num_negatives, staging, tuple(job.exports),
                            job.export.model_dump())
        run.writer.prepare(run.overwrite)
        audit = Folder(job.dropped, job.storage) if job.dropped else None
        if audit:
            audit.rm("", recursive=True)
        n, r = len(read.query_shards), rules(job)
        tasks = [
            (MineTask(run.search.file(s), read.query_texts.folder.file(s.name), read.corpus,
                      run.writer.mined.file(f"train-{i:05d}-of-{n:05d}.parquet"), r, run.writer,
                      guide=run.guide.file(s) if run.guide else None,
                      dropped=audit.file(f"part-{i:05d}.parquet") if audit else None,
                      clusters=run.cluster.file(s) if run.cluster else None,
                      embeddings=run.embed.passages.files(read.corpus_shards) if job.near_duplicate else None),)
            for i, s in enumerate(read.query_shards)
        ]
        run.mine = MineResult.merge(run.ex.map(mine_shard, tasks, self.resources(run)["miner"], desc="mine"))
