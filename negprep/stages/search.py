"""Search stage: every query against the whole corpus, on index shards held by Ray actors.

The corpus embedding files are cut into index shards sized by `search.shard_mb` (vectors, ids and
index structures of one actor), or on `search.device: cuda` by `search.gpu_shard_mb` (the float16
vectors one GPU holds) and spread over all the cluster's GPUs, one index shard actor per GPU.
Each `IndexShard` actor (negprep.index.faiss_shard) loads its rows from storage once and answers top-k
calls; one coordinator task per query shard fans its queries out, in batches of
`search.query_batch`, to every index shard and merges the per-shard top-k. Scores are recomputed
exactly (float64 dot product, rounded to float32) and ties are broken by passage id, so with
`index: flat` the candidates are those of one exact index over the whole corpus, whatever the
number of index shards, workers or query batches, and on a GPU or not (the search key does not
name the device). `ivf` and `hnsw` build an approximate index per
shard; their recall against exact search is measured on a sample of queries.

When the index shards do not all fit in the cluster's memory at once they run in groups: each
group writes its per-query top-k (`<group key>/<query shard>`, schemas/search_partial.yaml) and a
final task per query shard merges the groups. Output: `search/<key>/<query shard>`
(schemas/candidates.yaml); K = range_max + the most positives a query of the shard has, so
removing positives never leaves the window short. Only ids and vectors are handled; no text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from negprep import execution
from negprep.config import SearchConfig
from negprep.errors import ConfigError
from negprep.execution import Executor, Resources
from negprep.index.faiss_shard import IndexShard, RowSpan, top_k
from negprep.index.placement import layout, placement, search_resources
from negprep.input.shards import Shard
from negprep.models.vectors import table_vectors
from negprep.paths import File, Folder, stage_key
from negprep.results import StageOutput
from negprep.schemas import conform
from negprep.stages.base import Run, Stage

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# One query shard: fan out, merge, write


def _positives(qrels: File, qids: list[str]) -> list[list[str]]:
    rel = qrels.read_parquet(columns=["query_id", "doc_id"])
    rel = rel.filter(pc.is_in(rel.column("query_id"), value_set=pa.array(qids, pa.string())))
    where = {q: i for i, q in enumerate(qids)}
    out: list[list[str]] = [[] for _ in qids]
    for q, d in zip(rel.column("query_id").to_pylist(), rel.column("doc_id").to_pylist(), strict=True):
        out[where[q]].append(d)
    return out


def _removed(qrels: File, exclusions: File | None, qids: list[str]) -> tuple[list[list[str]], list[list[str]], int]:
    """Per query its positives and its exclusions (the positives of queries with the same normalised
    text), and K: range_max must still be left after removing both."""
    positives = _positives(qrels, qids)
    excluded = _positives(exclusions, qids) if exclusions else [[] for _ in qids]
    most = max((len(p) + len(e) for p, e in zip(positives, excluded, strict=True)), default=0)
    return positives, excluded, most


def _fan_out(
    actors: list, qvec: np.ndarray, k: int, positives: list[list[str]], batch: int, exact: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[tuple[int, str], float]]:
    """Every query row against every index shard: merged (scores, ids) (rows x k) and positive scores.

    Two batches are in flight so the shards work on the next one while this task merges."""
    nq = len(qvec)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    ids = np.full((nq, k), None, dtype=object)
    found: dict[tuple[int, str], float] = {}
    if not actors or nq == 0:
        return scores, ids, found

    def submit(b0: int) -> tuple[int, list]:
        ref = execution.put(np.ascontiguousarray(qvec[b0 : b0 + batch]))
        pairs = [(i - b0, d) for i in range(b0, min(b0 + batch, nq)) for d in positives[i]]
        return b0, execution.submit(actors, "search", ref, k, pairs, exact)

    def collect(b0: int, futures: list) -> None:
        parts = execution.get(futures)
        s, i = top_k(np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1), k)
        scores[b0 : b0 + len(s)], ids[b0 : b0 + len(s)] = s, i
        for p in parts:
            for row, d, sc in p[2]:
                found[(b0 + row, d)] = sc

    pending: deque = deque()
    for b0 in range(0, nq, batch):
        pending.append(submit(b0))
        if len(pending) > 1:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    return scores, ids, found


def _candidates(
    qids: list[str],
    positives: list[list[str]],
    scores: np.ndarray,
    ids: np.ndarray,
    found: dict[tuple[int, str], float],
    range_max: int,
    excluded: list[list[str]],
) -> pa.Table:
    out: dict[str, list] = {c: [] for c in ("query_id", "candidate_ids", "candidate_scores")}
    out |= {"positive_ids": [], "positive_scores": [], "excluded_ids": []}
    for qi, q in enumerate(qids):
        pos = set(positives[qi]) | set(excluded[qi])
        cids, cscores = [], []
        for s, d in zip(scores[qi], ids[qi], strict=True):
            if d is None or d in pos:
                continue
            cids.append(d)
            cscores.append(float(s))
            if len(cids) == range_max:
                break
        have = [d for d in positives[qi] if (qi, d) in found]
        out["query_id"].append(q)
        out["candidate_ids"].append(cids)
        out["candidate_scores"].append(cscores)
        out["positive_ids"].append(have)
        out["positive_scores"].append([found[(qi, d)] for d in have])
        out["excluded_ids"].append(excluded[qi])
    return conform(pa.table(out), "candidates")


def _sample_rows(qids: list[str], n: int) -> np.ndarray:
    """A deterministic sample of n query rows (smallest crc32 of the id), in row order."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.argsort([zlib.crc32(q.encode()) for q in qids], kind="stable")[:n])


def _recall(approx: np.ndarray, exact: np.ndarray) -> dict[str, int]:
    hits = total = 0
    for a, e in zip(approx, exact, strict=True):
        want = {d for d in e if d is not None}
        total += len(want)
        hits += len(want & {d for d in a if d is not None})
    return {"recall_queries": len(exact), "recall_hits": hits, "recall_total": total}


def _lists(ids: np.ndarray, scores: np.ndarray) -> tuple[list[list[str]], list[list[float]]]:
    keep = [[j for j, d in enumerate(row) if d is not None] for row in ids]
    return (
        [[ids[r, j] for j in js] for r, js in enumerate(keep)],
        [[float(scores[r, j]) for j in js] for r, js in enumerate(keep)],
    )


def _padded(id_lists: list[list[str]], score_lists: list[list[float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.full((len(id_lists), k), -np.inf, dtype=np.float32)
    ids = np.full((len(id_lists), k), None, dtype=object)
    for r, (d, s) in enumerate(zip(id_lists, score_lists, strict=True)):
        scores[r, : len(s)], ids[r, : len(d)] = s, d
    return scores, ids


@dataclass(frozen=True)
class QueryShardSearch:
    """One query shard's search on a group of index shards. `final`: the group is the whole
    corpus, write candidates; else write the group's top-k for a later merge. `recall_queries` > 0
    also searches that many sampled queries exactly."""

    query_emb: File
    qrels: File
    exclusions: File | None
    dst: File
    range_max: int
    query_batch: int
    recall_queries: int
    final: bool


def search_query_shard(actors: list, task: QueryShardSearch) -> dict:
    """Search one query shard on a group of index shards (Ray task)."""
    t0 = time.perf_counter()
    range_max, recall_queries, dst = task.range_max, task.recall_queries, task.dst
    qids, qvec = table_vectors(task.query_emb.read_parquet())
    positives, excluded, most = _removed(task.qrels, task.exclusions, qids)
    k = range_max + most
    scores, ids, found = _fan_out(actors, qvec, k, positives, task.query_batch)
    sample = _sample_rows(qids, recall_queries)
    exact = None
    if len(sample):
        exact = _fan_out(actors, qvec[sample], k, [[] for _ in sample], task.query_batch, exact=True)[:2]
    stats: dict[str, Any] = {"queries": len(qids), "k": k}
    if task.final:
        if exact is not None:
            stats |= _recall(ids[sample], exact[1])
            dst.folder.write_json(dst.name + ".recall.json", stats)  # before the candidates: their file is the marker
        dst.write_parquet(_candidates(qids, positives, scores, ids, found, range_max, excluded))
    else:
        cols: dict[str, list] = {"query_id": qids}
        cols["ids"], cols["scores"] = _lists(ids, scores)
        have = [[d for d in positives[qi] if (qi, d) in found] for qi in range(len(qids))]
        cols["positive_ids"] = have
        cols["positive_scores"] = [[found[(qi, d)] for d in h] for qi, h in enumerate(have)]
        ex_ids: list[list[str]] = [[] for _ in qids]
        ex_scores: list[list[float]] = [[] for _ in qids]
        if exact is not None:
            for j, (d, s) in enumerate(zip(*_lists(exact[1], exact[0]), strict=True)):
                ex_ids[sample[j]], ex_scores[sample[j]] = d, s
        cols["exact_ids"], cols["exact_scores"] = ex_ids, ex_scores
        dst.write_parquet(conform(pa.table(cols), "search_partial"))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def merge_groups(groups: list[Folder], name: str, inputs: SearchInputs, dst: Folder, range_max: int,  # noqa: PLR0913
                 recall: bool) -> dict:
    """Merge the per-group top-k of one query shard into its candidates file (Ray task)."""
    t0 = time.perf_counter()
    parts = [g.read_parquet(name) for g in groups]
    qids = parts[0].column("query_id").to_pylist()
    positives, excluded, most = _removed(inputs.qrels, inputs.exclusions, qids)
    k = range_max + most
    merged, exact, found = [], [], {}
    for t in parts:
        merged.append(_padded(t.column("ids").to_pylist(), t.column("scores").to_pylist(), k))
        exact.append(_padded(t.column("exact_ids").to_pylist(), t.column("exact_scores").to_pylist(), k))
        for qi, (ds, ss) in enumerate(
            zip(t.column("positive_ids").to_pylist(), t.column("positive_scores").to_pylist(), strict=True)
        ):
            found.update({(qi, d): s for d, s in zip(ds, ss, strict=True)})
    scores, ids = top_k(np.concatenate([m[0] for m in merged], 1), np.concatenate([m[1] for m in merged], 1), k)
    stats: dict[str, Any] = {"queries": len(qids), "k": k}
    if recall:
        sample = np.array([i for i, e in enumerate(parts[0].column("exact_ids").to_pylist()) if e], dtype=np.int64)
        ex = top_k(np.concatenate([e[0] for e in exact], 1), np.concatenate([e[1] for e in exact], 1), k)[1]
        stats |= _recall(ids[sample], ex[sample])
        dst.write_json(name + ".recall.json", stats)
    dst.write_parquet(name, _candidates(qids, positives, scores, ids, found, range_max, excluded))
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


# ---------------------------------------------------------------------------------------------
# The stage


def search_settings(cfg: SearchConfig) -> dict:
    """The settings that change the candidates (part of the search key). Exact search depends on
    none of them: sharding and threads only change how fast it runs."""
    if cfg.index == "flat":
        return {"index": "flat"}
    own = ("ivf_nlist", "ivf_nprobe") if cfg.index == "ivf" else ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search")
    return {"index": cfg.index, "shard_mb": cfg.shard_mb, "recall_sample": cfg.recall_sample} | {
        k: getattr(cfg, k) for k in own
    }


def search_key(run: Run) -> str:
    """What the candidates depend on: both encoders, the embedded shards, the positives, the window
    and the settings that change the candidates."""
    read, emb = run.read, run.embed
    corpus_files = [s.embedding for s in read.corpus_shards]
    query_shards = [s.to_dict() for s in read.query_shards]
    return stage_key(emb.passages.spec.key(), emb.queries.spec.key(), corpus_files, query_shards, read.folder.url,
                     run.job.range_max, search_settings(run.job.search))


@dataclass(frozen=True)
class SearchInputs:
    """What the search reads: corpus and query embedding files (named by shard digest) and the positives."""

    passages: Folder
    corpus_shards: tuple[Shard, ...]
    queries: Folder
    query_shards: tuple[Shard, ...]
    qrels: File
    exclusions: File | None = None  # query_id, doc_id: removed from the candidates like positives


def search_all(ex: Executor, cfg: SearchConfig, inputs: SearchInputs, sdir: Folder, range_max: int,  # noqa: PLR0913
               force: bool = False, device: str = "cpu", gpus: float = 0.0) -> dict:
    """Search every query shard not yet in `sdir` (all of them with `force`) on the resolved
    `device` (`gpus`: the cluster's); returns the stage's stats for the manifest. Only file names,
    counts and futures pass through the driver."""
    t0 = time.perf_counter()
    if force:
        sdir.rm("", recursive=True)
    done = set(sdir.ls(".parquet"))
    todo = [s for s in inputs.query_shards if s.name not in done]
    shards, need = layout(cfg, inputs.passages, inputs.corpus_shards, device, gpus)
    stats: dict[str, Any] = {
        "index": cfg.index,
        "device": device,
        "index_shards": len(shards),
        "rows_per_index_shard": max((sum(p.stop - p.start for p in s) for s in shards), default=0),
        "index_shard_mb": round(need / 2**20, 1),
        "query_shards": len(inputs.query_shards),
        "reused": len(inputs.query_shards) - len(todo),
    }
    if todo:
        stats |= _search(ex, cfg, inputs, todo, shards, need, sdir, range_max, device)
    if cfg.index != "flat":
        hits = total = n = 0
        for s in inputs.query_shards:
            if sdir.exists(s.name + ".recall.json"):
                r = sdir.read_json(s.name + ".recall.json")
                hits, total, n = hits + r["recall_hits"], total + r["recall_total"], n + r["recall_queries"]
        stats["recall"] = {"queries": n, "recall_at_k": round(hits / total, 4) if total else None}
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats


def _search(ex: Executor, cfg: SearchConfig, inputs: SearchInputs, todo: list[Shard],  # noqa: PLR0913
            shards: list[tuple[RowSpan, ...]], need: int, sdir: Folder, range_max: int, device: str = "cpu") -> dict:
    """Search the `todo` query shards, the index shards in groups that fit the cluster's memory
    (and on CUDA its GPUs: one index shard per GPU)."""
    gpu = device == "cuda"
    size, threads, cpus = placement(cfg, len(shards), need, device)
    if shards and size == 0:
        if gpu and not any(c > 0 for c, _, _ in execution.gpu_node_cpus()):
            raise ConfigError("search.device: cuda, but no GPU node offers Ray CPUs (an index shard actor needs "
                              "some for its exact rescoring; use search.device: cpu)")
        setting, where = ("search.gpu_shard_mb", "GPU node") if gpu else ("search.shard_mb", "node")
        raise ConfigError(
            f"{setting}: an index shard needs {need >> 20} MB of memory, more than any {where} offers Ray; "
            f"lower {setting}"
        )
    size = size or 1
    # an empty corpus is one group without actors: every query gets no candidates
    groups = [shards[i : i + size] for i in range(0, len(shards), size)] or [[]]
    log.info("search: %d index shard(s) (~%.0f MB each), %d group(s), %d query shard(s) to do, %d thread(s) "
             "and %g CPU(s) per index shard", len(shards), need / 2**20, len(groups), len(todo), threads, cpus)
    total_q = max(1, sum(s.rows for s in inputs.query_shards))
    approx = cfg.index != "flat"
    sample = {s.name: min(s.rows, math.ceil(cfg.recall_sample * s.rows / total_q)) if approx else 0 for s in todo}
    res = search_resources(need, 1.0 if gpu else 0.0, cpus)
    single = len(groups) == 1
    gdirs = [sdir.sub("group-" + _pieces_key(g)) for g in groups]
    limit = max(2, size)
    for group, gdir in zip(groups, gdirs, strict=True):
        left = todo if single else [s for s in todo if not gdir.exists(s.name)]
        if not left:
            continue
        args = [(inputs.passages, pieces, cfg, threads, device) for pieces in group]
        with ex.actors(IndexShard, args, res["index_shard"]) as actors:
            out = sdir if single else gdir
            calls = [(actors, QueryShardSearch(inputs.queries.file(s.embedding), inputs.qrels, inputs.exclusions,
                                               out.file(s.name), range_max, cfg.query_batch, sample[s.name], single))
                     for s in left]
            ex.map(search_query_shard, calls, res["coordinator"], desc="search", limit=limit)
    if not single:
        calls = [(gdirs, s.name, inputs, sdir, range_max, approx) for s in todo]
        ex.map(merge_groups, calls, res["merge"], desc="merge", limit=limit)
        for g in gdirs:
            g.rm("", recursive=True)
    return {"groups": len(groups), "threads_per_index_shard": threads} | (
        {"gpus_per_index_shard": 1.0, "cpus_per_index_shard": cpus} if gpu else {})


class Search(Stage):
    name = "search"

    @staticmethod
    def inputs(run: Run) -> SearchInputs:
        read, emb = run.read, run.embed
        return SearchInputs(emb.passages.folder, read.corpus_shards, emb.queries.folder, read.query_shards, read.qrels,
                            read.exclusions)

    def resources(self, run: Run) -> dict[str, Resources]:
        device = run.devices.get("search", "cpu")
        inputs = self.inputs(run)
        shards, need = layout(run.job.search, inputs.passages, inputs.corpus_shards, device, run.gpus)
        cpus = placement(run.job.search, len(shards), need, device)[2]
        return search_resources(need, 1.0 if device == "cuda" else 0.0, cpus)

    def run(self, run: Run, force: bool) -> None:
        # the key does not name the device: GPU flat search gives exactly the CPU's candidates
        sdir = run.work.sub("search", search_key(run))
        run.search = StageOutput(sdir, search_all(run.ex, run.job.search, self.inputs(run), sdir, run.job.range_max,
                                                  force, run.devices.get("search", "cpu"), run.gpus))


def _pieces_key(group: list[tuple[RowSpan, ...]]) -> str:
    ident = [[(p.name, p.start, p.stop) for p in shard] for shard in group]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
