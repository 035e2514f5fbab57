"""Search stage: every query against every corpus embedding shard, exact inner product (faiss).

One Ray task per query shard streams the corpus embedding shards one at a time, keeps a running
top-K per query (faiss ResultHeap, identical to one flat index over the whole corpus), scores the
query's labelled positives on the way, and writes `search/<key>/<query shard>` (schemas/candidates).
K = range_max + the most positives any query has, so removing positives never leaves the window
short. Only ids and scores are handled; no text is read.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from negprep.paths import Folder
from negprep.schemas import conform
from negprep.stages.embed import load_embeddings


def search_shard(
    query_emb: tuple[Folder, str],
    corpus_emb: tuple[Folder, list[str]],
    qrels: tuple[Folder, str],
    dst: tuple[Folder, str],
    range_max: int,
    threads: int,
) -> dict:
    """Exact top-K search of one query shard; writes its candidates file. Returns counts."""
    import faiss

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    qids, qvec = load_embeddings(*query_emb)
    qindex = {q: i for i, q in enumerate(qids)}
    rel = qrels[0].read_parquet(qrels[1], columns=["query_id", "doc_id"])
    positives: dict[str, list[str]] = {q: [] for q in qids}
    for q, d in zip(rel.column("query_id").to_pylist(), rel.column("doc_id").to_pylist(), strict=True):
        if q in positives:
            positives[q].append(d)
    max_pos = max((len(v) for v in positives.values()), default=0)
    k = range_max + max_pos
    heap = faiss.ResultHeap(len(qids), k, keep_max=True)
    pos_score: dict[tuple[str, str], float] = {}
    want: dict[str, list[tuple[int, str]]] = {}
    for q, docs in positives.items():
        for d in docs:
            want.setdefault(d, []).append((qindex[q], q))
    shard_ids: list[list[str]] = []
    for s, name in enumerate(corpus_emb[1]):
        ids, cvec = load_embeddings(corpus_emb[0], name)
        shard_ids.append(ids)
        if not ids:
            continue
        kk = min(k, len(ids))
        index = faiss.IndexFlatIP(cvec.shape[1])
        index.add(cvec)
        scores, rows = index.search(qvec, kk)
        labels = np.where(rows >= 0, (np.int64(s) << 32) | rows, -1)
        if kk < k:  # a shard smaller than K: pad so the heap sees (nq, k)
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            labels = np.pad(labels, ((0, 0), (0, k - kk)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(scores, dtype=np.float32), np.ascontiguousarray(labels))
        for r, d in enumerate(ids):
            for qi, q in want.get(d, ()):
                pos_score[(q, d)] = float(qvec[qi] @ cvec[r])
    heap.finalize()
    out = {"query_id": [], "candidate_ids": [], "candidate_scores": [], "positive_ids": [], "positive_scores": []}
    for qi, q in enumerate(qids):
        pos = set(positives[q])
        cids, cscores = [], []
        for score, label in zip(heap.D[qi], heap.I[qi], strict=True):
            if label < 0:
                continue
            d = shard_ids[label >> 32][label & 0xFFFFFFFF]
            if d in pos:
                continue
            cids.append(d)
            cscores.append(float(score))
            if len(cids) == range_max:
                break
        found = [d for d in positives[q] if (q, d) in pos_score]
        out["query_id"].append(q)
        out["candidate_ids"].append(cids)
        out["candidate_scores"].append(cscores)
        out["positive_ids"].append(found)
        out["positive_scores"].append([pos_score[(q, d)] for d in found])
    dst[0].write_parquet(dst[1], conform(pa.table(out), "candidates"))
    return {"queries": len(qids), "k": k, "seconds": round(time.perf_counter() - t0, 3)}
