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
import pyarrow as pa

from negprep.paths import Folder, stage_key
from negprep.schemas import conform
from negprep.stages.embed import load_embeddings

log = logging.getLogger(__name__)

QUERIES_PER_CLUSTER_BATCH = 4  # derived k: clusters of ~4 batches' worth of queries each


def cluster_count(n_queries: int, clusters: int | None, batch_size: int | None) -> int:
    """k: the job's `clusters`, else about n_queries / (4 x batch_size), at least 1, at most n_queries.

    A cluster needs at least batch_size distinct queries to fill one batch; four batches' worth
    leaves room for the clashes (shared negatives) that similar queries have.
    """
    if clusters is None:
        clusters = n_queries // (QUERIES_PER_CLUSTER_BATCH * batch_size) if batch_size else 1
    return max(1, min(clusters, n_queries))


def sample_rows(total: int, size: int, seed: int) -> np.ndarray | None:
    """Sorted row numbers of a seeded sample of `size` out of `total`; None when all rows are used."""
    if total <= size:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False))


def train_centroids(
    query_emb: tuple[Folder, list[str]],
    rows: list[int],
    k: int,
    sample: int,
    seed: int,
    iterations: int,
    spherical: bool,
    threads: int,
    dst: tuple[Folder, str],
) -> dict:
    """Fit k centroids on a seeded sample of the query embedding shards; writes them to `dst`.

    Only the sampled rows of each shard are kept in memory, one shard read at a time.
    """
    import faiss

    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    take = sample_rows(sum(rows), sample, seed)
    parts, offset = [], 0
    for name, n in zip(query_emb[1], rows, strict=True):
        _, vec = load_embeddings(query_emb[0], name)
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
        niter=iterations,
        seed=seed % (2**31),
        spherical=spherical,
        max_points_per_centroid=max(256, math.ceil(len(x) / k)),
        verbose=False,
    )
    km.train(x)
    cent = km.centroids.astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(cent.reshape(-1), pa.float32()), cent.shape[1])
    table = pa.table({"id": [str(i) for i in range(k)], "embedding": emb.cast(pa.list_(pa.float32()))})
    dst[0].write_parquet(dst[1], conform(table, "embeddings"))
    return {"trained_on": len(x), "objective": float(km.obj[-1]) if len(km.obj) else None,
            "seconds": round(time.perf_counter() - t0, 3)}


def assign_shard(query_emb: tuple[Folder, str], centroids: tuple[Folder, str], dst: tuple[Folder, str]) -> list[int]:
    """Nearest centroid (L2, the k-means objective) of every query of one shard; returns cluster sizes."""
    import faiss

    faiss.omp_set_num_threads(1)
    qids, qvec = load_embeddings(*query_emb)
    _, cent = load_embeddings(*centroids)
    index = faiss.IndexFlatL2(cent.shape[1])
    index.add(np.ascontiguousarray(cent))
    labels = np.zeros(len(qids), dtype=np.int64)
    if len(qids):
        labels = index.search(np.ascontiguousarray(qvec), 1)[1][:, 0]
    table = pa.table({"query_id": qids, "cluster_id": labels.astype(np.int32)})
    dst[0].write_parquet(dst[1], conform(table, "clusters"))
    return np.bincount(labels, minlength=len(cent)).tolist()


def _node_cpus() -> int:
    """CPUs of the largest live node: a task asking for more would never be scheduled."""
    import ray

    return max((int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n.get("Alive")), default=1)


def run_cluster(
    job, work: Folder, qdir: Folder, query_key: str, query_shards: list[dict], n_queries: int
) -> tuple[Folder, dict]:
    """Train and assign (or reuse); returns the clusters folder and its stats for the manifest.

    Args:
        job: the Job (clusters, batch_size, seed, embed.normalize and the `cluster` section).
        qdir: the query embeddings folder; shards are named `<digest>.parquet`.
        query_key: the query encoder's key, so other embeddings give other clusters.
    """
    import ray

    c = job.cluster
    k = cluster_count(n_queries, job.clusters, job.batch_size)
    sample = min(n_queries, max(c.sample, k))  # k-means needs at least k points
    cdir = work.sub(
        "clusters",
        stage_key(query_key, [s["digest"] for s in query_shards], k, sample, job.seed, c.iterations,
                  job.embed.normalize),
    )
    if cdir.exists("stats.json"):
        return cdir, {**cdir.read_json("stats.json"), "reused": True}
    threads = c.threads or _node_cpus()
    emb = [f"{s['digest']}.parquet" for s in query_shards]
    cent = (cdir, "centroids.parquet")
    train = ray.remote(train_centroids).options(num_cpus=threads, max_retries=2)
    rows = [s["rows"] for s in query_shards]
    trained = ray.get(
        train.remote((qdir, emb), rows, k, sample, job.seed, c.iterations, job.embed.normalize, threads, cent)
    )
    assign = ray.remote(assign_shard).options(num_cpus=1, max_retries=3)
    per_shard = ray.get(
        [assign.remote((qdir, e), cent, (cdir, s["name"])) for e, s in zip(emb, query_shards, strict=True)]
    )
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
    return cdir, {**stats, "reused": False}
