"""Mine stage: candidates -> negatives -> output rows with texts, one Ray task per query shard.

Applies the rules of `negprep.mining` to a query shard's candidates, joins the texts (queries from
the shard, passages looked up by id in the corpus shards), checks the rows against the output
contract in schemas/ and writes one data file. Returns the counts and a bounded sample of scores
for the manifest; the driver never sees text.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from negprep import mining
from negprep.paths import Folder
from negprep.schemas import conform

SAMPLE = 100_000  # scores per shard kept for the manifest's quantiles


def mine_candidates(cand: pa.Table, rules: mining.Rules) -> tuple[dict[str, np.ndarray], dict]:
    """Pure part of the stage: a candidates table -> chosen negatives per (query, positive) pair.

    Returns the pair rows (query_id, positive_id, positive_score, picked rank indices (pairs x n),
    the candidate ids/scores matrix) and the counts.
    """
    qids = cand.column("query_id").to_pylist()
    cids = cand.column("candidate_ids").to_pylist()
    cscores = [np.asarray(s, dtype=np.float64) for s in cand.column("candidate_scores").to_pylist()]
    pids = cand.column("positive_ids").to_pylist()
    pscores = cand.column("positive_scores").to_pylist()
    k = max(rules.range_max, 1)
    scores = mining.pad_rows(cscores, k)
    ref = np.array([min(p) if p else np.nan for p in pscores])
    code = mining.classify(scores, ref, rules)
    keep = code == mining.KEEP
    kept = keep.sum(axis=1)
    counts = mining.reason_counts(code)
    # one row per (query, positive): each pair gets its own draw under `random`
    q_of_pair = np.array([qi for qi, p in enumerate(pids) for _ in p], dtype=np.int64)
    pair_pid = [d for p in pids for d in p]
    pair_pscore = np.array([s for p in pscores for s in p], dtype=np.float64)
    seeds = None
    if rules.sampling == "random":
        seeds = np.array(
            [mining.row_seed(rules.seed, qids[q], d) for q, d in zip(q_of_pair, pair_pid, strict=True)], dtype=np.uint64
        )
    picked = mining.choose(keep[q_of_pair] if len(q_of_pair) else keep[:0], rules.num_negatives, rules.sampling, seeds)
    got = (picked >= 0).sum(axis=1)
    counts.update(
        queries=len(qids),
        queries_without_positive_score=int(sum(1 for p in pscores if not p)),
        queries_without_candidates=int((kept == 0).sum()),
        queries_short=int((kept < rules.num_negatives).sum()),
        pairs=len(pair_pid),
        pairs_short=int((got < rules.num_negatives).sum()),
        negatives=int(got.sum()),
    )
    pairs = {"q": q_of_pair, "pid": pair_pid, "pscore": pair_pscore, "picked": picked}
    return {"pairs": pairs, "qids": qids, "cids": cids, "scores": scores}, counts


def _texts(folder: Folder, names: list[str], ids: set[str]) -> dict[str, str]:
    paths = [folder.path(n) for n in names]
    ds = pads.dataset(paths, format="parquet", filesystem=folder.fs)
    t = ds.to_table(columns=["id", "text"], filter=pc.field("id").isin(pa.array(sorted(ids), pa.string())))
    return dict(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))


def rows_for_output(mined: dict, fmt: str, n: int) -> dict[str, list]:
    """Output columns (ids, scores, ranks; texts filled later) for `triplet` or `ntuple`."""
    p = mined["pairs"]
    qids, cids, scores = mined["qids"], mined["cids"], mined["scores"]
    if fmt == "triplet":
        cols = {
            c: []
            for c in ("query_id", "positive_id", "negative_id", "positive_score", "negative_score", "negative_rank")
        }
        for row, q in enumerate(p["q"]):
            for j in p["picked"][row]:
                if j < 0:
                    continue
                cols["query_id"].append(qids[q])
                cols["positive_id"].append(p["pid"][row])
                cols["negative_id"].append(cids[q][j])
                cols["positive_score"].append(p["pscore"][row])
                cols["negative_score"].append(scores[q, j])
                cols["negative_rank"].append(int(j))
        return cols
    cols = {"query_id": [], "positive_id": [], "positive_score": []}
    for i in range(1, n + 1):
        cols |= {f"negative_{i}_id": [], f"negative_{i}_score": [], f"negative_{i}_rank": []}
    for row, q in enumerate(p["q"]):
        picked = p["picked"][row]
        if (picked < 0).any():
            continue  # an n-tuple needs all n negatives; the pair is counted in pairs_short
        cols["query_id"].append(qids[q])
        cols["positive_id"].append(p["pid"][row])
        cols["positive_score"].append(p["pscore"][row])
        for i, j in enumerate(picked, 1):
            cols[f"negative_{i}_id"].append(cids[q][j])
            cols[f"negative_{i}_score"].append(scores[q, j])
            cols[f"negative_{i}_rank"].append(int(j))
    return cols


def mine_shard(
    candidates: tuple[Folder, str],
    queries: tuple[Folder, str],
    corpus: tuple[Folder, list[str]],
    dst: tuple[Folder, str],
    rules: mining.Rules,
    fmt: str,
) -> dict:
    """Mine one query shard and write its output data file; returns counts and score samples."""
    t0 = time.perf_counter()
    cand = candidates[0].read_parquet(candidates[1])
    mined, counts = mine_candidates(cand, rules)
    cols = rows_for_output(mined, fmt, rules.num_negatives)
    id_cols = [c for c in cols if c.endswith("_id") and c != "query_id"]
    need = {d for c in id_cols for d in cols[c]}
    passages = _texts(corpus[0], corpus[1], need) if need else {}
    qt = queries[0].read_parquet(queries[1], columns=["id", "text"])
    qtext = dict(zip(qt.column("id").to_pylist(), qt.column("text").to_pylist(), strict=True))
    cols["query"] = [qtext[q] for q in cols["query_id"]]
    for c in id_cols:
        cols[c.removesuffix("_id")] = [passages[d] for d in cols[c]]
    table = conform(pa.table(cols), fmt, n=rules.num_negatives, where=dst[0].uri(dst[1]))
    dst[0].write_parquet(dst[1], table)
    counts["rows"] = table.num_rows
    rng = np.random.default_rng(0)
    pos = np.asarray(mined["pairs"]["pscore"], dtype=np.float32)
    picked = mined["pairs"]["picked"]
    neg_rows, neg_cols = np.nonzero(picked >= 0)
    neg = mined["scores"][mined["pairs"]["q"][neg_rows], picked[neg_rows, neg_cols]].astype(np.float32)
    ranks = picked[picked >= 0].astype(np.int32)
    sample = {"positive_scores": pos, "negative_scores": neg, "negative_ranks": ranks}
    for key, arr in sample.items():
        if len(arr) > SAMPLE:
            sample[key] = rng.choice(arr, SAMPLE, replace=False)
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    return {"counts": counts, "sample": sample}
