"""Flat nearest-neighbour search on a GPU (torch): one index shard's passages in half precision.

`TorchKnn` holds the passage matrix of one index shard on the device in float16 and answers
`knn(q, want)` -> (approximate scores, rows) by matmul and `torch.topk`, queries in batches whose
score matrix (and top-k) fits a score buffer: on CUDA a share of the GPU's free memory once the
passages are on it (`score_budget`, `queries_per_matmul`), on CPU tensors a fixed `SCORE_MB`. The scores
are approximate; `bound(q)` gives, per query, a proven bound on |approximate - exact| for every
passage, so the caller (negprep.index.faiss_shard.IndexShard) can rescore the returned rows exactly and know
when a row that was not returned could still reach its k-th exact score (then it fetches more).
That is how GPU flat search gives exactly the candidates of CPU flat search.

Precision by device:

- CUDA: float16 inputs, float32 accumulation and a float32 score matrix (`torch.mm(...,
  out_dtype=torch.float32)`; on a torch without it, a float16 score matrix, with its rounding in
  the bound). Reduced-precision (float16) split-K reductions are switched off in the actor.
- CPU tensors (`NEGPREP_CUDA_ON_CPU=1`, the test switch): torch multiplies float16 on the CPU too
  (x86 with AVX-512 FP16/AMX, else a slower reference kernel), accumulating in float32 but
  returning a float16 score matrix; the bound then includes that last rounding. If a build has no
  float16 matmul on the CPU, the matrix is kept in float32 and the bound is the float32 one
  (`TorchKnn.dtype` says which).

Imports only numpy, torch and the standard library (and negprep.models.devices), so it loads where Ray,
faiss and polars are not installed.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from negprep.models import devices

log = logging.getLogger(__name__)

SCORE_MB = 512  # CPU tensors (the test switch): memory for one query batch's score matrix (and its top-k)
# CUDA: the score buffer is SCORE_FRACTION of the GPU's free memory once the passages are on it (the
# rest for topk's own workspace, cuBLAS and anything else sharing the GPU), clamped to
# [SCORE_MIN, SCORE_MAX]; the ceiling is also 2^31 float32 scores, the most a batch holds anyway
SCORE_FRACTION = 0.5
SCORE_MIN = 256 << 20
SCORE_MAX = 8 << 30
MAX_ROWS = 16_384  # queries per matmul at most (small shards: more gains nothing)
MAX_SCORES = 2**31 - 1  # score matrix entries per batch: within 32-bit indexing of torch's kernels
TOPK_BYTES = 36  # per wanted neighbour and query: topk's values and int64 rows (12 bytes), twice as much workspace
U16 = 2.0**-11  # float16 unit roundoff (11-bit significand)
U32 = 2.0**-24  # float32 unit roundoff
TINY16 = 2.0**-25  # half the spacing of float16 subnormals: the absolute rounding error below 2^-14


def _pow2_scale(x: np.ndarray) -> np.ndarray:
    """Per row, the power of two 2^e with max|x| / 2^e in [0.5, 1) (1 for a zero row).

    Dividing by a power of two is exact, so the half-precision copy is scaled without error into a
    range where float16 neither overflows (a dot product of d terms stays below d) nor loses
    relative precision except on entries below 2^-14 of the row's largest (subnormals)."""
    top = np.abs(x).max(axis=-1) if x.size else np.zeros(x.shape[:-1], np.float32)
    _, e = np.frexp(top.astype(np.float64))
    return np.ldexp(1.0, e).astype(np.float64)


def bound_factor(dim: int, accumulate: float, half_inputs: bool, half_scores: bool) -> float:
    """c with |approximate - exact| <= c * |q| * max|p| for every (query, passage) score.

    Derivation, in the scaled units (every row of q, and the whole p, divided by a power of two
    so that its largest entry m lies in [0.5, 1); the scale multiplies both sides):

    1. Rounding to float16: q^_i = q_i + a_i with |a_i| <= u|q_i| + t (u = 2^-11, t = 2^-25: the
       relative error of a normal float16, or the absolute error of a subnormal one); the same for
       p^_i = p_i + b_i. Then
         |sum q^_i p^_i - sum q_i p_i| <= sum |a_i||p_i| + |q_i||b_i| + |a_i||b_i|
           <= (2u + u^2) sum|q_i p_i| + t (1 + u)(sum|p_i| + sum|q_i|) + d t^2
           <= (2u + u^2)|q||p| + t (1 + u) sqrt(d) (|q| + |p|) + d t^2      (Cauchy-Schwarz)
       Write P = max|p| over the shard's rows (>= |p|). |q| >= 0.5 (its own largest entry) and
       P >= 0.5 (the row holding the shard's largest entry), so t = 2^-24 * 0.5 is at most
       2^-24 |q| and at most 2^-24 P, and the whole is
           <= (2u + u^2 + 2^-23 (1 + u) sqrt(d) + d 2^-48) |q| P.
       (Steps 2 and 3 likewise use |p| <= P; the bound returned is c |q| P.)
    2. Each product q^_i p^_i of two float16 values (11-bit significands, exponents >= -24) is
       exact in float32. Summing d of them in float32 in any order (blocked, split-K, FMA) is off
       by at most gamma_d sum|q^_i p^_i| <= gamma_d |q^||p^|, gamma_d = d U / (1 - d U) with
       U = 2^-24. `accumulate` multiplies U: 2 by default on CUDA, because tensor cores are known
       to truncate rather than round when they align and add products. |q^| <= (1 + u + 2^-24
       sqrt(d)) |q|, likewise p^. (gamma_{d+1} is used: it also covers float32 inputs, whose
       products are rounded.)
    3. A float16 score matrix rounds the sum once more: u |s| + t, with |s| <= |q^||p^| + (2.)
       and t <= 2^-23 |q| P. No overflow: in scaled units |s| <= d < 65504.
    4. Scaling back is a multiplication by a power of two: exact.
    Everything is then multiplied by 1.02 for the float64 work on the caller's side (norms, the
    float64 rescoring it compares against) and for good measure. Without half inputs (float32
    fallback) step 1 vanishes and step 2 holds with the float32 inputs.
    """
    u = U16 if half_inputs else 0.0
    t = TINY16 if half_inputs else 0.0
    grow = 1 + u + (2.0**-24 * math.sqrt(dim) if half_inputs else 0.0)  # |q^| / |q|
    inputs = 2 * u + u * u + 2 * t * 2 * (1 + u) * math.sqrt(dim) + dim * (2 * t) ** 2
    big_u = accumulate * U32
    terms = dim + 1  # + 1: float32 inputs (the fallback) round each product once more
    gamma = terms * big_u / (1 - terms * big_u)
    summed = gamma * grow * grow
    out = (U16 * (grow * grow + inputs + summed) + 2 * TINY16 * 2) if half_scores else 0.0
    return 1.02 * (inputs + summed + out)


def score_budget(free_bytes: int | None) -> int:
    """Bytes of device memory for one query batch's score matrix and top-k: `SCORE_FRACTION` of
    `free_bytes` (the GPU's free memory with the passages on it) within [SCORE_MIN, SCORE_MAX];
    `SCORE_MB` when there is no such figure (CPU tensors)."""
    if free_bytes is None:
        return SCORE_MB << 20
    return int(min(max(free_bytes * SCORE_FRACTION, SCORE_MIN), SCORE_MAX))


def queries_per_matmul(budget_bytes: float, passages: int, want: int, dim: int = 0) -> int:
    """Queries per matmul: as many as `budget_bytes` holds at 4 bytes a score (float32; a float16
    matrix is smaller), `TOPK_BYTES` per wanted neighbour and the float16 query itself, at most
    `MAX_ROWS` and `MAX_SCORES` scores, at least one."""
    per_query = 4 * passages + TOPK_BYTES * want + 2 * dim
    rows = int(budget_bytes) // max(1, per_query)
    return max(1, min(rows, MAX_ROWS, MAX_SCORES // max(1, passages)))


def batch_rows_for(free_bytes: int | None, passages: int, want: int, dim: int = 0) -> int:
    """Queries per matmul given the GPU's free memory (None: CPU tensors): `queries_per_matmul` of
    `score_budget`. With an H200's ~139 GiB free, 1M x 384 passages give 2,144 queries per matmul
    (the 8 GB ceiling) and 10M give 214 (2^31 scores), where a fixed 512 MB gave 134 and 13."""
    return queries_per_matmul(score_budget(free_bytes), passages, want, dim)


class TorchKnn:
    """One index shard's passages on a torch device, answering approximate inner-product top-k.

    `vecs` (rows x dim float32) are copied to the device once, in half precision (scaled by a
    power of two); the caller keeps its float32 host copy for exact rescoring. `score_mb`: the
    score buffer (None: from the GPU's free memory, `score_budget`); `free_mb` is what the GPU
    had free once the passages were on it (None on CPU tensors) and `query_batch` the queries per
    matmul of the latest `knn` call.
    """

    def __init__(self, vecs: np.ndarray, device: str = "cuda", score_mb: float | None = None, threads: int = 0):
        import torch

        self.device = devices.torch_device(device)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            # cuBLAS may otherwise reduce split-K partial sums in float16, which breaks the bound
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
        elif threads:
            torch.set_num_threads(threads)
        self.n, self.dim = vecs.shape
        self.dtype = torch.float16 if on_gpu or _cpu_half_matmul() else torch.float32
        self.p_scale = float(_pow2_scale(vecs.reshape(1, -1) if vecs.size else vecs.reshape(1, 0))[0])
        host = torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32))
        # to half precision on the host a block of rows at a time, so neither the device nor the
        # host ever holds a second float32 copy of the shard
        self.p = torch.empty((self.n, self.dim), dtype=self.dtype, device=self.device)
        block = max(1, (64 << 20) // max(1, 4 * self.dim))
        for i in range(0, self.n, block):
            self.p[i : i + block] = (host[i : i + block] / self.p_scale).to(self.dtype).to(self.device)
        self.free_mb = None
        if on_gpu:
            torch.cuda.empty_cache()  # the conversion's blocks: free for the score buffer
            self.free_mb = torch.cuda.mem_get_info(self.device)[0] / 2**20
        free = None if self.free_mb is None else int(self.free_mb * 2**20)
        self.score_mb = score_budget(free) / 2**20 if score_mb is None else score_mb
        self.query_batch = 0
        self._pinned = on_gpu
        self.half_scores = self.dtype == torch.float16  # until a float32 score matrix is seen
        self._mm_out = on_gpu and self.dtype == torch.float16  # try torch.mm(..., out_dtype=float32)
        self.accumulate = 2.0 if on_gpu else 1.0
        self.factor = bound_factor(self.dim, self.accumulate, self.dtype == torch.float16, self.half_scores)

    def _scores(self, qb):
        import torch

        if self._mm_out:
            try:
                out = torch.mm(qb, self.p.T, out_dtype=torch.float32)
                self.half_scores = False
                return out
            except (TypeError, RuntimeError, NotImplementedError):  # a torch without out_dtype
                self._mm_out = False
        return qb @ self.p.T

    def batch_rows(self, want: int) -> int:
        """Queries per matmul: the score matrix (4 bytes a score) and the top-k within `score_mb`."""
        return queries_per_matmul(self.score_mb * 2**20, self.n, want, self.dim)

    def knn(self, q: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """The `want` passages of highest approximate score per query row: (scores float32, rows
        int64), best first; ties in the approximate scores in no particular order."""
        import torch

        want = min(want, self.n)
        nq = len(q)
        out_s = np.empty((nq, want), dtype=np.float32)
        out_r = np.empty((nq, want), dtype=np.int64)
        if nq == 0 or want == 0:
            return out_s, out_r
        q_scale = _pow2_scale(q)
        step = self.batch_rows(want)
        if step != self.query_batch:
            log.info("gpu search: %d queries per matmul (%d passages, %d wanted, score buffer %.0f MB%s)", step,
                     self.n, want, self.score_mb, "" if self.free_mb is None else f" of {self.free_mb:.0f} MB free")
        self.query_batch = step
        with torch.inference_mode():
            scaled = torch.from_numpy(np.ascontiguousarray(q / q_scale[:, None], dtype=np.float32)).to(self.dtype)
            if self._pinned:
                # on CUDA nothing waits per batch: queries go up and top-k come back by asynchronous
                # copies from and into page-locked memory, one synchronisation per call
                scaled = scaled.pin_memory()
                host_s = torch.empty((nq, want), dtype=torch.float32, pin_memory=True)
                host_r = torch.empty((nq, want), dtype=torch.int64, pin_memory=True)
            else:
                host_s, host_r = torch.from_numpy(out_s), torch.from_numpy(out_r)
            for i in range(0, nq, step):
                qb = scaled[i : i + step].to(self.device, non_blocking=self._pinned)
                s, r = torch.topk(self._scores(qb), want, dim=1, largest=True, sorted=True)
                # the caching allocator is stream-ordered: s and r are not reused before these copies ran
                host_s[i : i + step].copy_(s.float(), non_blocking=self._pinned)
                host_r[i : i + step].copy_(r, non_blocking=self._pinned)
            if self._pinned:
                torch.cuda.current_stream(self.device).synchronize()
                out_s[:], out_r[:] = host_s.numpy(), host_r.numpy()
        # back to the input's units: a multiplication by a power of two, exact in float32
        out_s *= (q_scale * self.p_scale).astype(np.float32)[:, None]
        return out_s, out_r

    def bound(self, q: np.ndarray, max_norm: float) -> np.ndarray:
        """Per query row (float64): the most any approximate score `knn` gave can differ from the
        exact inner product with a passage of norm <= `max_norm`. Call after `knn` (a float16
        score matrix, if that is what this torch gave, widens it)."""
        factor = bound_factor(self.dim, self.accumulate, self.dtype.itemsize == 2, self.half_scores)
        return factor * np.linalg.norm(q.astype(np.float64), axis=1) * max_norm


_HALF_MM: bool | None = None


def _cpu_half_matmul() -> bool:
    """Whether this torch multiplies float16 matrices on the CPU."""
    global _HALF_MM
    if _HALF_MM is None:
        import torch

        try:
            a = torch.ones((2, 3), dtype=torch.float16)
            _HALF_MM = bool((a @ a.T).float().eq(3).all())
        except (RuntimeError, NotImplementedError):
            _HALF_MM = False
    return _HALF_MM
