"""The mining of one query shard as pure functions: a candidates table (and the guide's scores of
it) -> each (query, positive) pair's chosen negatives, with every candidate's rule code.

`negprep.rules.mining` holds the rules over score matrices; this module reads a shard's tables into
those matrices, applies them and picks. The mine stage (`negprep.stages.mine`) writes the rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from negprep.rules import mining


@dataclass
class Pairs:
    """One row per (query, positive) pair of a shard."""

    q: np.ndarray  # the pair's query row
    pid: list[str]  # the positive's id
    pscore: np.ndarray  # the positive's score under the mining model
    pguide: np.ndarray | None  # ... and under the guide
    picked: np.ndarray  # (pairs, num_negatives) chosen candidate ranks, -1 where short


@dataclass
class Mined:
    """The mining of one shard: its pairs, and per query its candidates, scores and rule codes."""

    pairs: Pairs
    qids: list[str]
    cids: list[list[str]]
    scores: np.ndarray  # (queries, K) mining-model scores, NaN padded
    guide: np.ndarray | None  # (queries, K) guide scores
    code: np.ndarray  # (queries, K) mining.KEEP, a drop reason code, or mining.OUTSIDE
    ref: np.ndarray  # per query, its lowest positive score (the margins' reference)
    gref: np.ndarray | None  # ... under the guide


def mine_candidates(
    cand: pa.Table,
    rules: mining.Rules,
    guide: pa.Table | None = None,
    text_keys: dict[str, int] | None = None,
    vectors: Callable[[set[str]], dict[str, np.ndarray]] | None = None,
) -> tuple[Mined, dict]:
    """Pure part of the stage: a candidates table -> chosen negatives per (query, positive) pair.

    Args:
        cand: a candidates file (schemas/candidates.yaml).
        rules: the mining rules.
        guide: the guide scores of the same shard (schemas/guide_scores.yaml), rows in the same order.
        text_keys: normalised-text key per passage id, for the duplicate rules (of a positive, of a
            better-ranked candidate).
        vectors: unit embeddings by passage id under the mining model, for the near-copy rule.

    Returns the mined arrays (pairs, picked rank indices, score matrices, reason codes) and counts.
    """
    qids = cand.column("query_id").to_pylist()
    cids = cand.column("candidate_ids").to_pylist()
    pids = cand.column("positive_ids").to_pylist()
    pscores = cand.column("positive_scores").to_pylist()
    k = max(rules.range_max, 1)
    scores = mining.pad_rows([np.asarray(s, dtype=np.float64) for s in cand.column("candidate_scores").to_pylist()], k)
    ref = np.array([min(p) if p else np.nan for p in pscores])
    gscores, pguide, gref = _guide_scores(guide, qids, k) if guide is not None else (None, None, None)
    dup = repeat = None
    if text_keys is not None:
        dup, repeat = _duplicates(cand, cids, pids, scores.shape, text_keys, rules)
    similarity = None
    if vectors is not None and rules.near_duplicate is not None:
        similarity = positive_similarity(cids, pids, scores, pscores, rules, vectors)
    code = mining.classify(scores, ref, rules, gscores, gref, dup, repeat, similarity)
    keep = code == mining.KEEP
    kept = keep.sum(axis=1)
    counts = mining.reason_counts(code)
    pairs = _pairs(keep, qids, pids, pscores, pguide, scores, gscores, rules)
    got = (pairs.picked >= 0).sum(axis=1)
    counts.update(
        queries=len(qids),
        queries_without_positive_score=int(sum(1 for p in pscores if not p)),
        queries_without_candidates=int((kept == 0).sum()),
        queries_short=int((kept < rules.num_negatives).sum()),
        pairs=len(pairs.pid),
        pairs_short=int((got < rules.num_negatives).sum()),
        negatives=int(got.sum()),
    )
    return Mined(pairs, qids, cids, scores, gscores, code, ref, gref), counts


def _guide_scores(guide: pa.Table, qids: list[str], k: int) -> tuple[np.ndarray, list[list[float]], np.ndarray]:
    """(candidate guide scores (queries, k) NaN padded, each query's positives' guide scores, the
    lowest of them per query) from a guide file whose rows follow the candidates'."""
    if guide.column("query_id").to_pylist() != qids:
        raise ValueError("guide scores and candidates are not aligned")
    gscores = mining.pad_rows([np.asarray(s, dtype=np.float64) for s in
                               guide.column("candidate_guide_scores").to_pylist()], k)
    pguide = guide.column("positive_guide_scores").to_pylist()
    return gscores, pguide, np.array([min(p) if p else np.nan for p in pguide])


def _duplicates(cand: pa.Table, cids: list[list[str]], pids: list[list[str]], shape: tuple[int, int],
                text_keys: dict[str, int], rules: mining.Rules) -> tuple[np.ndarray, np.ndarray]:
    """(copies of a positive, repeats of a better-ranked candidate), both (queries, K) masks, by text key."""
    k = shape[1]
    # a twin query's positives (excluded_ids) are positives of this question too
    excluded = (cand.column("excluded_ids").to_pylist() if "excluded_ids" in cand.column_names
                else [[] for _ in cids])
    dup, keys, known = (np.zeros(shape, dtype=dt) for dt in (bool, np.int64, bool))
    for qi, (c, p, e) in enumerate(zip(cids, pids, excluded, strict=True)):
        row = [text_keys.get(d) for d in c[:k]]
        known[qi, : len(row)] = [x is not None for x in row]
        keys[qi, : len(row)] = [x or 0 for x in row]
        pkeys = {text_keys[d] for d in (*p, *e) if d in text_keys}
        if pkeys:
            dup[qi, : len(row)] = [x in pkeys for x in row]
    return dup, mining.repeated_texts(keys, known, rules.range_min, rules.range_max)


def _pairs(keep: np.ndarray, qids: list[str], pids: list[list[str]], pscores: list[list[float]],  # noqa: PLR0913
           pguide: list[list[float]] | None, scores: np.ndarray, gscores: np.ndarray | None,
           rules: mining.Rules) -> Pairs:
    """One row per (query, positive), each with its negatives chosen among its query's kept
    candidates (each pair its own draw under `random` and `balanced`)."""
    q_of_pair = np.array([qi for qi, p in enumerate(pids) for _ in p], dtype=np.int64)
    pair_pid = [d for p in pids for d in p]
    pair_pscore = np.array([s for p in pscores for s in p], dtype=np.float64)
    pair_pguide = None if pguide is None else np.array([s for p in pguide for s in p], dtype=np.float64)
    seeds = None
    if rules.sampling in ("random", "balanced"):
        seeds = np.array([mining.row_seed(rules.seed, qids[q], d) for q, d in zip(q_of_pair, pair_pid, strict=True)],
                         dtype=np.uint64)
    pair_keep = keep[q_of_pair] if len(q_of_pair) else keep[:0]
    if rules.sampling == "balanced":
        # margins of the teacher when there is one (TAS-Balanced), else of the mining model
        if gscores is not None:
            margins = pair_pguide[:, None] - gscores[q_of_pair]
        else:
            margins = pair_pscore[:, None] - scores[q_of_pair]
        picked = mining.balanced(pair_keep, margins, rules.num_negatives, seeds, rules.margin_bins)
    else:
        picked = mining.choose(pair_keep, rules.num_negatives, rules.sampling, seeds)
    return Pairs(q_of_pair, pair_pid, pair_pscore, pair_pguide, picked)


def positive_similarity(cids: list[list[str]], pids: list[list[str]], scores: np.ndarray,  # noqa: PLR0913
                        pscores: list[list[float]], rules: mining.Rules,
                        vectors: Callable[[set[str]], dict[str, np.ndarray]]) -> np.ndarray:
    """(n, K) each window candidate's highest cosine to one of its query's positives; NaN where its
    query score is too far from every positive's for a near-copy (`mining.near_copy_bound`), so
    only those few candidates' vectors are read."""
    n, k = scores.shape
    out = np.full((n, k), np.nan)
    # without unit vectors the scores bound nothing: every window candidate is checked
    bound = mining.near_copy_bound(rules.near_duplicate) if rules.unit_scores else np.inf
    lo = np.array([min(p) - bound if p else np.nan for p in pscores])[:, None]
    hi = np.array([max(p) + bound if p else np.nan for p in pscores])[:, None]
    cols = np.arange(k)[None, :]
    near = (cols >= rules.range_min) & (cols < rules.range_max) & (scores >= lo) & (scores <= hi)
    rows, js = np.nonzero(near)
    if len(rows) == 0:
        return out
    vec = vectors({cids[r][j] for r, j in zip(rows, js, strict=True)} | {d for r in set(rows) for d in pids[r]})
    for r, j in zip(rows, js, strict=True):
        c = vec.get(cids[r][j])
        sims = [float(c @ vec[p]) for p in pids[r] if p in vec] if c is not None else []
        if sims:
            out[r, j] = max(sims)
    return out
