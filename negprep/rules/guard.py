"""The in-batch guard: which rows must not share a training batch.

Under an in-batch loss every other row's passages are negatives of a row's query, so a passage that
is a labelled positive of another row's question (`known_positive_pairs`), or that the vetting
model scores as positive-like for it (`conflicting_pairs`, by the rule that vets mined negatives),
would be a false negative there. `batching.compose` keeps such rows apart through `GuardKeys`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from negprep.rules.mining import margin_thresholds

#: rows (indices into compose's input) -> (k, 2) pairs of those rows that must not share a batch
Conflicts = Callable[[np.ndarray], np.ndarray]


def guard_thresholds(positive: np.ndarray, relative: float | None = None, absolute: float | None = None,
                     max_score: float | None = None) -> np.ndarray:
    """(n,) the highest score a row's query may give another row's passage: the mining rule's.

    Args:
        positive: (n,) or (n, p) each row's positive score(s) under the scorer (NaN pads a 2-d
            row); the reference is the lowest, as for mined negatives.
        relative, absolute: the margins (`mining.margin_thresholds`).
        max_score: a cap on the threshold. With no margin and no cap the rule vets nothing (naive
            mining keeps a candidate whatever it scores), so nothing is positive-like: inf.
    """
    ref = np.asarray(positive, dtype=np.float64)
    if ref.ndim == 2:
        ref = np.fmin.reduce(ref, axis=1) if ref.shape[1] else np.full(len(ref), np.nan)  # fmin skips NaN padding
    thr = margin_thresholds(ref, relative, absolute)  # inf without a margin
    return thr if max_score is None else np.minimum(thr, max_score)


def zscore_caps(window: np.ndarray, max_zscore: float) -> np.ndarray:
    """(n,) the highest score the z-score rule lets a passage have for each row's query.

    `window` (n, K) holds the guide's scores of the query's window candidates (NaN pads): the
    vetting rule drops a candidate more than `max_zscore` standard deviations above their mean
    (`mining.window_zscores`), so mean + max_zscore x std. A row with fewer than two finite scores,
    or all equal, has no outlier: inf.
    """
    s = np.asarray(window, dtype=np.float64).reshape(len(window), -1)
    ok = np.isfinite(s)
    cnt = ok.sum(axis=1)
    mean = np.where(ok, s, 0.0).sum(axis=1) / np.maximum(cnt, 1)
    std = np.sqrt(np.where(ok, (s - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(cnt, 1))
    return np.where((cnt >= 2) & (std > 0), mean + max_zscore * std, np.inf)


def conflicting_pairs(queries: np.ndarray, passages: np.ndarray, positive: np.ndarray, query: np.ndarray,
                      relative: float | None = None, absolute: float | None = None,
                      max_score: float | None = None, cap: np.ndarray | None = None) -> np.ndarray:
    """(k, 2) pairs (i < j, unique) of rows that must not share a batch under an in-batch loss.

    Rows r and s conflict when a passage of s scores above r's threshold for r's query
    (`guard_thresholds`), or one of r's above s's: that passage would be a false negative of the
    other row. Rows with the same query key are skipped (the packer keeps them apart already). A
    NaN score counts as above, as in `mining.classify`.

    Args:
        queries: (n, d) each row's query vector.
        passages: (n, m, d) each row's passage vectors (positive and negatives), normalised as the
            scorer's embeddings are: scores are inner products.
        positive: (n,) or (n, p) each row's positive score(s) under the same scorer.
        query: (n,) each row's query key.
        relative, absolute, max_score: the scorer's rule (the guide's, or the mining model's).
        cap: (n,) a further bound per row (`zscore_caps`: the guide's z-score rule).
    """
    q = np.asarray(queries)
    p = np.asarray(passages)
    n = len(q)
    if n < 2 or p.ndim != 3 or p.shape[1] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    m = p.shape[1]
    flat = p.reshape(n * m, -1)
    thr = guard_thresholds(positive, relative, absolute, max_score)
    if cap is not None:
        thr = np.minimum(thr, np.asarray(cap, dtype=np.float64))
    key = np.asarray(query).reshape(-1)
    block = max(1, (1 << 22) // (n * m))  # query rows per product: about 16 MB of float32 scores
    found = []
    for a in range(0, n, block):
        b = min(n, a + block)
        best = (q[a:b] @ flat.T).reshape(b - a, n, m).max(axis=2)  # [r, s]: s's best passage for r's query
        hit = ~(best <= thr[a:b, None]) & (key[a:b, None] != key[None, :])
        r, c = np.nonzero(hit)
        found.append(np.stack([r + a, c], axis=1))
    pairs = np.sort(np.concatenate(found), axis=1)  # r's passage for s's query or the reverse: one pair
    return np.unique(pairs, axis=0).astype(np.int64).reshape(-1, 2)


def known_positive_pairs(query: np.ndarray, texts: np.ndarray, positives: dict[int, set[int]]) -> np.ndarray:
    """(k, 2) pairs (i < j, unique) of rows where a passage of one is a labelled positive of the other's query.

    No score can vouch for such a passage: it is a false negative of that query whatever a model
    thinks of it. Questions with the same text share their positives (as in mining's exclusions),
    so another site's answer to the same question counts too. Rows with the same query key are
    skipped (the packer keeps them apart already).

    Args:
        query: (n,) each row's query key.
        texts: (n, m) each row's passage text keys.
        positives: query key -> the text keys of its labelled positives (over every row with that key).
    """
    keys = np.asarray(query).reshape(-1).tolist()
    owners: dict[int, list[int]] = {}
    for r, k in enumerate(keys):
        for t in positives.get(k, ()):
            owners.setdefault(t, []).append(r)
    found = set()
    for s, row in enumerate(np.asarray(texts).reshape(len(keys), -1).tolist()):
        for t in set(row):
            found.update((min(r, s), max(r, s)) for r in owners.get(t, ()) if keys[r] != keys[s])
    return np.array(sorted(found), dtype=np.int64).reshape(-1, 2)


def positive_keys(query: np.ndarray, texts: np.ndarray) -> dict[int, set[int]]:
    """Query key -> the text keys of the positives of every row with that key (`texts[:, 0]`)."""
    out: dict[int, set[int]] = {}
    for k, t in zip(np.asarray(query).reshape(-1).tolist(), np.asarray(texts)[:, 0].tolist(), strict=True):
        out.setdefault(k, set()).add(t)
    return out


class GuardKeys:
    """Keys that keep conflicting rows apart: pair g becomes ("guard", g) in both rows' keys (a tuple
    never equals an int64 text key), so pack, fill and _swap separate them like a repeated text."""

    def __init__(self, keys: list[tuple], conflicts: Conflicts):
        self.base = keys
        self.keys = list(keys)
        self.conflicts = conflicts
        self.pairs: dict[tuple[int, int], int] = {}

    def add(self, rows: np.ndarray) -> None:
        """Find the conflicts among `rows` and give each new pair its key."""
        if len(rows) < 2:
            return
        found = np.asarray(self.conflicts(np.asarray(rows, dtype=np.int64)), dtype=np.int64).reshape(-1, 2)
        for i, j in found.tolist():
            pair = (min(i, j), max(i, j))
            # a pair sharing a text or query key is kept apart already: not the guard's doing
            if i == j or pair in self.pairs or not set(self.base[i]).isdisjoint(self.base[j]):
                continue
            key = ("guard", len(self.pairs))
            self.pairs[pair] = len(self.pairs)
            self.keys[i] += (key,)
            self.keys[j] += (key,)
