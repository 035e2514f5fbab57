"""Cluster stage: k-means (faiss) over the query embeddings, every query assigned to a cluster.

TAS-Balanced composes each training batch from one cluster of similar queries. One Ray task trains
the centroids on a seeded sample of the query embeddings (all of them when there are few), then
one Ray task per query shard assigns its queries to the nearest centroid, reading the embedding
shard itself as the search stage does. Results sit under `clusters/<key>/`: `centroids.parquet`
(schemas/embeddings.yaml, id = cluster number), one `<query shard>.parquet` per query shard
(schemas/clusters.yaml) and `stats.json` (cluster sizes), written last: a rerun with the same
embeddings and settings reuses them.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from negprep import execution
from negprep.config import Job
from negprep.execution import Resources
from negprep.models.vectors import embedding_table, load_embeddings
from negprep.output.formats import FORMATS
from negprep.paths import File, Files, stage_key
from negprep.results import StageOutput
from negprep.schemas import conform
from negprep.stages.base import Run, Stage

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the clusters files change shape (2: second cluster and margin)
QUERIES_PER_CLUSTER_BATCH = 4  # derived k: clusters of at least ~4 batches' worth of queries ...
ROWS_PER_CLUSTER_BATCH = 8  # ... and of ~8 batches' worth of rows


def cluster_count(n_queries: int, clusters: int | None, batch_size: int | None, rows: int | None = None) -> int:
    """k: the job's `clusters`, else the smaller of n_queries / (4 x batch_size) and
    rows / (8 x batch_size), at least 1, at most n_queries.

    A batch takes `batch_size` rows of distinct queries, so a cluster needs several batches' worth
    of queries (four leave room for the clashes, shared negatives, that similar queries have). And
    what is left at a cluster's end (half a batch on average) goes to mixed batches, so a cluster
    needs enough rows for that end to stay small: with eight batches of rows, ~6% of them. `rows`
    is the expected output rows (positives x num_negatives for triplets); with one negative per
    row it is what bounds k.
    """
    if clusters is None:
        clusters = n_queries // (QUERIES_PER_CLUSTER_BATCH * batch_size) if batch_size else 1
        if batch_size and rows is not None:
            clusters = min(clusters, rows // (ROWS_PER_CLUSTER_BATCH * batch_size))
    return max(1, min(clusters, n_queries))


def sample_rows(total: int, size: int, seed: int) -> np.ndarray | None:
    """Sorted row numbers of a seeded sample of `size` out of `total`; None when all rows are used."""
    if total <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def train_centroids(query_emb: Files, rows: list[int], k: int, job: Job, threads: int, dst: File) -> dict:
    """Fit k centroids on a seeded sample (`cluster.sample`) of the query embedding files; writes
    them to `dst` (Ray task). Only the sampled rows of each file are kept, one file read at a time."""
    import faiss

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    sample = min(sum(rows), max(job.cluster.sample, k))  # k-means needs at least k points
    take = sample_rows(sum(rows), sample, job.seed)
    parts, offset = [], 0
    for f, n in zip(query_emb, rows, strict=True):
        _, vec = load_embeddings(f)
        if take is not None:
            local = take[(take >= offset) & (take < offset + n)] - offset
            vec = vec[local]
        parts.append(vec)
        offset += n
    x = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    # the sample is already ours (seeded); stop faiss from subsampling it again
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=job.cluster.iterations,
        seed=job.seed % (2**31),
        spherical=job.embed.normalize,
        max_points_per_centroid=max(256, math.ceil(len(x) / k)),
        verbose=False,
    )
    km.train(x)
    cent = km.centroids.astype(np.float32)
    dst.write_parquet(embedding_table([str(i) for i in range(k)], cent))
    return {"trained_on": len(x), "objective": float(km.obj[-1]) if len(km.obj) else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def assign_shard(query_emb: File, centroids: File, dst: File) -> list[int]:
    """Nearest centroid (L2, the k-means objective) of every query of one shard; returns cluster sizes."""
    import faiss
    import pyarrow as pa

    faiss.omp_set_num_threads(1)
    qids, qvec = load_embeddings(query_emb)
    _, cent = load_embeddings(centroids)
    index = faiss.IndexFlatL2(cent.shape[1])
    index.add(np.ascontiguousarray(cent))
    dist, labels = np.zeros((len(qids), 2), dtype=np.float32), np.full((len(qids), 2), -1, dtype=np.int64)
    if len(qids):
        dist, labels = index.search(np.ascontiguousarray(qvec), min(2, len(cent)))
        if labels.shape[1] == 1:  # one centroid: no second choice
            dist, labels = np.c_[dist, dist], np.c_[labels, np.full(len(qids), -1)]
    table = pa.table({"query_id": qids, "cluster_id": labels[:, 0].astype(np.int32),
                      "second_cluster_id": labels[:, 1].astype(np.int32),
                      "cluster_margin": (dist[:, 1] - dist[:, 0]).astype(np.float32)})
    dst.write_parquet(conform(table, "clusters"))
    return np.bincount(labels[:, 0], minlength=len(cent)).tolist()


class Cluster(Stage):
    """Train and assign, or reuse: the result is the clusters folder and its stats for the manifest.
    The key covers the query embeddings, k, the sample and the k-means settings."""

    name = "cluster"

    def enabled(self, job: Job) -> bool:
        return bool(job.clusters or job.batch_size)

    def resources(self, run: Run) -> dict[str, Resources]:
        threads = run.job.cluster.threads or execution.largest_node_cpus()
        return {"train": Resources(cpus=threads), "assign": Resources(cpus=1)}

    def run(self, run: Run, force: bool) -> None:
        job, c, shards, queries = run.job, run.job.cluster, run.read.query_shards, run.embed.queries
        rows = run.read.positives * FORMATS[job.format].rows_per_pair(job.num_negatives)
        k = cluster_count(run.read.queries, job.clusters, job.batch_size, rows)
        sample = min(run.read.queries, max(c.sample, k))
        cdir = run.work.sub("clusters", stage_key(FORMAT, queries.spec.key(), [s.digest for s in shards], k, sample,
                                                  job.seed, c.iterations, job.embed.normalize))
        if force:
            cdir.rm("", recursive=True)
        if cdir.exists("stats.json"):
            run.cluster = StageOutput(cdir, {**cdir.read_json("stats.json"), "reused": True})
            return
        res = self.resources(run)
        threads = int(res["train"].cpus)
        cent = cdir.file("centroids.parquet")
        trained = run.ex.call(train_centroids, queries.files(shards), [s.rows for s in shards], k, job, threads, cent,
                              res=res["train"])
        per_shard = run.ex.map(assign_shard, [(queries.file(s), cent, cdir.file(s.name)) for s in shards],
                               res["assign"], desc="cluster")
        sizes = np.sum(np.array(per_shard, dtype=np.int64), axis=0) if per_shard else np.zeros(k, dtype=np.int64)
        stats = {
            "k": k,
            "derived_k": job.clusters is None,
            "trained_on": trained["trained_on"],
            "iterations": c.iterations,
            "objective": trained["objective"],
            "sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
            "empty_clusters": int((sizes == 0).sum()),
            "queries": int(sizes.sum()),
        }
        log.info("clusters: k=%d sizes min %d median %.0f max %d", k, stats["sizes"]["min"], stats["sizes"]["median"],
                 stats["sizes"]["max"])
        cdir.write_json("stats.json", stats)
        run.cluster = StageOutput(cdir, {**stats, "reused": False})
