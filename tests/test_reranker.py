"""Reranker rows (`labeled-pair`, `labeled-list`): built from the pairs by hand-checked rules, written
by real jobs whose counts add up, kept in whole groups by topic batches, and trained on by
sentence-transformers' own CrossEncoderTrainer through the card's configs alone."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.errors import ConfigError
from negprep.output.formats import FORMATS
from negprep.output.formats.contrastive import triplet_rows
from negprep.output.formats.reranker import labeled_list_rows, labeled_pair_rows
from negprep.runner import run_job

from .conftest import EXPORTED_NEGATIVES as N
from .conftest import ROOT, build_tiny_bert


def _pairs() -> dict[str, list]:
    """Three pairs of two negatives' room: whole, short by one, none; q1's pairs share negative a."""
    return {"query_id": ["q1", "q1", "q2"], "query": ["Q1", "Q1", "Q2"], "positive_id": ["p1", "p2", "p3"],
            "positive": ["P1", "P2", "P3"], "positive_score": [0.9, 0.8, 0.7], "cluster_id": [4, 4, 5],
            "negative_1_id": ["b", "a", None], "negative_1": ["B", "A", None], "negative_1_score": [0.5, 0.6, None],
            "negative_1_rank": [1, 0, None], "negative_2_id": ["a", None, None], "negative_2": ["A", None, None],
            "negative_2_score": [0.4, None, None], "negative_2_rank": [0, None, None],
            "scores": [[0.95, 0.3, 0.2], [0.85, 0.35, None], [0.75, None, None]]}


def test_every_row_format_is_a_registry_entry_and_config_checks_its_name_and_whole_groups(tmp_path):
    assert list(FORMATS) == ["triplet", "ntuple", "labeled-pair", "labeled-list"]
    for name, f in FORMATS.items():
        assert f.name == name and (ROOT / "schemas" / f"{name}.yaml").exists()
        assert any(c in line for line in f.usage("OUT", 3) for c in f.configs(3))  # the card names its configs
    job = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": "m", "num_negatives": 3}
    with pytest.raises(ConfigError, match="format: .*unknown format 'labelled-pair': negprep writes triplet, ntuple, "
                                          "labeled-pair, labeled-list"):
        parse_job({**job, "format": "labelled-pair"})
    with pytest.raises(ConfigError, match=r"batch_size \(10\) with format labeled-pair must be a multiple of 4"):
        parse_job({**job, "format": "labeled-pair", "batch_size": 10})
    assert parse_job({**job, "format": "labeled-pair", "batch_size": 8}).batch_size == 8
    assert parse_job({**job, "format": "labeled-list", "batch_size": 10}).batch_size == 10  # a row is a group


def test_labeled_pair_rows_are_each_pairs_positive_then_its_negatives():
    rows = labeled_pair_rows(_pairs(), 2)
    assert len(rows["query"]) == 3 + 3  # pairs x 1 + the negatives they got (2, 1, 0)
    assert rows["passage_id"] == ["p1", "b", "a", "p2", "a", "p3"]
    assert rows["positive_id"] == ["p1", "p1", "p1", "p2", "p2", "p3"]  # the group each row belongs to
    assert rows["label"] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert rows["passage"] == ["P1", "B", "A", "P2", "A", "P3"]
    assert rows["score"] == [0.95, 0.3, 0.2, 0.85, 0.35, 0.75]  # the teacher's, aligned with the passage
    assert rows["mining_score"] == [0.9, 0.5, 0.4, 0.8, 0.6, 0.7]
    assert rows["rank"] == [None, 1, 0, None, 0, None]
    assert rows["cluster_id"] == [4, 4, 4, 4, 4, 5]  # a pair's columns go to each of its rows


def test_labeled_list_rows_are_one_per_pair_with_aligned_lists():
    rows = labeled_list_rows(_pairs(), 2)
    assert rows["query"] == ["Q1", "Q1", "Q2"] and rows["positive_id"] == ["p1", "p2", "p3"]
    assert rows["docs"] == [["P1", "B", "A"], ["P2", "A"], ["P3"]]
    assert rows["doc_ids"] == [["p1", "b", "a"], ["p2", "a"], ["p3"]]
    assert rows["labels"] == [[1.0, 0.0, 0.0], [1.0, 0.0], [1.0]]
    assert rows["scores"] == [[0.95, 0.3, 0.2], [0.85, 0.35], [0.75]]
    assert rows["ranks"] == [[None, 1, 0], [None, 0], [None]] and rows["cluster_id"] == [4, 4, 5]


def test_triplet_rows_are_one_per_negative_from_the_same_pairs():
    rows = triplet_rows(_pairs(), 2)
    assert rows["negative_id"] == ["b", "a", "a"] and rows["positive_id"] == ["p1", "p1", "p2"]
    assert rows["scores"] == [[0.95, 0.3], [0.95, 0.2], [0.85, 0.35]] and rows["negative_rank"] == [1, 0, 0]


@pytest.fixture(scope="module")
def reranked(exported):
    """labeled-pair and labeled-list jobs over the guided job's work directory (its embeddings,
    candidates and guide scores are reused: mine and publish run), and labeled-pair in topic batches."""
    base, triplets = exported
    job = {**triplets["config"], "exports": [], "format": "labeled-pair"}
    out = {}
    lists = {"format": "labeled-list", "exports": ["flagembedding"]}
    for name, extra in (("labeled-pair", {}), ("labeled-list", lists), ("batched", {"batch_size": 8})):
        out[name] = run_job(parse_job({**job, **extra, "output": str(base / name)}))
    return base, triplets, out


def _rows(base, name: str) -> list[dict]:
    return pq.read_table(base / name / "data").to_pylist()


def test_reranker_outputs_add_up_and_carry_the_guides_scores(reranked):
    base, triplets, m = reranked
    guide = {(r["query_id"], r["negative_id"]): r["negative_guide_score"] for r in _rows(base, "out")}
    for name in ("labeled-pair", "labeled-list"):
        c = m[name]["counts"]
        assert m[name]["format"] == name and c["pairs_written"] == c["pairs"] == triplets["counts"]["pairs"]
        assert c["negatives_written"] == c["negatives"] == triplets["rows"]  # the same negatives as the triplets
    pair = _rows(base, "labeled-pair")
    assert len(pair) == m["labeled-pair"]["rows"] == m["labeled-pair"]["counts"]["pairs"] + triplets["rows"]
    for r in pair:
        if r["label"] == 0.0:
            assert r["score"] == pytest.approx(guide[(r["query_id"], r["passage_id"])])
    lists = _rows(base, "labeled-list")
    assert len(lists) == m["labeled-list"]["rows"] == m["labeled-list"]["counts"]["pairs"]
    assert sum(len(r["docs"]) for r in lists) == len(pair)
    assert all(r["labels"][0] == 1.0 and not any(r["labels"][1:]) for r in lists)
    # the grouped exports are those of the triplets: the same pairs with a negative, from any row format
    assert m["labeled-list"]["exports"]["flagembedding"] | {"files": None} == \
        triplets["exports"]["flagembedding"] | {"files": None}
    for f in sorted((base / "out" / "flagembedding").iterdir()):
        assert (base / "labeled-list" / "flagembedding" / f.name).read_bytes() == f.read_bytes()
    card = (base / "labeled-pair" / "README.md").read_text()
    assert "config_name: bce" in card and "text-ranking" in card and "BinaryCrossEntropyLoss" in card


def test_topic_batches_of_labeled_pairs_hold_whole_groups(reranked):
    base, _, m = reranked
    rows = _rows(base, "batched")
    b = m["batched"]["batches"]
    assert len(rows) == m["batched"]["rows"] == b["rows_batched"] == b["rows"] - b["rows_left_out"]
    assert m["batched"]["counts"]["pairs_written"] * (N + 1) == b["rows"]  # whole pairs only, each N + 1 rows
    by_batch: dict[int, list[dict]] = {}
    for r in rows:
        by_batch.setdefault(r["batch_id"], []).append(r)
    assert set(map(len, by_batch.values())) == {8}
    for batch in by_batch.values():
        for start in range(0, 8, N + 1):  # a group: the positive, then its N negatives, contiguous
            group = batch[start : start + N + 1]
            assert [r["label"] for r in group] == [1.0] + [0.0] * N
            assert len({(r["query_id"], r["positive_id"]) for r in group}) == 1


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("ce") / "tiny-ce", classifier=True)


@pytest.mark.parametrize("fmt,config,loss,columns", [
    ("labeled-pair", "bce", "BinaryCrossEntropyLoss", ["query", "passage", "label"]),
    ("labeled-pair", "distill", "MSELoss", ["query", "passage", "score"]),
    ("labeled-list", "listwise", "LambdaLoss", ["query", "docs", "labels"]),
    ("labeled-list", "distill", "ListNetLoss", ["query", "docs", "scores"]),
])
def test_crossencoder_trainer_trains_on_the_cards_configs(reranked, cross_encoder, tmp_path, fmt, config, loss,
                                                          columns):
    import datasets
    from sentence_transformers.cross_encoder import (
        CrossEncoder,
        CrossEncoderTrainer,
        CrossEncoderTrainingArguments,
        losses,
    )

    base = reranked[0]
    ds = datasets.load_dataset(str(base / fmt), config, split="train")  # no select_columns, no map
    assert ds.column_names == columns
    model = CrossEncoder(str(cross_encoder), num_labels=1, device="cpu")
    args = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "ce"), max_steps=2, per_device_train_batch_size=8,
                                         report_to=[], use_cpu=True, logging_steps=1)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=getattr(losses, loss)(model))
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged), json.dumps(trainer.state.log_history)


def test_summary_names_the_format_and_its_first_config(reranked):
    from negprep.output.summary import format_summary

    m = reranked[2]["labeled-list"]
    text = format_summary(m)
    assert f"{m['rows']:,} labeled-list rows" in text and '"listwise"' in text


def test_pairs_layout_is_the_ntuple_contract():
    from negprep.schemas import conform

    pairs = _pairs()
    whole = {k: v[:1] for k, v in pairs.items() if k != "cluster_id"}
    table = conform(pa.table(whole), "ntuple", n=2)
    assert table.column("negative_2_id").to_pylist() == ["a"]
