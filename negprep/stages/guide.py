"""Guide stage: a second, stronger model scores each query's candidates and positives (GISTEmbed).

Runs between search and mine, over the candidates of the mining window only:

- a bi-encoder guide embeds just the passages that appear as candidates or positives (a subset of
  the corpus written as its own content-addressed shards), plus the queries, through the same
  embed stage as the mining model; when the whole corpus is already embedded with the guide (the
  guide is the mining model, or an earlier job did it), those embeddings are used instead.
- a cross-encoder guide scores (query, passage) pairs on a pool of Ray actors, one query shard
  per call; it never touches passages outside the candidates.

Either way the result is `guide/<key>/<query shard>.parquet` (schemas/guide_scores.yaml), scores
aligned with the candidates file, which the mine stage reads next to it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from negprep.config import Job
from negprep.errors import NegprepError
from negprep.execution import Resources, assigned_gpus, each
from negprep.input.shards import Shard, write_shards
from negprep.models.cross_encoder import CrossEncoder, cross_encoder_dtype, tokenize_pairs
from negprep.models.devices import cuda_on_cpu
from negprep.models.encoders import encoder_specs
from negprep.models.pool import TOKENIZER, EmbedPart, actor_pool, batching, embed_parts, ensure_exports, threads_of
from negprep.models.resolve import check_compiler, resolve_model
from negprep.models.vectors import load_embeddings
from negprep.paths import File, Files, Folder, stage_key
from negprep.results import Encoded, StageOutput
from negprep.schemas import conform
from negprep.stages.base import Run, Stage


@dataclass(frozen=True)
class Window:
    """The candidate ranks [start, stop) a guide scores."""

    start: int
    stop: int

    def of(self, ids: list) -> list:
        return ids[self.start : self.stop]

    def aligned(self, ids: list, scores: list[float]) -> list[float]:
        """Guide scores aligned with all of `ids`: NaN outside the window."""
        out = [float("nan")] * len(ids)
        out[self.start : self.start + len(scores)] = scores
        return out


def needed_passages(candidates: Files, corpus: Files, out: Folder, window: Window, shard_rows: int) -> list[dict]:
    """Write the passages a guide must score (window candidates and positives) as text shards (Ray task)."""
    need: set[str] = set()
    for f in candidates:
        t = f.read_parquet(columns=["candidate_ids", "positive_ids"])
        for cids, pids in zip(t.column("candidate_ids").to_pylist(), t.column("positive_ids").to_pylist(),
                              strict=True):
            need.update(window.of(cids))
            need.update(pids)
    text = corpus.lookup(need, "text")
    # a stable order, so the shard digests (cache keys) are stable
    ordered = sorted(text)
    table = pa.table({"id": pa.array(ordered, pa.string()), "text": pa.array([text[d] for d in ordered], pa.string())})
    return [s.to_dict() for s in write_shards(out, table, shard_rows)]


def biencoder_scores(candidates: File, query_emb: File, passage_emb: Files, dst: File, window: Window) -> dict:
    """Inner products of the guide's query and passage embeddings for one query shard (Ray task)."""
    t0 = time.perf_counter()
    cand = candidates.read_parquet()
    qids, qvec = load_embeddings(query_emb)
    qrow = {q: i for i, q in enumerate(qids)}
    ids: list[str] = []
    mats = []
    for f in passage_emb:
        pids, pvec = load_embeddings(f)
        ids += pids
        mats.append(pvec)
    prow = {d: i for i, d in enumerate(ids)}
    pmat = np.concatenate(mats) if mats else np.zeros((0, qvec.shape[1]), np.float32)

    def score(q: str, docs: list[str]) -> list[float]:
        rows = [prow.get(d, -1) for d in docs]
        out = np.full(len(docs), np.nan, dtype=np.float32)
        ok = np.array([r >= 0 for r in rows], dtype=bool)
        if ok.any():
            out[ok] = pmat[np.array(rows)[ok]] @ qvec[qrow[q]]
        return out.tolist()

    out = {"query_id": [], "candidate_guide_scores": [], "positive_guide_scores": []}
    for q, cids, pids in zip(cand.column("query_id").to_pylist(), cand.column("candidate_ids").to_pylist(),
                             cand.column("positive_ids").to_pylist(), strict=True):
        out["query_id"].append(q)
        out["candidate_guide_scores"].append(window.aligned(cids, score(q, window.of(cids))))
        out["positive_guide_scores"].append(score(q, pids))
    dst.write_parquet(conform(pa.table(out), "guide_scores"))
    return {"queries": cand.num_rows, "seconds": round(time.perf_counter() - t0, 3)}


@dataclass(frozen=True)
class CrossScoring:
    """Where a cross-encoder reads and writes: candidates and guide scores per query shard."""

    candidates: Folder
    queries: Folder
    corpus: Files
    out: Folder
    window: Window


def shard_pairs(where: CrossScoring, name: str) -> tuple[list[tuple[str, list, list]], list[tuple[str, str]]]:
    """One query shard's rows (query id, candidate ids, positive ids) and, in order, the (query
    text, passage text) pairs a cross-encoder scores: each row's window candidates, then its positives."""
    cand = where.candidates.read_parquet(name)
    qt = where.queries.read_parquet(name, columns=["id", "text"])
    qtext = dict(zip(qt.column("id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    rows = list(zip(cand.column("query_id").to_pylist(), cand.column("candidate_ids").to_pylist(),
                    cand.column("positive_ids").to_pylist(), strict=True))
    need = {d for _, cids, pids in rows for d in [*where.window.of(cids), *pids]}
    ptext = where.corpus.lookup(need, "text")
    pairs = [(qtext[q], ptext[d]) for q, cids, pids in rows for d in [*where.window.of(cids), *pids]]
    return rows, pairs


def write_pair_scores(rows: list[tuple[str, list, list]], scores: list[float], dst: File, window: Window) -> None:
    """Write a query shard's guide scores, `scores` in `shard_pairs`' order."""
    flat = iter(scores)
    out = {"query_id": [], "candidate_guide_scores": [], "positive_guide_scores": []}
    for q, cids, pids in rows:
        out["query_id"].append(q)
        out["candidate_guide_scores"].append(window.aligned(cids, [next(flat) for _ in window.of(cids)]))
        out["positive_guide_scores"].append([next(flat) for _ in pids])
    dst.write_parquet(conform(pa.table(out), "guide_scores"))


def pair_tokens(where: CrossScoring, name: str, model_dir: str, max_length: int, trust_remote_code: bool) -> dict:
    """A query shard's pairs tokenised for `CrossEncoder.score_tokens`, with its rows (a CPU task
    feeding a GPU actor)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per task
    rows, pairs = shard_pairs(where, name)
    return {"rows": rows} | tokenize_pairs(model_dir, max_length, trust_remote_code, pairs)


class ShardCrossScorer:
    """Ray actor: loads the cross-encoder once, scores one query shard per call."""

    def __init__(self, model_dir: str, max_length: int, threads: int, batch_size: int, trust_remote_code: bool,
                 where: CrossScoring, device: str = "cpu", dtype: str = "auto", batch_tokens: int | None = None):
        if device == "cuda" and not cuda_on_cpu() and not assigned_gpus():
            raise NegprepError("a cross-encoder actor on cuda got no GPU from Ray")
        self.ce = CrossEncoder(model_dir, max_length, threads, trust_remote_code, device, dtype)
        self.batch_size, self.batch_tokens, self.where = batch_size, batch_tokens, where

    def score_shard(self, name: str) -> str:
        rows, pairs = shard_pairs(self.where, name)
        scores = self.ce.score([q for q, _ in pairs], [p for _, p in pairs], self.batch_size)
        write_pair_scores(rows, scores.tolist(), self.where.out.file(name), self.where.window)
        return name

    def score_pieces(self, name: str, pieces: list) -> str:
        """Score a query shard from its pairs tokenised by `pair_tokens` (one piece)."""
        for tokens in each(pieces):
            scores = self.ce.score_tokens(tokens, self.batch_size, self.batch_tokens)
            write_pair_scores(tokens["rows"], scores.tolist(), self.where.out.file(name), self.where.window)
        return name


class Guide(Stage):
    """Score every query shard's window candidates and positives with the job's guide model.

    Its result is the folder of guide score files (one per query shard, named like the candidates).
    The key covers the candidates and the guide settings; finished shard files are reused, and so
    are the guide's own caches (its passage shards, its embeddings, its ONNX export) unless forced.
    """

    name = "guide"

    def enabled(self, job: Job) -> bool:
        return job.guide is not None

    def check(self, job: Job) -> None:
        resolve_model(job.guide.model)  # bi- or cross-encoder: a misspelt name is one line before Ray
        if job.guide.compile:
            check_compiler("guide.compile")

    def resources(self, run: Run) -> dict[str, Resources]:
        g, device, shards = run.job.guide, run.devices.get("guide", "cpu"), run.read.query_shards
        if g.type == "crossencoder":  # one call per query shard
            pool = actor_pool([1] * len(shards), g, device, run.cpus, run.gpus)
            return {"cross_encoder": pool} | ({"tokenizer": TOKENIZER} if device == "cuda" else {})
        # a bi-encoder embeds the query shards and at most the corpus's passages: sized on both
        work = [s.work for s in (*shards, *run.read.corpus_shards)]
        return {"embedder": actor_pool(work, g, device, run.cpus, run.gpus), "passages": Resources(cpus=1),
                "scores": Resources(cpus=1)}

    def run(self, run: Run, force: bool) -> None:
        g, read, work = run.job.guide, run.read, run.work
        device = run.devices.get("guide", "cpu")
        pspec, qspec = encoder_specs(resolve_model(g.model), g, work, device)
        window = Window(run.job.range_min, run.job.range_max)
        sdir = run.search.folder
        gdir = work.sub("guide", stage_key(sdir.url, g.type, pspec.key(), qspec.key(), (window.start, window.stop)))
        if force:
            gdir.rm("", recursive=True)
        done = set(gdir.ls(".parquet"))
        todo = [s.name for s in read.query_shards if s.name not in done]
        stats: dict = {"model": g.model, "type": g.type, "folder": gdir.url, "query_shards": len(read.query_shards),
                       "reused": len(read.query_shards) - len(todo)}
        run.guide = StageOutput(gdir, stats)
        if not todo:
            return
        if g.type == "crossencoder":
            stats |= {"device": device, "dtype": cross_encoder_dtype(g.dtype, device)}
            self._cross(run, CrossScoring(sdir, read.query_texts.folder, read.corpus, gdir, window), pspec.model_dir,
                        todo)
            return
        res = self.resources(run)
        passages = Encoded(pspec, work.sub("embeddings", pspec.key()))
        queries = Encoded(qspec, work.sub("embeddings", qspec.key()))
        if (seconds := ensure_exports([passages], force)) is not None:
            run.timings["export"] = round(run.timings.get("export", 0.0) + seconds, 3)
        texts, pshards = self._passages(run, passages, window, force, res["passages"])
        stats["passages"] = "whole corpus (cached)" if pshards == read.corpus_shards else sum(s.rows for s in pshards)
        parts = [EmbedPart("passages", texts, pshards, passages),
                 EmbedPart("queries", read.query_texts.folder, read.query_shards, queries)]
        stats["embed"] = embed_parts(run.ex, run.cpus, parts, g, res["embedder"], force)
        qfile = {s.name: queries.file(s) for s in read.query_shards}
        run.ex.map(biencoder_scores, [(sdir.file(n), qfile[n], passages.files(pshards), gdir.file(n), window)
                                      for n in todo], res["scores"], desc="guide")

    def _cross(self, run: Run, where: CrossScoring, model_dir: str, todo: list[str]) -> None:
        """Score the query shards `todo` with a cross-encoder guide on the declared actor pool."""
        g, device = run.job.guide, run.devices.get("guide", "cpu")
        res = self.resources(run)
        pool = res["cross_encoder"]
        actors, threads = min(pool.actors, len(todo)), threads_of(pool)
        # pairs are padded to the batch's longest, at most max_length: keep a batch within batch_tokens
        batch_size, batch_tokens = batching(g, device)
        if device == "cuda":  # CPU tasks tokenise the pairs; the actor batches by length within batch_tokens
            args = (model_dir, g.max_length, threads, batch_size, g.trust_remote_code, where, device, g.dtype,
                    batch_tokens)
            run.ex.stream(pair_tokens, res["tokenizer"], ShardCrossScorer, args, actors, pool,
                          lambda n: [(where, n, model_dir, g.max_length, g.trust_remote_code)],
                          lambda a, n, futures: a.score_pieces.remote(n, futures), todo, ahead=2 * run.cpus,
                          desc="guide")
            return
        rows = min(batch_size, max(1, (batch_tokens or 1 << 30) // g.max_length))
        args = (model_dir, g.max_length, threads, rows, g.trust_remote_code, where, device, g.dtype)
        run.ex.map_actors(ShardCrossScorer, args, actors, pool, lambda a, n: a.score_shard.remote(n), todo,
                          desc="guide")

    def _passages(self, run: Run, passages: Encoded, window: Window, force: bool,
                  res: Resources) -> tuple[Folder, tuple[Shard, ...]]:
        """The text shards a bi-encoder guide embeds: the whole corpus when it is already embedded
        with the guide (the guide is the mining model, or an earlier job did it), else only the
        passages that appear as window candidates or positives, written as shards of their own."""
        read = run.read
        cached = set(passages.folder.ls(".parquet"))
        if not force and all(s.embedding in cached for s in read.corpus_shards):
            return read.corpus.folder, read.corpus_shards
        texts = run.work.sub("guide-texts", stage_key(run.search.folder.url, (window.start, window.stop)))
        if force:
            texts.rm("", recursive=True)
        if not texts.exists("shards.json"):
            shards = run.ex.call(needed_passages, run.search.folder.files([s.name for s in read.query_shards]),
                                 read.corpus, texts, window, run.job.read.shard_rows, res=res)
            texts.write_json("shards.json", shards)
        return texts, tuple(map(Shard.from_dict, texts.read_json("shards.json")))
