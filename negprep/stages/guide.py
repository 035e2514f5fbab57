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

import numpy as np
import pyarrow as pa

from negprep.models import encoder_specs, resolve_model
from negprep.paths import Folder, stage_key
from negprep.schemas import conform
from negprep.stages.embed import load_embeddings
from negprep.stages.read import shard_entry


def _window(ids: list, range_min: int, range_max: int) -> list:
    return ids[range_min:range_max]


def needed_passages(
    candidates: tuple[Folder, list[str]],
    corpus: tuple[Folder, list[str]],
    out: Folder,
    range_min: int,
    range_max: int,
    shard_rows: int,
) -> list[dict]:
    """Write the passages a guide must score (window candidates and positives) as text shards."""
    need: set[str] = set()
    for name in candidates[1]:
        t = candidates[0].read_parquet(name, columns=["candidate_ids", "positive_ids"])
        for cids, pids in zip(t.column("candidate_ids").to_pylist(), t.column("positive_ids").to_pylist(),
                              strict=True):
            need.update(_window(cids, range_min, range_max))
            need.update(pids)
    text = corpus[0].lookup(corpus[1], need, "text")
    # a stable order, so the shard digests (cache keys) are stable
    ordered = sorted(text)
    table = pa.table({"id": pa.array(ordered, pa.string()), "text": pa.array([text[d] for d in ordered], pa.string())})
    shards = []
    for i, start in enumerate(range(0, table.num_rows, shard_rows)):
        part = table.slice(start, shard_rows).combine_chunks()
        name = f"{i:05d}.parquet"
        out.write_parquet(name, part)
        shards.append(shard_entry(name, part))
    return shards


def biencoder_scores(
    candidates: tuple[Folder, str],
    query_emb: tuple[Folder, str],
    passage_emb: tuple[Folder, list[str]],
    dst: tuple[Folder, str],
    range_min: int,
    range_max: int,
) -> dict:
    """Inner products of the guide's query and passage embeddings for one query shard."""
    t0 = time.perf_counter()
    cand = candidates[0].read_parquet(candidates[1])
    qids, qvec = load_embeddings(*query_emb)
    qrow = {q: i for i, q in enumerate(qids)}
    ids: list[str] = []
    mats = []
    for name in passage_emb[1]:
        pids, pvec = load_embeddings(passage_emb[0], name)
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
        window = _window(cids, range_min, range_max)
        scores = [float("nan")] * len(cids)
        scores[range_min : range_min + len(window)] = score(q, window)
        out["query_id"].append(q)
        out["candidate_guide_scores"].append(scores)
        out["positive_guide_scores"].append(score(q, pids))
    dst[0].write_parquet(dst[1], conform(pa.table(out), "guide_scores"))
    return {"queries": cand.num_rows, "seconds": round(time.perf_counter() - t0, 3)}


class CrossEncoder:
    """A sequence-classification model scoring (query, passage) pairs; sigmoid of a single logit,
    or the probability of the last class for a multi-class head."""

    def __init__(self, model: str, max_length: int, threads: int, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, trust_remote_code=trust_remote_code).eval()
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
                logits = self.model(**enc).logits.float()
                s = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]
                out[idx] = s.numpy()
        return out


class ShardCrossScorer:
    """Ray actor: loads the cross-encoder once, scores one query shard per call."""

    def __init__(self, model: str, max_length: int, threads: int, batch_size: int, trust_remote_code: bool,
                 candidates: Folder, queries: Folder, corpus: tuple[Folder, list[str]], out: Folder,
                 range_min: int, range_max: int):
        self.ce = CrossEncoder(model, max_length, threads, trust_remote_code)
        self.batch_size = batch_size
        self.candidates, self.queries, self.corpus, self.out = candidates, queries, corpus, out
        self.window = (range_min, range_max)

    def score_shard(self, name: str) -> str:
        cross_encoder_shard(self.ce, self.batch_size, (self.candidates, name), (self.queries, name),
                            self.corpus, (self.out, name), *self.window)
        return name


def cross_encoder_shard(
    ce: CrossEncoder,
    batch_size: int,
    candidates: tuple[Folder, str],
    queries: tuple[Folder, str],
    corpus: tuple[Folder, list[str]],
    dst: tuple[Folder, str],
    range_min: int,
    range_max: int,
) -> None:
    cand = candidates[0].read_parquet(candidates[1])
    qt = queries[0].read_parquet(queries[1], columns=["id", "text"])
    qtext = dict(zip(qt.column("id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    rows = list(zip(cand.column("query_id").to_pylist(), cand.column("candidate_ids").to_pylist(),
                    cand.column("positive_ids").to_pylist(), strict=True))
    need = {d for _, cids, pids in rows for d in [*_window(cids, range_min, range_max), *pids]}
    ptext = corpus[0].lookup(corpus[1], need, "text")
    pq_, pp_ = [], []
    for q, cids, pids in rows:
        for d in [*_window(cids, range_min, range_max), *pids]:
            pq_.append(qtext[q])
            pp_.append(ptext[d])
    flat = iter(ce.score(pq_, pp_, batch_size).tolist())
    out = {"query_id": [], "candidate_guide_scores": [], "positive_guide_scores": []}
    for q, cids, pids in rows:
        window = _window(cids, range_min, range_max)
        scores = [float("nan")] * len(cids)
        scores[range_min : range_min + len(window)] = [next(flat) for _ in window]
        out["query_id"].append(q)
        out["candidate_guide_scores"].append(scores)
        out["positive_guide_scores"].append([next(flat) for _ in pids])
    dst[0].write_parquet(dst[1], conform(pa.table(out), "guide_scores"))


def run_guide(job, cpus: int, work: Folder, rdir: Folder, read: dict, sdir: Folder) -> tuple[Folder, dict]:
    """Score every query shard's window candidates and positives with the job's guide model.

    Returns the folder of guide score files (one per query shard, named like the candidates) and
    counts. Finished shard files are reused; the key covers the candidates and the guide settings.
    """
    import ray

    from negprep.stages.embed import EmbedPart, actor_layout, map_on_actors, run_embed

    g = job.guide
    resolved = resolve_model(g.model)
    pspec, qspec = encoder_specs(resolved, g, work)
    window = (job.range_min, job.range_max)
    gdir = work.sub("guide", stage_key(sdir.url, g.type, pspec.key(), qspec.key(), window))
    shards = read["query_shards"]
    todo = [s["name"] for s in shards if s["name"] not in set(gdir.ls(".parquet"))]
    stats: dict = {"model": g.model, "type": g.type, "folder": gdir.url, "query_shards": len(shards),
                   "reused": len(shards) - len(todo)}
    corpus = (rdir.sub("corpus"), [c["name"] for c in read["corpus_shards"]])
    if not todo:
        return gdir, stats
    if g.type == "crossencoder":
        actors, threads = actor_layout(cpus, [1] * len(todo), g.actors, g.threads_per_actor)
        # pairs are padded to the batch's longest, at most max_length: keep a batch within batch_tokens
        rows = min(g.batch_size, max(1, (g.batch_tokens or 1 << 30) // g.max_length))
        args = (resolved, g.max_length, threads, rows, g.trust_remote_code, sdir, rdir.sub("queries"), corpus, gdir,
                *window)
        list(map_on_actors(ShardCrossScorer, args, actors, threads, job.ray.retries,
                           lambda a, n: a.score_shard.remote(n), todo))
        return gdir, stats

    # bi-encoder: reuse whole-corpus embeddings with this model if they exist, else embed the subset
    pcache, qcache = work.sub("embeddings", pspec.key()), work.sub("embeddings", qspec.key())
    cached = set(pcache.ls(".parquet"))
    if all(f"{c['digest']}.parquet" in cached for c in read["corpus_shards"]):
        texts, pshards = rdir.sub("corpus"), read["corpus_shards"]
        stats["passages"] = "whole corpus (cached)"
    else:
        texts = work.sub("guide-texts", stage_key(sdir.url, window))
        if texts.exists("shards.json"):
            pshards = texts.read_json("shards.json")
        else:
            task = ray.remote(needed_passages).options(num_cpus=1, max_retries=2)
            pshards = ray.get(task.remote((sdir, [s["name"] for s in shards]), corpus, texts, *window,
                                          job.read.shard_rows))
            texts.write_json("shards.json", pshards)
        stats["passages"] = sum(s["rows"] for s in pshards)
    stats["embed"] = run_embed([EmbedPart("passages", pspec, texts, pshards, pcache),
                                EmbedPart("queries", qspec, rdir.sub("queries"), shards, qcache)], cpus, g)
    task = ray.remote(biencoder_scores).options(num_cpus=1, max_retries=3)
    pnames = [f"{s['digest']}.parquet" for s in pshards]
    qdigest = {s["name"]: s["digest"] for s in shards}
    ray.get([task.remote((sdir, n), (qcache, f"{qdigest[n]}.parquet"), (pcache, pnames), (gdir, n), *window)
             for n in todo])
    return gdir, stats
