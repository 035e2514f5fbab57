"""Index shards: one slice of the corpus embeddings in a Ray actor, answering exact or approximate top-k.

The search stage cuts the corpus embedding files into index shards sized by `search.shard_mb`
(`plan_shards`, `bytes_per_row`). An `IndexShard` loads its rows once and answers top-k calls.
Scores are recomputed exactly (float64 dot product, rounded to float32) and ties are broken by
passage id (`top_k`), so merging the shards' top-k gives the candidates of one exact index over
the whole corpus. `ivf` and `hnsw` build an approximate faiss index per shard.

On `search.device: cuda` a flat shard finds its neighbours with a half-precision matmul on the
GPU (negprep.index.gpu_knn) instead of faiss, with a wider (proven) rounding bound; the rescoring,
ties and bound check are the same, so the candidates are those of CPU flat search. The rescoring
runs on the actor's `threads` (on CUDA the CPUs it asks Ray for), with the same result on any
number of them.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from negprep.config import SearchConfig
from negprep.models.vectors import table_vectors
from negprep.paths import Folder

log = logging.getLogger(__name__)

SLACK = 16  # extra neighbours fetched per shard before exact rescoring, so rounding never cuts a near-tie
ID_BYTES = 200  # memory per passage for its id: a str in an object array plus the id -> row dict entry
U32 = 2.0**-24  # float32 unit roundoff: a float32 dot product of d terms is off by at most ~d * U32 * |q| |c|
RESCORE_ELEMENTS = 4_000_000  # float64 products of one rescoring step, over all threads (bounded temporaries)
RESCORE_MIN = 1 << 20  # ... and of one thread's step at least, so the steps are not tiny


@dataclass(frozen=True)
class RowSpan:
    """Rows [start, stop) of one corpus embedding file: an index shard is a tuple of spans."""

    name: str
    start: int
    stop: int


def bytes_per_row(dim: int, cfg: SearchConfig) -> int:
    """Memory an index shard needs per passage; `search.shard_mb` is divided by it."""
    vec = 4 * dim
    # ivf/hnsw keep their own copy of the vectors beside the matrix used for exact rescoring
    extra = {"flat": 0, "ivf": vec + 8, "hnsw": vec + 10 * cfg.hnsw_m}[cfg.index]
    return vec + ID_BYTES + extra


def plan_shards(files: list[tuple[str, int]], rows_per_shard: int) -> list[tuple[RowSpan, ...]]:
    """Cut (file, rows) into consecutive index shards of at most `rows_per_shard` rows each,
    splitting files where needed, sizes balanced (the last shard is not a small remainder)."""
    total = sum(rows for _, rows in files)
    if total == 0:
        return []
    size = math.ceil(total / math.ceil(total / rows_per_shard))
    shards: list[tuple[RowSpan, ...]] = []
    current: list[RowSpan] = []
    room = size
    for name, rows in files:
        start = 0
        while start < rows:
            take = min(room, rows - start)
            current.append(RowSpan(name, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(tuple(current))
                current, room = [], size
    if current:
        shards.append(tuple(current))
    return shards


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best entries of (rows, m) scores/ids by (score desc, id asc).

    Pads with -inf / None when a row has fewer than k. Equal scores are ordered by id, so the
    result does not depend on the order in which shards or batches delivered them.
    """
    b, m = scores.shape
    if m < k:
        scores = np.concatenate([scores, np.full((b, k - m), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((b, k - m), None, dtype=object)], axis=1)
        m = k
    if k == 0:
        return scores[:, :0], ids[:, :0]
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    edge = min(k + 1, m)
    tied = ((ranked[:, 1:edge] == ranked[:, : edge - 1]) & np.isfinite(ranked[:, 1:edge])).any(axis=1)
    top = order[:, :k].copy()
    for r in np.nonzero(tied)[0]:  # rare: ties inside or at the edge of the top k
        top[r] = _by_score_then_id(scores[r], ids[r], ranked[r, k - 1])[:k]
    return np.take_along_axis(scores, top, axis=1), np.take_along_axis(ids, top, axis=1)


def _by_score_then_id(scores: np.ndarray, ids: np.ndarray, floor: float) -> list[int]:
    cand = np.nonzero(scores >= floor)[0]
    return sorted(cand.tolist(), key=lambda j: (-scores[j], ids[j] or ""))


def _dot64(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise dot products in float64, rounded to float32: the same value for a (query, passage)
    pair whatever batch, shard or thread computed it (pairwise sum over a fixed-length axis). The
    float32 `v` is widened inside the multiplication (exact), without a float64 copy of it."""
    return np.multiply(q.astype(np.float64), v, dtype=np.float64).sum(axis=-1).astype(np.float32)


class IndexShard:
    """Ray actor: one index shard in memory (exact matrix, plus an ivf/hnsw index if asked for).

    A restarted actor (after its worker died) rebuilds itself from storage in `__init__`.
    `threads`: faiss's threads on the CPU, and on every device the threads of the exact rescoring.
    """

    def __init__(self, folder: Folder, pieces: tuple[RowSpan, ...], cfg: SearchConfig, threads: int,
                 device: str = "cpu"):
        # flat on CUDA: the exact path's neighbours come from a half-precision matmul on the GPU
        # (negprep.index.gpu_knn) instead of faiss; everything after (rescoring, ties, bound) is shared
        gpu = cfg.index == "flat" and device == "cuda"
        if gpu:
            _check_gpu_assigned()
        else:
            import faiss

            faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        ids: list[str] = []
        vecs = None
        for p in pieces:
            got, mat = table_vectors(folder.read_parquet(p.name).slice(p.start, p.stop - p.start))
            if vecs is None:  # filled piece by piece: the peak is the matrix plus one file, not twice the shard
                vecs = np.empty((sum(x.stop - x.start for x in pieces), mat.shape[1]), dtype=np.float32)
            vecs[len(ids) : len(ids) + len(got)] = mat
            ids += got
        self.vecs = vecs  # float32 on the host: exact rescoring and the positives' scores
        self.ids = np.array(ids, dtype=object)
        self.row = {d: r for r, d in enumerate(ids)}
        self.dim = self.vecs.shape[1]
        self.max_norm = float(np.sqrt(np.einsum("ij,ij->i", self.vecs, self.vecs).max())) * 1.001
        self.cfg = cfg
        self.threads = max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        self.index = _build_index(self.vecs, cfg) if cfg.index != "flat" else None
        self.gpu = None
        if gpu:
            from negprep.index.gpu_knn import TorchKnn

            self.gpu = TorchKnn(self.vecs, "cuda", threads=threads)
        on = ""
        if self.gpu:
            free = "" if self.gpu.free_mb is None else f" of {self.gpu.free_mb:.0f} MB free"
            on = (f" on {self.gpu.device} ({self.gpu.dtype}, score buffer {self.gpu.score_mb:.0f} MB{free}: "
                  f"{self.gpu.batch_rows(SLACK)} queries per matmul at most)")
        log.info("index shard: %d rows, %s%s, %d rescoring thread(s), built in %.1f s", len(ids), cfg.index, on,
                 self.threads, time.perf_counter() - t0)

    def search(
        self, q: np.ndarray, k: int, positives: list[tuple[int, str]], exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, float]]]:
        """Top k of this shard per query row as (scores, ids), by (score desc, id asc), and the
        scores of the (row, passage id) positives that live in this shard."""
        if self.index is None or exact:
            scores, ids = self._exact(q, k)
        else:
            scores, ids = self._approximate(q, k)
        found = [(row, d, r) for row, d in positives if (r := self.row.get(d)) is not None]
        pos = _dot64(q[[f[0] for f in found]], self.vecs[[f[2] for f in found]]) if found else []
        return scores, ids, [(row, d, float(s)) for (row, d, _), s in zip(found, pos, strict=True)]

    def _rescore(self, q: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of the fetched `rows` (-1: none) per query, and their ids. Steps of queries
        (bounded float64 temporaries) on `threads` threads: numpy releases the GIL in the gather,
        the products and the sums, and each (query, row) pair is computed the same way in any step,
        so the result does not depend on the threads."""
        out = np.full(rows.shape, -np.inf, dtype=np.float32)
        per_query = max(1, rows.shape[1] * self.dim)
        step = max(RESCORE_MIN, RESCORE_ELEMENTS // self.threads) // per_query
        step = max(1, min(step, -(-len(q) // self.threads)))  # every thread gets some

        def part(i: int) -> None:
            r = rows[i : i + step]
            s = _dot64(q[i : i + step, None, :], self.vecs[np.maximum(r, 0)])
            out[i : i + step] = np.where(r >= 0, s, -np.inf)

        starts = range(0, len(q), step)
        if self.threads > 1 and len(starts) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="rescore")
            for _ in self._pool.map(part, starts):  # raises a step's exception, if any
                pass
        else:
            for i in starts:
                part(i)
        return out, np.where(rows >= 0, self.ids[np.maximum(rows, 0)], None)

    def _knn(self, q: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The `want` rows of highest approximate score per query: (scores, rows, bound), where
        bound (float64, per query) is the most an approximate score can differ from the exact one."""
        if self.gpu is not None:
            scores, rows = self.gpu.knn(q, want)
            return scores, rows, self.gpu.bound(q, self.max_norm)
        import faiss

        scores, rows = faiss.knn(np.ascontiguousarray(q), self.vecs, want, metric=faiss.METRIC_INNER_PRODUCT)
        # faiss multiplies float32 in float32: d products summed, each off by at most ~d * U32
        return scores, rows, self.dim * U32 * 1.01 * np.linalg.norm(q.astype(np.float64), axis=1) * self.max_norm

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.ids)
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), None, dtype=object)
        todo = np.arange(len(q))
        want = min(n, k + SLACK)
        while len(todo):
            approx, rows, eps = self._knn(q[todo], want)
            s, ids = top_k(*self._rescore(q[todo], rows), k)
            if want >= n:
                done = np.ones(len(todo), dtype=bool)
            else:
                # a row not returned scores at most the last approximate score plus the rounding
                # bound; if that could still reach the k-th exact score (or tie it), fetch more
                done = approx[:, -1].astype(np.float64) + eps < np.nextafter(s[:, k - 1], -np.inf)
            out_s[todo[done]], out_i[todo[done]] = s[done], ids[done]
            todo, want = todo[~done], min(n, want * 4)
        return out_s, out_i

    def _approximate(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        want = min(len(self.ids), k + SLACK)
        if self.cfg.index == "hnsw":
            self.index.hnsw.efSearch = max(self.cfg.hnsw_ef_search, want)
        _, rows = self.index.search(np.ascontiguousarray(q), want)
        return top_k(*self._rescore(q, rows), k)


def _check_gpu_assigned() -> None:
    """An index shard on CUDA must hold a GPU from Ray (it then sees it as cuda:0)."""
    from negprep import execution
    from negprep.errors import ConfigError
    from negprep.models import devices

    if not devices.cuda_on_cpu() and not execution.assigned_gpus():
        raise ConfigError("search.device: cuda, but Ray assigned this index shard actor no GPU "
                          "(it must be started with num_gpus; use search.device: cpu)")


def _build_index(vecs: np.ndarray, cfg: SearchConfig) -> Any:
    import faiss

    n, d = vecs.shape
    if cfg.index == "ivf":
        # faiss wants >= 39 training points per list; training uses <= 64 points per list
        nlist = max(1, min(cfg.ivf_nlist or int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.max_points_per_centroid = 64
        index.train(vecs)
        index.add(vecs)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
        return index
    index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.hnsw_ef_construction
    index.add(vecs)
    return index
