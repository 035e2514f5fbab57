"""The guide model: its rules on hand-made scores, and jobs with tiny bi- and cross-encoder guides."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.rules.candidates import mine_candidates
from negprep.rules.mining import KEEP, OUTSIDE, REASONS, Rules, classify, reason_counts, window_zscores
from negprep.runner import run_job
from negprep.schemas import schema
from negprep.stages.mine import dropped_rows
from negprep.stages.mine import rules as job_rules

from .conftest import build_tiny_bert, rows_for_output

CODE = {name: i + 1 for i, name in enumerate(REASONS)}


def test_gist_rule_drops_candidates_the_guide_scores_above_the_positive():
    scores = np.array([[0.9, 0.8, 0.7]])
    guide = np.array([[0.50, 0.71, 0.69]])  # guide positive score 0.7
    code = classify(scores, np.array([0.95]), Rules(range_max=3, guide_absolute_margin=0.0), guide, np.array([0.7]))
    assert code.tolist() == [[KEEP, CODE["guide_absolute_margin"], KEEP]]


def test_guide_margin_tie_is_kept_and_margin_tightens():
    guide = np.array([[0.7, 0.65, 0.6]])
    rules = Rules(range_max=3, guide_absolute_margin=0.0)
    assert classify(np.zeros((1, 3)), np.array([1.0]), rules, guide, np.array([0.7]))[0, 0] == KEEP
    tight = Rules(range_max=3, guide_absolute_margin=0.08)
    code = classify(np.zeros((1, 3)), np.array([1.0]), tight, guide, np.array([0.7]))
    assert code.tolist() == [[CODE["guide_absolute_margin"]] * 2 + [KEEP]]


def test_guide_relative_margin_with_negative_logit_scores():
    # a guide that gives negative scores: positive -1.0, relative margin 0.1 -> threshold -1.1
    guide = np.array([[-1.05, -1.2]])
    code = classify(np.zeros((1, 2)), np.array([1.0]), Rules(range_max=2, guide_relative_margin=0.1), guide,
                    np.array([-1.0]))
    assert code.tolist() == [[CODE["guide_relative_margin"], KEEP]]


def test_guide_max_score_and_miner_rules_count_first_reason_only():
    scores = np.array([[0.99, 0.5, 0.4]])
    guide = np.array([[0.1, 0.95, 0.2]])
    rules = Rules(range_max=3, max_score=0.98, guide_max_score=0.9, guide_absolute_margin=0.0)
    code = classify(scores, np.array([1.0]), rules, guide, np.array([0.3]))
    assert code.tolist() == [[CODE["max_score"], CODE["guide_max_score"], KEEP]]



def test_window_zscores_use_the_window_only_and_have_no_outlier_without_spread():
    s = np.array([[9.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [0.0, 1.0, np.nan, 3.0]])
    inside = np.array([[False, True, True, True]] * 3)
    z = window_zscores(s, inside)
    # row 0: mean 2, std sqrt(2/3) over ranks 1-3; rank 0 (outside) is scored against them, not counted
    sd = np.sqrt(2 / 3)
    assert z[0].tolist() == pytest.approx([7 / sd, -1 / sd, 0.0, 1 / sd])
    assert z[1].tolist() == [0.0] * 4  # all equal: nothing stands out
    assert np.isnan(z[2, 2]) and z[2, 1] == pytest.approx(-1.0) and z[2, 3] == pytest.approx(1.0)
    assert window_zscores(np.array([[0.3, 0.9]]), np.array([[True, False]])).tolist() == [[0.0, 0.0]]  # one score


def test_guide_max_zscore_drops_what_stands_out_among_the_query_candidates():
    # the visible positive scores low (0.5): the GIST rule drops everything above it, the z-score
    # rule drops only the candidate far above its query's other candidates (z = 2.0 exactly is kept)
    guide = np.array([[0.9, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])
    scores = np.linspace(0.9, 0.4, 11)[None, :]
    code = classify(scores, np.array([1.0]), Rules(range_max=11, guide_max_zscore=3.0), guide, np.array([0.5]))
    assert code.tolist() == [[CODE["guide_max_zscore"]] + [KEEP] * 10]  # z = sqrt(10) = 3.16
    assert classify(scores, np.array([1.0]), Rules(range_max=11, guide_max_zscore=3.2), guide,
                    np.array([0.5]))[0, 0] == KEEP
    z2 = np.array([[1.0, 0.0, 0.0, 0.0, 0.0]])  # z of rank 0 = 2.0: a tie is kept
    assert classify(np.zeros((1, 5)), np.array([1.0]), Rules(range_max=5, guide_max_zscore=2.0), z2,
                    np.array([1.0]))[0].tolist() == [KEEP] * 5
    # checked after the margins: a candidate both rules reject counts for the margin; outside the
    # window (range_min) a candidate is no candidate, and its score is not in the statistics
    rules = Rules(range_min=1, range_max=11, guide_absolute_margin=0.0, guide_max_zscore=2.0)
    g = np.array([[5.0, 0.95, 0.31, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.29]])
    code = classify(scores, np.array([1.0]), rules, g, np.array([0.9]))
    assert code[0, 0] == OUTSIDE and code[0, 1] == CODE["guide_absolute_margin"] and (code[0, 2:] == KEEP).all()
    counts = reason_counts(code)
    assert counts["dropped_guide_absolute_margin"] == 1 and counts["dropped_guide_max_zscore"] == 0
    assert counts["kept"] + counts["dropped_guide_absolute_margin"] == counts["candidates"] == 10


def test_guide_defaults_reach_the_mining_rules(tmp_path):
    base = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
    r = job_rules(parse_job({**base, "guide": {"model": "m"}}))
    assert (r.range_max, r.guide_relative_margin, r.guide_absolute_margin, r.guide_max_zscore) == (200, 0.05, 0.0, 2.0)
    off = job_rules(parse_job({**base, "range_max": 80, "guide": {"model": "m", "max_zscore": None}}))
    assert off.guide_max_zscore is None and off.range_max == 80
    assert job_rules(parse_job(base)).guide_max_zscore is None and job_rules(parse_job(base)).range_max == 50

def _tables(rows):
    cand = pa.table({
        "query_id": [r[0] for r in rows], "candidate_ids": [r[1] for r in rows],
        "candidate_scores": [r[2] for r in rows], "positive_ids": [r[3] for r in rows],
        "positive_scores": [r[4] for r in rows]})
    guide = pa.table({"query_id": [r[0] for r in rows], "candidate_guide_scores": [r[5] for r in rows],
                      "positive_guide_scores": [r[6] for r in rows]})
    return cand, guide


def test_several_positives_use_the_lowest_guide_positive_and_duplicates_always_go():
    cand, guide = _tables([
        # two positives with guide scores 0.9 and 0.6: the reference is 0.6
        ("q1", ["a", "b", "c", "dup"], [0.5, 0.4, 0.3, 0.2], ["p1", "p2"], [0.8, 0.7], [0.65, 0.55, 0.1, 0.0],
         [0.9, 0.6]),
    ])
    keys = {"a": 1, "b": 2, "c": 3, "dup": 10, "p1": 10, "p2": 11}  # "dup" has p1's normalised text
    mined, counts = mine_candidates(cand, Rules(num_negatives=3, range_max=4, guide_absolute_margin=0.0), guide, keys)
    cols = rows_for_output(mined, "triplet", 3)
    assert set(cols["negative_id"]) == {"b", "c"}
    assert counts["dropped_guide_absolute_margin"] == 1 and counts["dropped_duplicate_of_positive"] == 1
    assert cols["negative_guide_score"] == pytest.approx([0.55, 0.1] * 2)
    assert cols["positive_guide_score"] == pytest.approx([0.9, 0.9, 0.6, 0.6])
    audit = dropped_rows(mined)
    assert audit.schema.equals(schema("dropped_candidates"))
    assert sorted(zip(audit["candidate_id"].to_pylist(), audit["reason"].to_pylist(), strict=True)) == [
        ("a", "guide_absolute_margin"), ("dup", "duplicate_of_positive")]


def _job(tmp_path, data, model, guide, **kw):
    base = {"input": str(data), "output": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
            "model": str(model), "num_negatives": 3, "range_max": 20, "guide": guide,
            "dropped": str(tmp_path / "dropped")}
    return parse_job({**base, **kw})


def _check(tmp_path, m, data_positives=None):
    table = pq.read_table(tmp_path / "out" / "data")
    assert table.schema.equals(schema("triplet", groups=("guide",)))
    assert table.num_rows == m["counts"]["negatives"] > 0
    rows = table.to_pylist()
    # every kept negative passed the GIST rule against its query's lowest positive guide score
    low = {}
    for r in rows:
        low[r["query_id"]] = min(low.get(r["query_id"], 1e9), r["positive_guide_score"])
    assert all(r["negative_guide_score"] <= low[r["query_id"]] + 1e-6 for r in rows)
    audit = pq.read_table(tmp_path / "dropped")
    c = m["counts"]
    assert audit.num_rows == sum(v for k, v in c.items() if k.startswith("dropped_"))
    assert c["kept"] + audit.num_rows == c["candidates"]
    assert m["scores"]["kept_guide_scores"] and m["scores"]["dropped_guide_scores"]
    return rows


def test_biencoder_guide_job(ray_session, tiny_bert, demo_data, tmp_path):
    guide = build_tiny_bert(tmp_path / "guide-bert", seed=1)
    # float32: onnxruntime runs float32, and `dtype: auto` is bfloat16 on CPUs that multiply it natively
    g = {"model": str(guide), "type": "biencoder", "absolute_margin": 0.0, "relative_margin": None,
         "dtype": "float32"}
    m = run_job(_job(tmp_path, demo_data, tiny_bert, g))
    rows = _check(tmp_path, m)
    assert m["stages"]["guide"]["passages"] <= m["counts"]["passages"]  # only the texts it needs
    # the guide on onnxruntime (exported before the guide's actors start; the miner stays on torch): the same scores
    onnx = run_job(_job(tmp_path, demo_data, tiny_bert, {**g, "runtime": "onnxruntime"}), overwrite=True)
    assert len(list((tmp_path / "work" / "models").iterdir())) == 1 and onnx["counts"] == m["counts"]
    score = {(r["query_id"], r["negative_id"]): r["negative_guide_score"] for r in rows}
    got = {(r["query_id"], r["negative_id"]): r["negative_guide_score"] for r in _check(tmp_path, onnx)}
    assert got.keys() == score.keys() and max(abs(got[k] - score[k]) for k in got) < 1e-5
    # the guide being the mining model itself: its whole-corpus embeddings are reused, nothing re-embedded
    m2 = run_job(_job(tmp_path, demo_data, tiny_bert, {"model": str(tiny_bert)}), overwrite=True)
    assert m2["stages"]["guide"]["passages"] == "whole corpus (cached)"
    assert m2["stages"]["guide"]["embed"]["passages"]["rows_embedded"] == 0


def test_crossencoder_guide_job(ray_session, tiny_bert, demo_data, tmp_path):
    ce = build_tiny_bert(tmp_path / "tiny-ce", seed=2, classifier=True)
    guide = {"model": str(ce), "type": "crossencoder", "absolute_margin": 0.0, "relative_margin": None}
    m = run_job(_job(tmp_path, demo_data, tiny_bert, guide, format="triplet"))
    rows = _check(tmp_path, m)
    assert all(0.0 <= r["negative_guide_score"] <= 1.0 for r in rows)  # sigmoid of one logit


def test_crossencoder_on_cuda_scores_pairs_tokenised_in_a_cpu_task(tmp_path, monkeypatch):
    """The CUDA path (under the test switch, on CPU tensors): pairs tokenised off the actor from
    tokenizer.json, batched by length, give the CPU path's scores; auto is bfloat16 there."""
    import numpy as np

    from negprep.models.cross_encoder import CrossEncoder, tokenize_pairs
    from negprep.models.devices import CUDA_ON_CPU

    monkeypatch.setenv(CUDA_ON_CPU, "1")
    ce = build_tiny_bert(tmp_path / "tiny-ce", seed=2, classifier=True)
    queries = [f"where is town {i}" for i in range(40)]
    passages = [" ".join(["the town lies by the river"] * (1 + i % 9)) for i in range(40)]
    ref = CrossEncoder(str(ce), 64, 1).score(queries, passages, 8)
    gpu = CrossEncoder(str(ce), 64, 1, device="cuda", dtype="float32")
    assert gpu._mask_4d
    tokens = tokenize_pairs(str(ce), 64, False, list(zip(queries, passages, strict=True)))
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(ce))(queries, passages, truncation=True, max_length=64,
                                                  return_token_type_ids=True)
    ends = tokens["starts"] + tokens["lengths"]
    assert [tokens["flat"][a:b].tolist() for a, b in zip(tokens["starts"], ends, strict=True)] == auto["input_ids"]
    assert [tokens["types"][a:b].tolist() for a, b in zip(tokens["starts"], ends, strict=True)] == \
        auto["token_type_ids"]
    assert tokens["lengths"].max() == 64  # truncated as the CPU path truncates
    for batch_size, batch_tokens in ((8, None), (64, 256), (1, None)):
        np.testing.assert_allclose(gpu.score_tokens(tokens, batch_size, batch_tokens), ref, atol=1e-5)
    import torch

    assert CrossEncoder(str(ce), 64, 1, device="cuda").model.dtype == torch.bfloat16  # auto on CUDA
    assert CrossEncoder(str(ce), 64, 1).model.dtype == torch.float32
