"""Batch composition (negprep.rules.batching) on hand-made rows: the invariants every plan must keep."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negprep.rules.batching import compose, fill, interleave, pack, split_files
from negprep.rules.guard import conflicting_pairs, guard_thresholds, known_positive_pairs, positive_keys, zscore_caps
from negprep.stages.cluster import cluster_count, sample_rows


def check_plan(cluster, query, texts, batch_size, partial, plan) -> None:
    """The invariants of a plan, for any input."""
    n = len(cluster)
    texts = np.asarray(texts).reshape(n, -1) if n else np.zeros((0, 1), dtype=np.int64)
    c = plan.counts
    # every row exactly once, unless dropped and counted
    assert len(plan.order) == len(set(plan.order.tolist())) == c["rows_batched"]
    assert c["rows_batched"] + c["rows_left_out"] == c["rows"] == n
    assert plan.order.min(initial=0) >= 0 and plan.order.max(initial=-1) < n
    if partial == "keep":
        assert c["rows_left_out"] == 0 and sorted(plan.order.tolist()) == list(range(n))
    # batches are contiguous and numbered 0, 1, ... in output order
    bid = plan.batch_id
    assert len(bid) == len(plan.order)
    assert (np.diff(bid) >= 0).all() and (np.diff(bid) <= 1).all() and (len(bid) == 0 or bid[0] == 0)
    sizes = np.bincount(bid, minlength=len(plan.mixed))
    assert len(sizes) == len(plan.mixed) == c["batches"]
    assert (sizes >= 1).all() and (sizes <= batch_size).all()
    if partial != "keep":
        assert (sizes == batch_size).all()  # a reader slicing by batch_size sees exactly these batches
    assert int((sizes < batch_size).sum()) == c["batches_short"]
    assert int(plan.mixed.sum()) == c["batches_mixed"]
    assert sum(int(s) for s, m in zip(sizes, plan.mixed, strict=True) if m) == c["rows_merged"]
    if partial != "merge":
        assert c["batches_mixed"] == 0
    for b in range(len(sizes)):
        rows = plan.order[bid == b]
        if not plan.mixed[b]:
            assert len(set(cluster[rows].tolist())) == 1, "a batch draws from one cluster"
        # no key (query or text) in two rows of one batch
        owners = Counter(k for r in rows for k in {int(query[r]), *texts[r].tolist()})
        assert max(owners.values()) == 1


def test_triplets_of_one_cluster_fill_whole_batches():
    # 8 queries x 3 triplets, each query its own positive and negatives: 24 rows, batches of 4
    q = np.repeat(np.arange(8), 3)
    texts = np.stack([100 + q, 1000 + np.arange(24)], axis=1)
    plan = compose(np.zeros(24), q, texts, 4, seed=1)
    check_plan(np.zeros(24), q, texts, 4, "merge", plan)
    assert plan.counts["batches"] == 6 and plan.counts["rows_left_out"] == 0 and plan.counts["batches_mixed"] == 0


def test_shared_negative_never_twice_in_a_batch():
    # every query's rows use negative 7 or 8: a batch can hold each at most once
    q = np.arange(500, 512)
    texts = np.stack([100 + q, 7 + (q % 2)], axis=1)
    plan = compose(np.zeros(12), q, texts, 2, seed=0, partial="keep")
    check_plan(np.zeros(12), q, texts, 2, "keep", plan)
    assert plan.counts["batches"] == 6 and plan.counts["batches_short"] == 0


def test_same_text_under_two_ids_is_one_key():
    # rows 0 and 1: query text of row 1 equals the positive text of row 0 (same key)
    q = np.array([1, 2])
    texts = np.array([[2, 10], [20, 30]])
    plan = compose(np.zeros(2), q, texts, 2, seed=0, partial="keep")
    assert plan.counts["batches"] == 2


@pytest.mark.parametrize("partial", ["merge", "drop", "keep"])
def test_cluster_ends(partial):
    # cluster 0: 5 queries (one row each), cluster 1: 3; batches of 2 -> one short batch per cluster
    cluster = np.array([0] * 5 + [1] * 3)
    q = np.arange(8)
    texts = (100 + q)[:, None]
    plan = compose(cluster, q, texts, 2, seed=3, partial=partial)
    check_plan(cluster, q, texts, 2, partial, plan)
    c = plan.counts
    if partial == "merge":  # the two leftover rows (one per cluster) make one mixed batch
        assert (c["batches"], c["batches_mixed"], c["rows_merged"], c["rows_left_out"]) == (4, 1, 2, 0)
    elif partial == "drop":
        assert (c["batches"], c["rows_left_out"]) == (3, 2)
    else:
        assert (c["batches"], c["batches_short"]) == (5, 2)


def test_merge_drops_what_cannot_fill_a_batch_and_counts_it():
    # one query with 3 rows in its own cluster: no batch of 2 can hold it twice
    cluster = np.zeros(3)
    q = np.zeros(3)
    texts = np.array([[1, 2], [1, 3], [1, 4]])
    plan = compose(cluster, q, texts, 2, seed=0, partial="merge")
    check_plan(cluster, q, texts, 2, "merge", plan)
    assert plan.counts["rows_left_out"] == 3 and plan.counts["batches"] == 0


def test_seeded_and_shuffled():
    rng = np.random.default_rng(0)
    cluster = rng.integers(0, 4, 400)
    q = rng.integers(0, 120, 400) + 1000 * cluster  # a query belongs to one cluster
    texts = rng.integers(10_000, 20_000, (400, 2))
    a = compose(cluster, q, texts, 8, seed=5)
    b = compose(cluster, q, texts, 8, seed=5)
    c = compose(cluster, q, texts, 8, seed=6)
    assert (a.order == b.order).all() and (a.batch_id == b.batch_id).all()
    assert not np.array_equal(a.order, c.order)
    # batch order is shuffled: clusters do not come in one run each
    first = cluster[a.order][np.r_[0, np.flatnonzero(np.diff(a.batch_id)) + 1]]
    assert (np.diff(first) != 0).sum() > 4


def test_interleave_spreads_rows_that_share_a_key():
    q = np.array([5, 5, 5, 6, 6, 7])
    texts = np.arange(6)[:, None] + 100  # distinct passages: the query is each row's most shared key
    position, prio = interleave(np.zeros(6), q, texts, np.random.default_rng(0))
    # evenly over [0, 1): a query's first row near the start, its last near the end, whatever its count
    assert sorted(position[q == 5].tolist()) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert sorted(position[q == 6].tolist()) == [0.25, 0.75] and position[q == 7].tolist() == [0.5]
    assert len(set(prio[[0, 3, 5]].tolist())) == 3 and len(set(prio[q == 5].tolist())) == 1
    # a passage that four queries share as a negative is spread by itself; in another cluster it counts apart
    q4, shared = np.arange(4), np.full((4, 1), 99)
    position, _ = interleave(np.array([0, 0, 0, 1]), q4, shared, np.random.default_rng(0))
    assert sorted(position[:3].tolist()) == pytest.approx([1 / 6, 1 / 2, 5 / 6]) and position[3] == 0.5


def test_pack_window_bounds_look_ahead():
    keys = [(0,), (0,), (1,)]
    assert pack(np.arange(3), keys, 2, window=2) == [[0], [1, 2]]
    assert pack(np.arange(3), keys, 2, window=3) == [[0, 2], [1]]


def test_split_files_keeps_batches_whole():
    cuts = split_files(np.array([4, 4, 4, 4, 4]), 2)
    assert cuts.tolist() in ([0, 8, 20], [0, 12, 20])
    assert split_files(np.array([3, 3]), 1).tolist() == [0, 6]
    assert split_files(np.array([], dtype=np.int64), 1).tolist() == [0, 0]


def test_rebalance_moves_boundary_queries_until_clusters_fill_whole_batches():
    from negprep.rules.batching import rebalance

    # cluster 0: 6 one-row queries, cluster 1: 4, cluster 2: 2; batch size 4
    cluster = np.array([0] * 6 + [1] * 4 + [2] * 2)
    query = np.arange(12)
    second = np.array([1, 2, 1, 1, 2, 2, 0, 0, 2, 2, 1, 1])
    margin = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])
    got = rebalance(cluster, query, second, margin, batch_size=4)
    # cluster 0 gives its two nearest-the-boundary queries (margins 0.1, 0.2: both to cluster 2)
    assert got.tolist() == [0, 2, 0, 0, 2, 0, 1, 1, 1, 1, 2, 2]
    assert [int((got == c).sum()) % 4 for c in range(3)] == [0, 0, 0]
    # a query's rows move together; nothing moves to a cluster already closed or without a second choice
    two = rebalance(np.array([0, 0, 0]), np.array([7, 7, 8]), np.array([1, 1, -1]), np.array([0.1, 0.1, 0.0]), 2)
    assert two.tolist() == [0, 0, 0]
    plan = compose(cluster, query, np.zeros((12, 1), dtype=np.int64) + query[:, None] + 100, 4, 7, "merge",
                   second=second, margin=margin)
    assert plan.counts["batches_mixed"] == 0 and plan.counts["rows_moved"] == 2
    assert sorted(plan.cluster.tolist()) == sorted(got.tolist())


def test_cluster_count():
    assert cluster_count(809, None, 32) == 6  # 809 // (4 * 32)
    assert cluster_count(809, None, 32, rows=919 * 5) == 6  # rows allow 17: the queries bound k
    assert cluster_count(809, None, 32, rows=919) == 3  # one negative: 919 // (8 * 32)
    assert cluster_count(809, 16, 32, rows=919) == 16  # an explicit k is kept
    assert cluster_count(50, None, 32) == 1
    assert cluster_count(50, 80, None) == 50  # never more clusters than queries
    assert cluster_count(500, 7, 32) == 7


def test_sample_rows_is_seeded_and_sorted():
    assert sample_rows(10, 20, 1) is None
    a = sample_rows(1000, 50, 1)
    assert len(set(a.tolist())) == 50 and (np.diff(a) > 0).all()
    assert (a == sample_rows(1000, 50, 1)).all() and not (a == sample_rows(1000, 50, 2)).all()


@st.composite
def row_sets(draw):
    n = draw(st.integers(0, 80))
    clusters = draw(st.integers(1, 4))
    cluster = np.array(draw(st.lists(st.integers(0, clusters - 1), min_size=n, max_size=n)), dtype=np.int64)
    qpool = draw(st.integers(1, 30))
    query = np.array(draw(st.lists(st.integers(0, qpool), min_size=n, max_size=n)), dtype=np.int64)
    query = query * 8 + cluster  # a query's rows share its cluster, as in a real output
    m = draw(st.integers(1, 3))
    tpool = draw(st.integers(1, 60))
    # text keys may collide with each other and with query keys: both are text hashes
    texts = np.array(draw(st.lists(st.integers(0, tpool), min_size=n * m, max_size=n * m)), dtype=np.int64)
    return cluster, query, texts.reshape(n, m)


@settings(max_examples=150, deadline=None)
@given(
    rows=row_sets(),
    batch_size=st.integers(1, 6),
    partial=st.sampled_from(["merge", "drop", "keep"]),
    seed=st.integers(0, 2**32),
    window=st.sampled_from([None, 1, 3]),
)
def test_invariants_hold_for_any_rows(rows, batch_size, partial, seed, window):
    cluster, query, texts = rows
    plan = compose(cluster, query, texts, batch_size, seed, partial, window)
    check_plan(cluster, query, texts, batch_size, partial, plan)


def test_batch_step_on_staged_ntuple_files(tmp_path):
    """compose_plan + write_part (the Ray tasks' bodies) over two staged files, without Ray."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from negprep.config import parse_job
    from negprep.input.shards import text_key
    from negprep.output.writer import Writer
    from negprep.paths import Folder
    from negprep.schemas import schema
    from negprep.stages.batch import compose_plan, passage_id_columns, write_part

    texts = {f"p{i}": f"positive {i}" for i in range(8)} | {f"x{i}": f"other {i}" for i in range(8)}
    texts |= {"d0": "Shared  Passage", "d0copy": "shared passage", "d1": "another shared one"}
    corpus = Folder(str(tmp_path / "corpus"))
    corpus.write_parquet("00000.parquet", pa.table({"id": list(texts), "text": list(texts.values()),
                                                    "text_key": [text_key(t) for t in texts.values()]}))
    queries = Folder(str(tmp_path / "queries"))
    queries.write_parquet("00000.parquet", pa.table({"id": [f"q{i}" for i in range(8)],
                                                     "text": [f"query {i}" for i in range(8)]}))
    # q0..q3 in cluster 0, q4..q7 in cluster 1; the first negative is d0, its copy or d1
    first = ["d0", "d0copy", "d1", "d0", "d1", "d0copy", "d1", "d0"]
    rows = [{"query_id": f"q{i}", "positive_id": f"p{i}", "negative_1_id": first[i], "negative_2_id": f"x{i}",
             "cluster_id": i // 4} for i in range(8)]
    target = schema("ntuple", n=2, groups=("clusters",))
    staged = Folder(str(tmp_path / "staged"))
    for f, part in enumerate((rows[:5], rows[5:])):
        cols = {}
        for field in target:
            name = field.name
            if name in part[0]:
                cols[name] = [r[name] for r in part]
            elif name == "query":
                cols[name] = [f"query {r['query_id'][1:]}" for r in part]
            elif pa.types.is_string(field.type):
                cols[name] = [texts[r[name + "_id"]] for r in part]
            elif pa.types.is_list(field.type):
                cols[name] = [[0.5, 0.25, 0.125]] * len(part)
            else:
                cols[name] = [0] * len(part)
        staged.write_parquet(f"train-{f:05d}-of-00002.parquet", pa.table(cols, schema=target))
    names = staged.ls(".parquet")
    ids = passage_id_columns("ntuple", 2)
    assert ids == ["positive_id", "negative_1_id", "negative_2_id"]
    job = parse_job({"input": str(tmp_path), "output": str(tmp_path / "out"), "format": "ntuple", "num_negatives": 2,
                     "batch_size": 2, "seed": 7, "partial_batches": "keep"})
    staged_files = staged.files(names)
    stats, plan = compose_plan(staged_files, corpus.files(["00000.parquet"]), queries.files(["00000.parquet"]), job)
    assert stats["rows"] == stats["rows_batched"] == 8 and stats["files"] == 2
    writer = Writer(Folder(str(tmp_path / "out")), "ntuple", 2, staged)
    written = [write_part(staged_files, plan, i, writer.data_file(i, 2), writer) for i in range(2)]
    assert sum(written) == 8
    table = pq.read_table(str(tmp_path / "out"))
    assert table.schema.equals(schema("ntuple", n=2, groups=("clusters", "batches")))
    got = table.to_pylist()
    assert sorted(r["query_id"] for r in got) == [f"q{i}" for i in range(8)]
    by_batch: dict[int, list[dict]] = {}
    for r in got:
        by_batch.setdefault(r["batch_id"], []).append(r)
    assert [r["batch_id"] for r in got] == sorted(r["batch_id"] for r in got)
    for batch in by_batch.values():
        assert len({r["cluster_id"] for r in batch}) == 1
        # d0 and its copy (same normalised text) count as one passage
        assert sum(r["negative_1_id"] in ("d0", "d0copy") for r in batch) <= 1
        assert sum(r["negative_1_id"] == "d1" for r in batch) <= 1


def test_fill_swaps_clashing_end_rows_into_full_batches():
    # rows 0 and 1 share passage 100 and come last: greedy packing leaves 3 + 1 rows at the end
    keys = [(i, 100) if i < 2 else (i, 1000 + i) for i in range(8)]
    greedy = pack(np.array([2, 3, 4, 5, 6, 7, 0, 1]), keys, 4, 8)
    assert [len(b) for b in greedy] == [4, 3, 1]
    filled = fill(greedy, keys, 4)
    assert [len(b) for b in filled] == [4, 4]
    assert sorted(r for b in filled for r in b) == list(range(8))
    for b in filled:
        used = [k for r in b for k in keys[r]]
        assert len(used) == len(set(used))


def test_fill_completes_a_group_whenever_swaps_allow():
    # 3 batches of 4; passage 100 is in 3 rows, so it needs all 3 batches
    keys = [(i, 100) if i in (0, 1, 2) else (i, 1000 + i) for i in range(12)]
    greedy = pack(np.array([3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2]), keys, 4, 3)
    assert len(greedy) > 3
    filled = fill(greedy, keys, 4)
    assert [len(b) for b in filled] == [4, 4, 4]
    assert sorted(r for b in filled for r in b) == list(range(12))
    assert all(sum(100 in keys[r] for r in b) == 1 for b in filled)


# in-batch guard: five rows of 2-d vectors, (positive, negative) each; rows 0 and 2 share a query
GUARD_Q = np.array([[1, 0], [0, 1], [1, 0], [-1, 0], [0, 1]], dtype=np.float64)
GUARD_P = np.array([
    [[0.8, 0.6], [0, 0.5]],
    [[0.6, 0.8], [1, 0]],
    [[0.9, 0.1], [0, 1]],
    [[-0.9, 0.1], [0, 0.95]],
    [[0.28, 0.96], [0, -1]],
])
GUARD_POS = np.array([0.8, 0.8, 0.9, 0.9, 0.96])  # each row's query . its positive
GUARD_KEY = np.array([1, 2, 1, 3, 4])


def _pairs(**rule) -> list[tuple[int, int]]:
    rule = {"absolute": 0.0, **rule}  # GISTEmbed's rule: a passage above the query's own positive
    return [tuple(p) for p in conflicting_pairs(GUARD_Q, GUARD_P, GUARD_POS, GUARD_KEY, **rule).tolist()]


def test_guard_thresholds_follow_the_mining_margins():
    pos = np.array([[0.8, 0.6, np.nan], [-0.2, np.nan, np.nan]])  # the lowest positive is the reference
    assert np.isinf(guard_thresholds(pos)).all()  # no rule: the miner keeps everything, so nothing conflicts
    assert guard_thresholds(pos, relative=0.1).tolist() == pytest.approx([0.54, -0.22])
    assert guard_thresholds(pos, absolute=0.1).tolist() == pytest.approx([0.5, -0.3])
    assert guard_thresholds(pos, relative=0.1, absolute=0.05).tolist() == pytest.approx([0.54, -0.25])
    assert guard_thresholds(np.array([0.6, 0.4]), max_score=0.5).tolist() == pytest.approx([0.5, 0.5])
    assert guard_thresholds(np.array([0.6, 0.4]), absolute=0.0, max_score=0.5).tolist() == pytest.approx([0.5, 0.4])


def test_conflicting_pairs_hand_computed():
    # absolute 0.0 (a passage above the query's own positive): (0, 1) by row 1's negative for
    # query 0 (1.0 > 0.8); (1, 3) by row 3's negative for
    # query 1 (0.95 > 0.8); (1, 2), (1, 4), (2, 4) likewise; row 0's passages score 0.6 and 0.5 for
    # query 1: not above 0.8 (one direction is enough). Rows 0 and 2 share a query: never a pair,
    # although row 2's positive scores 0.9 > 0.8 for query 0
    base = [(0, 1), (1, 2), (1, 3), (1, 4), (2, 4)]
    assert _pairs() == base
    key = GUARD_KEY.copy()
    key[2] = 5
    assert [0, 2] in conflicting_pairs(GUARD_Q, GUARD_P, GUARD_POS, key, absolute=0.0).tolist()
    # no rule at all (naive mining keeps every candidate): nothing is positive-like
    assert conflicting_pairs(GUARD_Q, GUARD_P, GUARD_POS, GUARD_KEY).shape == (0, 2)
    # the larger row finds it: row 4's threshold 0.96 - 0.05 = 0.91 < 0.95 (row 3's negative)
    assert _pairs(absolute=0.05) == sorted([*base, (3, 4)])
    assert _pairs(relative=0.05) == sorted([*base, (3, 4)])  # 0.96 x 0.95 = 0.912
    assert _pairs(relative=0.01) == base  # 0.9504 > 0.95
    assert _pairs(max_score=0.9) == sorted([*base, (3, 4)])  # the cap lowers row 4's threshold
    assert _pairs(max_score=0.5) == sorted([*base, (0, 4), (3, 4)])  # 0.6 (row 0's positive) for query 4
    # the rows' order does not matter: both directions are checked
    rev = conflicting_pairs(GUARD_Q[::-1], GUARD_P[::-1], GUARD_POS[::-1], GUARD_KEY[::-1], absolute=0.0)
    assert sorted(tuple(sorted((4 - i, 4 - j))) for i, j in rev.tolist()) == base
    # a 2-d positive (several, NaN padded) takes the lowest; one row alone has no pair
    two = np.c_[GUARD_POS, np.full(5, np.nan)]
    assert [tuple(p) for p in conflicting_pairs(GUARD_Q, GUARD_P, two, GUARD_KEY, absolute=0.0).tolist()] == base
    assert conflicting_pairs(GUARD_Q[:1], GUARD_P[:1], GUARD_POS[:1], GUARD_KEY[:1]).shape == (0, 2)


def test_zscore_caps_follow_the_vetting_rule():
    from negprep.rules.mining import window_zscores

    window = np.array([[0.1, 0.2, 0.3, 0.9, np.nan], [0.5, 0.5, np.nan, np.nan, np.nan], [0.4] + [np.nan] * 4])
    caps = zscore_caps(window, 1.5)
    # row 0: mean 0.375, std 0.3112 -> 0.842; the candidate at 0.9 is above it, as window_zscores says
    assert caps[0] == pytest.approx(0.375 + 1.5 * np.sqrt(((window[0, :4] - 0.375) ** 2).mean()))
    z = window_zscores(window[:1], np.isfinite(window[:1]))
    assert ((z[0, :4] > 1.5) == (window[0, :4] > caps[0])).all()
    assert np.isinf(caps[1:]).all()  # all equal, or one score: no outlier
    # the cap joins the margins: with no margin at all, only the z-score bound separates rows
    two = np.array([caps[0], np.inf, np.inf, np.inf, np.inf])
    got = conflicting_pairs(GUARD_Q, GUARD_P, GUARD_POS, GUARD_KEY, cap=two).tolist()
    assert got and all(0 in p for p in got)  # only row 0's query has a bound: every pair involves it
    assert conflicting_pairs(GUARD_Q, GUARD_P, GUARD_POS, GUARD_KEY, cap=np.full(5, np.inf)).shape == (0, 2)


def test_known_positive_pairs_share_positives_of_the_same_question_text():
    # rows 0 and 1 ask the same question (key 1) with different answers (10, 11): both are its positives
    query = np.array([1, 1, 2, 3])
    texts = np.array([[10, 20], [11, 21], [30, 11], [40, 10]])
    known = positive_keys(query, texts)
    assert known == {1: {10, 11}, 2: {30}, 3: {40}}
    # rows 2 and 3 hold an answer of question 1 as a negative: a false negative of rows 0 and 1 both
    assert known_positive_pairs(query, texts, known).tolist() == [[0, 2], [0, 3], [1, 2], [1, 3]]
    # rows of one question never pair (the packer separates them); positives only, not negatives
    assert known_positive_pairs(query[:2], texts[:2], known).shape == (0, 2)
    assert known_positive_pairs(np.array([2, 3]), np.array([[30, 40], [41, 42]]), known).tolist() == [[0, 1]]


def _guard(pairs: np.ndarray, calls: list | None = None):
    """A `conflicts` callable returning the given pairs that lie inside the rows asked about."""
    def conflicts(rows: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(rows.copy())
        return pairs[np.isin(pairs, rows).all(axis=1)]
    return conflicts


def _random_rows(rng: np.random.Generator, n: int, clusters: int):
    cluster = rng.integers(0, clusters, n)
    query = rng.integers(0, n // 3, n) * 8 + cluster  # a query's rows share its cluster
    texts = rng.integers(10_000, 10_000 + 3 * n, (n, 2))
    return cluster, query, texts


def _together(plan, pairs: np.ndarray) -> int:
    """How many pairs share a batch of the plan."""
    batch_of = np.full(int(plan.counts["rows"]), -1)
    batch_of[plan.order] = plan.batch_id
    a, b = batch_of[pairs[:, 0]], batch_of[pairs[:, 1]]
    return int(((a >= 0) & (a == b)).sum())


@pytest.mark.parametrize("partial", ["merge", "drop", "keep"])
def test_guard_keeps_conflicting_rows_apart(partial):
    rng = np.random.default_rng(11)
    for trial in range(4):
        n, batch_size = 400, int(rng.integers(2, 9))
        cluster, query, texts = _random_rows(rng, n, 4)
        keys = [{int(q), *t.tolist()} for q, t in zip(query, texts, strict=True)]
        # pairs inside one cluster that the text keys do not separate already: all of them are found
        cand = rng.integers(0, n, (3 * n, 2))
        ok = [(min(a, b), max(a, b)) for a, b in cand.tolist()
              if a != b and cluster[a] == cluster[b] and keys[a].isdisjoint(keys[b])]
        pairs = np.array(sorted(set(ok)), dtype=np.int64)
        calls: list = []
        plan = compose(cluster, query, texts, batch_size, trial, partial, conflicts=_guard(pairs, calls))
        check_plan(cluster, query, texts, batch_size, partial, plan)
        assert _together(plan, pairs) == 0
        bare = compose(cluster, query, texts, batch_size, trial, partial)
        c = plan.counts
        assert c["guard_pairs"] == len(pairs) and c["guard_pairs_separated"] == _together(bare, pairs) > 0
        assert c["rows_left_out_by_guard"] == max(0, c["rows_left_out"] - bare.counts["rows_left_out"])
        # one call per cluster before packing it, then one on the merge pool
        assert [len(set(cluster[r].tolist())) for r in calls[:4]] == [1, 1, 1, 1]
        pooled = c["rows_merged"] + c["rows_left_out"]  # with merge: every leftover, mixed or dropped
        assert len(calls) == 4 + (partial == "merge" and pooled >= 2)


@settings(max_examples=100, deadline=None)
@given(rows=row_sets(), batch_size=st.integers(1, 5), partial=st.sampled_from(["merge", "drop", "keep"]),
       seed=st.integers(0, 2**32), data=st.data())
def test_guard_invariants_hold_for_any_rows_and_pairs(rows, batch_size, partial, seed, data):
    cluster, query, texts = rows
    n = len(cluster)
    pairs = np.array(data.draw(st.lists(st.tuples(st.integers(0, max(0, n - 1)), st.integers(0, max(0, n - 1))),
                                        max_size=3 * n)), dtype=np.int64).reshape(-1, 2)
    plan = compose(cluster, query, texts, batch_size, seed, partial, conflicts=_guard(pairs))
    check_plan(cluster, query, texts, batch_size, partial, plan)
    assert _together(plan, pairs[pairs[:, 0] != pairs[:, 1]]) == 0
    c = plan.counts
    assert 0 <= c["guard_pairs_separated"] <= c["guard_pairs"] <= len(pairs)
    assert 0 <= c["rows_left_out_by_guard"] <= c["rows_left_out"]


def test_guard_pairs_across_clusters_are_kept_out_of_mixed_batches():
    # as in test_cluster_ends: one leftover row per cluster, which merge pools into a mixed batch
    cluster = np.array([0] * 5 + [1] * 3)
    q = np.arange(8)
    texts = (100 + q)[:, None]
    every = np.array([(a, b) for a in range(5) for b in range(5, 8)])  # every row of 0 against every row of 1
    plan = compose(cluster, q, texts, 2, seed=3, conflicts=_guard(every))
    check_plan(cluster, q, texts, 2, "merge", plan)
    c = plan.counts
    assert (c["batches"], c["batches_mixed"], c["rows_left_out"]) == (3, 0, 2)
    assert (c["guard_pairs"], c["guard_pairs_separated"], c["rows_left_out_by_guard"]) == (1, 1, 2)
    # with many random cross-cluster pairs too: none in a batch, counts add up
    rng = np.random.default_rng(5)
    cluster, query, texts = _random_rows(rng, 300, 6)
    pairs = rng.integers(0, 300, (900, 2))
    plan = compose(cluster, query, texts, 4, 1, "merge", conflicts=_guard(pairs))
    check_plan(cluster, query, texts, 4, "merge", plan)
    assert _together(plan, pairs[pairs[:, 0] != pairs[:, 1]]) == 0
    assert plan.counts["guard_pairs_separated"] <= plan.counts["guard_pairs"] > 0


def test_no_conflicts_leave_the_plan_as_it_was():
    rng = np.random.default_rng(3)
    cluster, query, texts = _random_rows(rng, 500, 5)
    second, margin = (cluster + 1) % 5, rng.random(500)
    for partial in ("merge", "drop", "keep"):
        bare = compose(cluster, query, texts, 8, 4, partial, second=second, margin=margin)
        none = compose(cluster, query, texts, 8, 4, partial, second=second, margin=margin,
                       conflicts=lambda rows: np.zeros((0, 2), dtype=np.int64))
        for a in ("order", "batch_id", "mixed", "cluster"):
            assert np.array_equal(getattr(bare, a), getattr(none, a))
        assert bare.counts == none.counts
        assert {k: bare.counts[k] for k in ("guard_pairs", "guard_pairs_separated", "rows_left_out_by_guard")} == {
            "guard_pairs": 0, "guard_pairs_separated": 0, "rows_left_out_by_guard": 0}


def test_guard_conflicts_read_the_scorers_embeddings(tmp_path):
    """The batch stage's scorer: vectors by id from embedding files, each query's lowest positive
    (from the candidates, written rows or not) as the reference, and a clear error for a missing vector."""
    import pyarrow as pa

    from negprep.errors import NegprepError
    from negprep.models.vectors import embedding_table
    from negprep.paths import Folder
    from negprep.stages.batch import GuardScorer, guard_conflicts

    def files(name: str, table: pa.Table):
        folder = Folder(str(tmp_path / name))
        folder.write_parquet("00000.parquet", table)
        return folder.files(["00000.parquet"])

    def emb(vecs: dict[str, list[float]]):
        return embedding_table(list(vecs), np.array(list(vecs.values()), dtype=np.float32))

    queries = files("q", emb({"q0": [1, 0], "q1": [0, 1], "q2": [-1, 0]}))
    vecs = {"p0": [0.8, 0.6], "n0": [0, 0.5], "p1": [0.6, 0.8], "n1": [1, 0], "p2": [-0.9, 0.1],
            "n2": [0.55, -0.3], "p0b": [0.5, 0]}
    qids = np.array(["q0", "q1", "q2"], dtype=object)
    pids = np.array([["p0", "n0"], ["p1", "n1"], ["p2", "n2"]], dtype=object)
    rows = np.arange(3)
    texts = np.array([[10, 11], [12, 13], [14, 15]])

    def scorer(positives: list[list[str]], passages: dict) -> GuardScorer:
        cand = files("c", pa.table({"query_id": list(qids), "positive_ids": positives}))
        return GuardScorer("m", queries, files("p", emb(passages)), cand, absolute_margin=0.0)

    # row 1's negative scores 1.0 for q0 (its positive 0.8); n2 scores 0.55 for q0: above its second
    # positive p0b (0.5), which no written row holds but which sets q0's reference
    got = guard_conflicts(scorer([["p0", "p0b"], ["p1"], ["p2"]], vecs), qids, pids, np.array([1, 2, 3]), texts)
    assert got(rows).tolist() == [[0, 1], [0, 2]]
    assert np.sort(got(np.array([2, 0])), axis=1).tolist() == [[0, 2]]  # input rows, not positions
    got = guard_conflicts(scorer([["p0"], ["p1"], ["p2"]], vecs), qids, pids, np.array([1, 2, 3]), texts)
    assert got(rows).tolist() == [[0, 1]]
    # a passage whose text is another row's labelled positive conflicts whatever it scores, and
    # without a scorer (a rule that vets nothing) only those pairs are found
    copy = np.array([[10, 11], [12, 13], [14, 10]])
    assert guard_conflicts(None, qids, pids, np.array([1, 2, 3]), copy)(rows).tolist() == [[0, 2]]
    assert guard_conflicts(None, qids, pids, np.array([1, 2, 3]), texts)(rows).shape == (0, 2)
    got = guard_conflicts(scorer([["p0"], ["p1"], ["p2"]], vecs), qids, pids, np.array([1, 2, 3]), copy)
    assert sorted(got(rows).tolist()) == [[0, 1], [0, 2]]
    with pytest.raises(NegprepError, match="1 passages have no embedding"):
        guard_conflicts(scorer([["p0"], ["p1"], ["p2"]], {k: v for k, v in vecs.items() if k != "n2"}),
                        qids, pids, np.array([1, 2, 3]), texts)
