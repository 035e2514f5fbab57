"""The mining rules on hand-made scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from negprep.rules import mining
from negprep.rules.candidates import mine_candidates
from negprep.rules.mining import KEEP, OUTSIDE, REASONS, Rules, choose, classify, margin_thresholds

from .conftest import rows_for_output

CODE = {name: i + 1 for i, name in enumerate(REASONS)}


def test_relative_margin_moves_threshold_down_for_negative_scores():
    thr = margin_thresholds(np.array([0.8, -0.2, 0.0]), relative=0.1, absolute=None)
    np.testing.assert_allclose(thr, [0.72, -0.22, 0.0])


def test_relative_margin_drops_above_threshold_with_negative_positive_score():
    # positive scores -0.2: threshold -0.22; -0.21 is too close (drop), -0.25 is fine (keep)
    code = classify(np.array([[-0.21, -0.25]]), np.array([-0.2]), Rules(relative_margin=0.1, range_max=2))
    assert code.tolist() == [[CODE["relative_margin"], KEEP]]


def test_absolute_margin_and_score_bounds_are_counted_once_each():
    scores = np.array([[0.95, 0.81, 0.6, 0.1, 0.05]])
    rules = Rules(absolute_margin=0.05, max_score=0.9, min_score=0.08, range_max=5)
    code = classify(scores, np.array([0.85]), rules)
    # 0.95 > max_score (checked first), 0.81 > 0.85-0.05, 0.6 and 0.1 kept, 0.05 < min_score
    assert code.tolist() == [[CODE["max_score"], CODE["absolute_margin"], KEEP, KEEP, CODE["min_score"]]]
    counts = mining.reason_counts(code)
    assert counts["candidates"] == 5
    assert counts["kept"] + sum(counts[f"dropped_{r}"] for r in REASONS) == counts["candidates"]


def test_threshold_tie_is_kept():
    code = classify(np.array([[0.5]]), np.array([0.5]), Rules(absolute_margin=0.0, range_max=1))
    assert code[0, 0] == KEEP


def test_window_and_padding_are_outside():
    scores = np.array([[0.9, 0.8, 0.7, np.nan]])
    code = classify(scores, np.array([1.0]), Rules(range_min=1, range_max=3))
    assert code.tolist() == [[OUTSIDE, KEEP, KEEP, OUTSIDE]]


def test_unknown_positive_score_keeps_nothing_under_margins():
    code = classify(np.array([[0.1, 0.2]]), np.array([np.nan]), Rules(relative_margin=0.05, range_max=2))
    assert (code == CODE["relative_margin"]).all()


def test_num_negatives_larger_than_window():
    keep = np.array([[True, False, True]])
    assert choose(keep, 5, "top").tolist() == [[0, 2, -1, -1, -1]]


def test_random_sampling_is_reproducible_and_row_independent():
    keep = np.ones((3, 20), dtype=bool)
    seeds = np.array([mining.row_seed(1, "q", str(i)) for i in range(3)], dtype=np.uint64)
    a = choose(keep, 4, "random", seeds)
    b = choose(keep[1:2], 4, "random", seeds[1:2])
    assert (a[1] == b[0]).all()
    assert (np.diff(a, axis=1) > 0).all()  # nearest first, no repeats
    other = choose(keep, 4, "random", np.array([mining.row_seed(2, "q", str(i)) for i in range(3)], dtype=np.uint64))
    assert not (a == other).all()


def _cand(rows):
    return pa.table(
        {
            "query_id": [r[0] for r in rows],
            "candidate_ids": [r[1] for r in rows],
            "candidate_scores": [r[2] for r in rows],
            "positive_ids": [r[3] for r in rows],
            "positive_scores": [r[4] for r in rows],
        }
    )


def test_uneven_positives_use_each_querys_own_lowest_positive():
    # q1 has two positives (lowest 0.5), q2 one positive (0.9): the margin must use each query's own
    cand = _cand(
        [
            ("q1", ["a", "b", "c"], [0.6, 0.45, 0.3], ["p1", "p2"], [0.9, 0.5]),
            ("q2", ["a", "b", "c"], [0.6, 0.45, 0.3], ["p3"], [0.9]),
        ]
    )
    mined, counts = mine_candidates(cand, Rules(num_negatives=2, range_max=3, absolute_margin=0.0))
    cols = rows_for_output(mined, "triplet", 2)
    got = {(q, p): [] for q, p in zip(cols["query_id"], cols["positive_id"], strict=True)}
    for q, p, n in zip(cols["query_id"], cols["positive_id"], cols["negative_id"], strict=True):
        got[(q, p)].append(n)
    assert got == {("q1", "p1"): ["b", "c"], ("q1", "p2"): ["b", "c"], ("q2", "p3"): ["a", "b"]}
    assert counts["pairs"] == 3 and counts["negatives"] == 6 and counts["dropped_absolute_margin"] == 1


def test_short_queries_are_counted_not_padded():
    cand = _cand([("q1", ["a"], [0.1], ["p"], [0.9]), ("q2", [], [], ["p"], [0.8])])
    mined, counts = mine_candidates(cand, Rules(num_negatives=3, range_max=10))
    cols = rows_for_output(mined, "triplet", 3)
    assert cols["negative_id"] == ["a"]
    assert counts["queries_short"] == 2 and counts["queries_without_candidates"] == 1
    assert counts["pairs_short"] == 2
    nt = rows_for_output(mined, "ntuple", 3)
    assert nt["query_id"] == []  # an n-tuple needs all n


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_positive_never_a_negative(sampling):
    rng = np.random.default_rng(0)
    rows = []
    for q in range(30):
        cands = [f"d{i}" for i in rng.permutation(40)[:25]]
        rows.append((f"q{q}", cands, sorted(rng.random(25).tolist(), reverse=True), [f"p{q}"], [0.7]))
    mined, _ = mine_candidates(_cand(rows), Rules(num_negatives=5, range_max=25, sampling=sampling))
    cols = rows_for_output(mined, "triplet", 5)
    assert len(cols["negative_id"]) == 150
    assert not any(n.startswith("p") for n in cols["negative_id"])
