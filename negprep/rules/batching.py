"""Topic-aware batch composition (TAS-Balanced) as pure functions over arrays.

Input: one entry per output row: the cluster of its query, a key of its query and keys of its
passage texts (positive and negatives). Keys are 64-bit hashes of the normalised texts, so the
same text under two ids is one key, and query and passage keys share one key space. Output: the
rows in training order with a `batch_id` each, such that

- a batch holds `batch_size` rows drawn from one cluster (except `mixed` batches, below);
- no key occurs in two rows of the same batch: no query twice, no passage twice, no passage that
  is another row's query (with in-batch negatives such a repeat would be a false negative);
- batch order is a seeded shuffle; rows keep consecutive positions within their batch.

Packing is greedy: a cluster's rows are interleaved (rows sharing a query or a passage spread
evenly over the cluster's sequence, queries in a seeded order), then each batch takes the next
rows that do not clash with it, looking at most `window` rows ahead; skipped rows stay first in
line for the next batch. Rows left at the cluster's end that clash with each other are then
swapped into full batches for rows that fit (`fill`).
Batches left short (at a cluster's end, or when the rows ahead all clash) are handled by
`partial`:

- `merge`: the short batches' rows of all clusters are pooled, cluster after cluster, and packed
  again across cluster boundaries into `mixed` batches; whatever still cannot fill a whole batch is
  dropped and counted. Every
  batch written then has exactly `batch_size` rows, so a trainer reading the file in order with
  that batch size sees exactly these batches.
- `drop`: rows of short batches are dropped and counted; again every batch is full.
- `keep`: short batches are written as they are (every row kept); a trainer must then batch by
  `batch_id`, since fixed-size slices of the file would straddle batches.

In-batch false-negative guard (`conflicts`): with an in-batch loss every passage of a batch is a
negative for every other row's query, and topic batches gather similar questions, so one row's
passage may answer another row's query. `conflicting_pairs` finds such rows by the rule that vets
mined negatives (a passage scoring above a query's positive minus its margins); `compose` turns
each pair into a key both rows share, so the packer keeps them apart like repeated texts. The
pairs are found per cluster before it is packed, and again on the merge pool, which mixes clusters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from negprep.rules.guard import Conflicts, GuardKeys
from negprep.rules.mining import row_seed

PARTIAL = ("merge", "drop", "keep")


@dataclass(frozen=True)
class Batches:
    """A batch plan over the input rows.

    Attributes:
        order: (m,) input row indices in output order (m = rows kept).
        batch_id: (m,) batch of each output position; 0, 0, ..., 1, 1, ...: batches are contiguous.
        mixed: (number of batches,) True for a `merge` batch pooled from several clusters' leftovers.
        counts: rows, rows_batched, rows_merged, rows_left_out, batches, batches_mixed, batches_short,
            rows_moved, and the guard's guard_pairs, guard_pairs_separated, rows_left_out_by_guard.
    """

    order: np.ndarray
    batch_id: np.ndarray
    mixed: np.ndarray
    counts: dict[str, int] = field(default_factory=dict)
    cluster: np.ndarray | None = None  # (m,) cluster of each output row, after `rebalance`


def interleave(cluster: np.ndarray, query: np.ndarray, texts: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(position, priority) per row: sorting by (position, priority) spreads rows that share a key.

    Two rows that share a key (the query, or a passage) can never sit in one batch, so each row is
    placed by the key it shares with the most rows of its cluster: the i-th of those r rows (seeded
    order) gets position (i + 0.5) / r. A query with many rows, or a passage that is the negative of
    many queries, is then spread over the whole cluster instead of crowding its end, where its
    rows would clash with each other and leave short batches (measured on SciFact train, batch 32:
    rows in single-cluster batches 83% -> 94% with 5 negatives, 80% -> 88% with 1, at k = 6).
    `priority` is a seeded rank of the query, so rows at equal positions come in a random query order.
    """
    n = len(query)
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    jitter = rng.random(n)
    position, most = np.full(n, 0.5), np.zeros(n, dtype=np.int64)
    for key in np.c_[query, texts].T:
        _, inv, count = np.unique(np.c_[cluster, key], axis=0, return_inverse=True, return_counts=True)
        inv = inv.reshape(-1)
        order = np.lexsort((jitter, inv))  # rows grouped by (cluster, key), random order inside
        g = inv[order]
        starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
        rank = np.empty(n)
        rank[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        shared = count[inv]
        take = shared > most
        position[take], most[take] = ((rank + 0.5) / shared)[take], shared[take]
    qinv = np.unique(query, return_inverse=True)[1].reshape(-1)
    return position, rng.permutation(int(qinv.max()) + 1)[qinv]


def pack(rows: np.ndarray | list[int], keys: list[tuple], batch_size: int, window: int) -> list[list[int]]:
    """Greedy batches over `rows` (in order): each takes the next non-clashing rows, <= window ahead.

    Args:
        rows: row indices in the preferred order.
        keys: keys[r] = every key of row r (query and texts); two rows clash if they share one.
    Returns:
        Batches of row indices, each of 1..batch_size rows, covering every row exactly once.
    """
    pending = deque(int(r) for r in rows)
    out: list[list[int]] = []
    while pending:
        batch: list[int] = []
        used: set = set()
        skipped: list[int] = []
        scanned = 0
        while pending and len(batch) < batch_size and scanned < window:
            r = pending.popleft()
            scanned += 1
            k = keys[r]
            if used.isdisjoint(k):
                batch.append(r)
                used.update(k)
            else:
                skipped.append(r)
        pending.extendleft(reversed(skipped))  # clashing rows stay first in line
        out.append(batch)
    return out


def fill(batches: list[list[int]], keys: list[tuple], batch_size: int) -> list[list[int]]:
    """`pack`'s batches of one group with short ones filled by swaps: full batches first.

    Greedy packing leaves rows at a group's end that clash with each other (a passage several of
    them share can sit in only one of them per batch). Such a row r can still go into a full batch
    B in exchange for a row s of B that fits the batch being filled, when every key r shares with B
    is one of s's own. Each swap places one more row, and batches stay free of repeated keys.
    """
    full = [list(b) for b in batches if len(b) == batch_size]
    pool = [r for b in batches if len(b) < batch_size for r in b]
    sets = [set().union(*(keys[r] for r in b)) for b in full]
    while len(pool) >= batch_size:
        cur: list[int] = []
        used: set = set()
        rest: list[int] = []
        for r in pool:
            k = set(keys[r])
            if len(cur) == batch_size:
                rest.append(r)
            elif used.isdisjoint(k):
                cur.append(r)
                used |= k
            elif not _swap(r, k, full, sets, keys, cur, used):
                rest.append(r)
        if len(cur) < batch_size:  # this round's rows are now cur and rest (swapped rows sit in full)
            return full + pack(cur + rest, keys, batch_size, len(cur) + len(rest))
        full.append(cur)
        sets.append(used)
        pool = rest
    return full + pack(pool, keys, batch_size, len(pool))


def _swap(r: int, k: set, full: list[list[int]], sets: list[set], keys: list[tuple], cur: list[int],
          used: set) -> bool:
    """Put row r (keys k) into a full batch in place of a row that joins `cur`; False if none can."""
    for b, bkeys in zip(full, sets, strict=True):
        shared = bkeys & k
        for j, s in enumerate(b):
            ks = set(keys[s])
            if shared <= ks and used.isdisjoint(ks):
                b[j] = r
                bkeys -= ks
                bkeys |= k
                cur.append(s)
                used |= ks
                return True
    return False


def rebalance(cluster: np.ndarray, query: np.ndarray, second: np.ndarray, margin: np.ndarray,
              batch_size: int) -> np.ndarray:
    """Clusters whose row counts are multiples of `batch_size`, as far as moving boundary queries allows.

    A cluster's end (its rows mod batch_size) goes to mixed batches. So, cluster by cluster, queries
    move whole (all their rows) to their second-nearest cluster, the nearest to the boundary first
    (smallest `margin`, the difference of the two centroid distances), until the cluster's rows are
    a multiple of batch_size; a cluster that has given rows is closed, and queries move only to
    clusters not yet closed. Returns the new cluster of every row.

    Args:
        cluster: (n,) the k-means cluster of each row's query.
        query: (n,) key of each row's query.
        second: (n,) the query's second-nearest cluster (-1: none).
        margin: (n,) how much farther the second centroid is than the first.
    """
    cluster = np.asarray(cluster, dtype=np.int64).copy()
    if len(cluster) == 0:
        return cluster
    uq, first, inv, rows = np.unique(query, return_index=True, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    qc, q2, qm = cluster[first].copy(), np.asarray(second)[first], np.asarray(margin, dtype=np.float64)[first]
    totals = {int(c): int(rows[qc == c].sum()) for c in np.unique(qc)}
    closed: set[int] = set()
    order = np.lexsort((uq, qm))  # nearest the boundary first, ties by query key
    for c in sorted(totals):
        left = totals[c] % batch_size
        if left:
            for q in order[qc[order] == c]:
                if left == 0:
                    break
                target = int(q2[q])
                if rows[q] <= left and target >= 0 and target != c and target not in closed and target in totals:
                    qc[q] = target
                    totals[c] -= int(rows[q])
                    totals[target] += int(rows[q])
                    left -= int(rows[q])
        closed.add(c)
    return qc[inv]


@dataclass(frozen=True)
class _Packing:
    """The rows as `compose` packs them: cluster by cluster, in `order`."""

    order: np.ndarray  # row indices: by cluster, then spreading level, priority and query
    bounds: np.ndarray  # where each cluster's run starts in `order` (and the end)
    sort_key: tuple[np.ndarray, ...]  # (tie, prio, level, cluster) per row, for np.lexsort of a merge pool
    batch_size: int
    window: int
    partial: str


def _packing(cluster: np.ndarray, query: np.ndarray, texts: np.ndarray, rng: np.random.Generator,
             batch_size: int, window: int, partial: str) -> _Packing:
    """The packing order: cluster by cluster, each cluster's rows spread (`interleave`)."""
    level, prio = interleave(cluster, query, texts, rng)
    tie = np.unique(query, return_inverse=True)[1].reshape(-1)
    order = np.lexsort((tie, prio, level, cluster))
    n = len(cluster)
    bounds = np.r_[0, np.flatnonzero(np.diff(cluster[order])) + 1, n] if n else np.zeros(1, dtype=np.int64)
    return _Packing(order, bounds, (tie, prio, level, cluster), batch_size, window, partial)


def _plan(p: _Packing, keys: list[tuple], guard: GuardKeys | None) -> tuple[list[list[int]], list[list[int]], int]:
    """(full batches, mixed batches, rows left out); the guard adds its keys group by group."""
    ks = guard.keys if guard else keys
    full: list[list[int]] = []
    short: list[list[int]] = []
    for a, b in zip(p.bounds[:-1], p.bounds[1:], strict=True):
        if guard:
            guard.add(p.order[a:b])
        for batch in fill(pack(p.order[a:b], ks, p.batch_size, p.window), ks, p.batch_size):
            (full if len(batch) == p.batch_size else short).append(batch)
    if p.partial == "keep":
        return full + short, [], 0
    left = np.array([r for b in short for r in b], dtype=np.int64)
    if p.partial != "merge" or not len(left):
        return full, [], len(left)
    # still cluster by cluster: a mixed batch then spans few clusters (two, mostly)
    pool = left[np.lexsort(tuple(k[left] for k in p.sort_key))]
    if guard:  # the pool mixes clusters: pairs across them are new
        guard.add(pool)
    mixed: list[list[int]] = []
    dropped = 0
    for batch in fill(pack(pool, ks, p.batch_size, p.window), ks, p.batch_size):
        if len(batch) == p.batch_size:
            mixed.append(batch)
        else:
            dropped += len(batch)
    return full, mixed, dropped


def _guard_effect(p: _Packing, keys: list[tuple], guard: GuardKeys, dropped: int) -> tuple[int, int]:
    """(pairs the unguarded plan put in one batch, rows left out beyond the unguarded plan's): the
    same inputs and seed packed without the guard (integer work, cheap)."""
    if not guard.pairs:
        return 0, 0
    bare_full, bare_mixed, bare_dropped = _plan(p, keys, None)
    batch_of = np.full(len(keys), -1, dtype=np.int64)
    for i, b in enumerate(bare_full + bare_mixed):
        batch_of[b] = i
    pairs = np.array(list(guard.pairs), dtype=np.int64)
    together = batch_of[pairs[:, 0]]
    return int(((together >= 0) & (together == batch_of[pairs[:, 1]])).sum()), max(0, dropped - bare_dropped)


def compose(
    cluster: np.ndarray,
    query: np.ndarray,
    texts: np.ndarray,
    batch_size: int,
    seed: int,
    partial: str = "merge",
    window: int | None = None,
    second: np.ndarray | None = None,
    margin: np.ndarray | None = None,
    conflicts: Conflicts | None = None,
) -> Batches:
    """Order rows into batches of one cluster each, without repeated keys inside a batch.

    Args:
        cluster: (n,) cluster id of each row's query.
        query: (n,) key of each row's query (a hash of its normalised text).
        texts: (n, m) keys of each row's passages (positive, negatives).
        batch_size: rows per batch.
        seed: the job seed; the same inputs and seed give the same plan.
        partial: what to do with short batches: merge, drop or keep (see the module docstring).
        window: how many rows ahead a batch may look for a non-clashing row (default 8 batches).
        second, margin: (n,) each row's query's second-nearest cluster and how much farther it is:
            with them, boundary queries move so that clusters fill whole batches (`rebalance`).
        conflicts: the in-batch guard: row indices -> (k, 2) pairs of them (indices into the input
            rows) that must not share a batch (`conflicting_pairs`). Called per cluster before it
            is packed and on the merge pool; without it the plan is the unguarded one.
    """
    if partial not in PARTIAL:
        raise ValueError(f"unknown partial {partial!r}: one of {', '.join(PARTIAL)}")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    cluster = np.asarray(cluster, dtype=np.int64).reshape(-1)
    query = np.asarray(query, dtype=np.int64).reshape(-1)
    n = len(cluster)
    kmeans = cluster
    if second is not None and margin is not None:
        cluster = rebalance(cluster, query, second, margin, batch_size)
    texts = np.asarray(texts, dtype=np.int64)
    texts = texts.reshape(n, -1) if texts.size else texts.reshape(n, 0)
    window = window or max(8 * batch_size, 64)
    rng = np.random.default_rng(row_seed(seed, "batches"))
    keys = [(q, *t) for q, t in zip(query.tolist(), texts.tolist(), strict=True)]
    packing = _packing(cluster, query, texts, rng, batch_size, window, partial)
    guard = GuardKeys(keys, conflicts) if conflicts is not None else None
    full, mixed, dropped = _plan(packing, keys, guard)
    separated, by_guard = _guard_effect(packing, keys, guard, dropped) if guard is not None else (0, 0)

    return _shuffled(full, mixed, dropped, rng, batch_size, cluster, {
        "rows_moved": int((cluster != kmeans).sum()),  # to their query's second-nearest cluster
        # row pairs where a passage of one is positive-like for the other's query (and no shared text
        # keeps them apart already)
        "guard_pairs": len(guard.pairs) if guard else 0,
        "guard_pairs_separated": separated,  # of them, in one batch of the unguarded plan
        "rows_left_out_by_guard": by_guard,  # more rows left out than the unguarded plan leaves out
    })


def _shuffled(full: list[list[int]], mixed: list[list[int]], dropped: int, rng: np.random.Generator,
              batch_size: int, cluster: np.ndarray, more: dict[str, int]) -> Batches:
    """The plan: full and mixed batches in a shuffled order, with their counts (and `more`)."""
    batches = full + mixed
    is_mixed = np.array([False] * len(full) + [True] * len(mixed), dtype=bool)
    perm = rng.permutation(len(batches))
    sizes = np.array([len(batches[i]) for i in perm], dtype=np.int64)
    out = np.array([r for i in perm for r in batches[i]], dtype=np.int64)
    counts = {"rows": len(cluster), "rows_batched": len(out), "rows_merged": sum(len(b) for b in mixed),
              "rows_left_out": dropped, "batches": len(batches), "batches_mixed": len(mixed),
              "batches_short": int((sizes < batch_size).sum()), **more}
    return Batches(order=out, batch_id=np.repeat(np.arange(len(batches), dtype=np.int32), sizes),
                   mixed=is_mixed[perm], counts=counts, cluster=cluster[out])


def split_files(sizes: np.ndarray, files: int) -> np.ndarray:
    """Row offsets (files + 1) that cut the output into `files` parts of whole batches.

    Each part gets about the same number of rows; a batch never straddles two files, so a trainer
    that reads files one at a time still sees whole batches. Trailing parts may be empty.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    cuts = [0]
    for f in range(1, files):
        target = total * f / files
        # the batch end nearest the even split, never before the previous cut
        i = int(np.searchsorted(ends, target))
        cands = [int(ends[j]) for j in (i - 1, i) if 0 <= j < len(ends)]
        cut = min(cands, key=lambda e: abs(e - target)) if cands else total
        cuts.append(max(cut, cuts[-1]))
    cuts.append(total)
    return np.array(cuts, dtype=np.int64)
