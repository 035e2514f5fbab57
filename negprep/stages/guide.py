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

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from negprep.config import Job
from negprep.devices import cuda_on_cpu, torch_device
from negprep.embedding_pool import EmbedPart, actor_layout, batching, embed_parts, embedder, ensure_exports
from negprep.embeddings import load_embeddings
from negprep.errors import NegprepError
from negprep.execution import Resources, assigned_gpus
from negprep.models import check_compiler, encoder_specs, resolve_model
from negprep.paths import File, Files, Folder, stage_key
from negprep.results import Encoded, StageOutput
from negprep.schemas import conform
from negprep.shards import Shard, write_shards
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


class CrossEncoder:
    """A sequence-classification model scoring (query, passage) pairs; sigmoid of a single logit,
    or the probability of the last class for a multi-class head."""

    def __init__(self, model_dir: str, max_length: int, threads: int, trust_remote_code: bool = False,
                 device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code).eval().to(self.device)
        self.max_length = max_length

    def score(self, queries: list[str], passages: list[str], batch_size: int = 32) -> np.ndarray:
        torch = self.torch
        out = np.empty(len(queries), dtype=np.float32)
        order = np.argsort([len(q) + len(p) for q, p in zip(queries, passages, strict=True)], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer([queries[i] for i in idx], [passages[i] for i in idx], truncation=True,
                                     max_length=self.max_length, padding=True, return_tensors="pt")
                logits = self.model(**enc.to(self.device)).logits.float()
                s = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
                out[idx] = s.cpu().numpy()
        return out


@dataclass(frozen=True)
class CrossScoring:
    """Where a cross-encoder actor reads and writes: candidates and guide scores per query shard."""

    candidates: Folder
    queries: Folder
    corpus: Files
    out: Folder
    window: Window


class ShardCrossScorer:
    """Ray actor: loads the cross-encoder once, scores one query shard per call."""

    def __init__(self, model_dir: str, max_length: int, threads: int, batch_size: int, trust_remote_code: bool,
                 where: CrossScoring, device: str = "cpu"):
        if device == "cuda" and not cuda_on_cpu() and not assigned_gpus():
            raise NegprepError("a cross-encoder actor on cuda got no GPU from Ray")
        self.ce = CrossEncoder(model_dir, max_length, threads, trust_remote_code, device)
        self.batch_size, self.where = batch_size, where

    def score_shard(self, name: str) -> str:
        w = self.where
        cross_encoder_shard(self.ce, self.batch_size, w.candidates.file(name), w.queries.file(name), w.corpus,
                            w.out.file(name), w.window)
        return name


def cross_encoder_shard(ce: CrossEncoder, batch_size: int, candidates: File, queries: File, corpus: Files,  # noqa: PLR0913
                        dst: File, window: Window) -> None:
    """Score one query shard's window candidates and positives with the cross-encoder."""
    cand = candidates.read_parquet()
    qt = queries.read_parquet(columns=["id", "text"])
    qtext = dict(zip(qt.column("id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    rows = list(zip(cand.column("query_id").to_pylist(), cand.column("candidate_ids").to_pylist(),
                    cand.column("positive_ids").to_pylist(), strict=True))
    need = {d for _, cids, pids in rows for d in [*window.of(cids), *pids]}
    ptext = corpus.lookup(need, "text")
    pq_, pp_ = [], []
    for q, cids, pids in rows:
        for d in [*window.of(cids), *pids]:
            pq_.append(qtext[q])
            pp_.append(ptext[d])
    flat = iter(ce.score(pq_, pp_, batch_size).tolist())
    out = {"query_id": [], "candidate_guide_scores": [], "positive_guide_scores": []}
    for q, cids, pids in rows:
        out["query_id"].append(q)
        out["candidate_guide_scores"].append(window.aligned(cids, [next(flat) for _ in window.of(cids)]))
        out["positive_guide_scores"].append([next(flat) for _ in pids])
    dst.write_parquet(conform(pa.table(out), "guide_scores"))


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
        g, shards = run.job.guide, run.read.query_shards
        if run.devices.get("guide") == "cuda":
            name = "cross_encoder" if g.type == "crossencoder" else "embedder"
            return {name: embedder(1, g.gpus_per_actor), "passages": Resources(cpus=1), "scores": Resources(cpus=1)}
        if g.type == "crossencoder":
            _, threads = actor_layout(run.cpus, [1] * len(shards), g.actors, g.threads_per_actor)
            return {"cross_encoder": Resources(cpus=threads)}
        _, threads = actor_layout(run.cpus, [s.work for s in shards], g.actors, g.threads_per_actor)
        return {"embedder": embedder(threads), "passages": Resources(cpus=1), "scores": Resources(cpus=1)}

    def run(self, run: Run, force: bool) -> None:
        job, g, read, work = run.job, run.job.guide, run.read, run.work
        device = run.devices.get("guide", "cpu")
        pspec, qspec = encoder_specs(resolve_model(g.model), g, work, device)
        window = Window(job.range_min, job.range_max)
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
        res = self.resources(run)
        if g.type == "crossencoder":
            if device == "cuda":
                actors, threads = max(1, min(g.actors or len(todo), len(todo), int(run.gpus / g.gpus_per_actor))), 1
            else:
                actors, threads = actor_layout(run.cpus, [1] * len(todo), g.actors, g.threads_per_actor)
            # pairs are padded to the batch's longest, at most max_length: keep a batch within batch_tokens
            batch_size, batch_tokens = batching(g, device)
            rows = min(batch_size, max(1, (batch_tokens or 1 << 30) // g.max_length))
            where = CrossScoring(sdir, read.query_texts.folder, read.corpus, gdir, window)
            args = (pspec.model_dir, g.max_length, threads, rows, g.trust_remote_code, where, device)
            run.ex.map_actors(ShardCrossScorer, args, actors, res.get("cross_encoder", Resources(cpus=threads)),
                              lambda a, n: a.score_shard.remote(n), todo, desc="guide")
            stats["device"] = device
            return
        passages = Encoded(pspec, work.sub("embeddings", pspec.key()))
        queries = Encoded(qspec, work.sub("embeddings", qspec.key()))
        if (seconds := ensure_exports([passages], force)) is not None:
            run.timings["export"] = round(run.timings.get("export", 0.0) + seconds, 3)
        texts, pshards = self._passages(run, passages, window, force, res["passages"])
        whole = pshards == read.corpus_shards
        stats["passages"] = "whole corpus (cached)" if whole else sum(s.rows for s in pshards)
        stats["embed"] = embed_parts(run.ex, run.cpus, [EmbedPart("passages", texts, pshards, passages),
                                                        EmbedPart("queries", read.query_texts.folder,
                                                                  read.query_shards, queries)], g, force,
                                      run.gpus)
        qfile = {s.name: queries.file(s) for s in read.query_shards}
        run.ex.map(biencoder_scores, [(sdir.file(n), qfile[n], passages.files(pshards), gdir.file(n), window)
                                      for n in todo], res["scores"], desc="guide")

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
