"""No false negative from a duplicate: twin queries (same normalised text, other ids) share their
positives for exclusion, one pair's negatives never repeat a text, and settings whose output is
empty by construction are refused before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negprep import demo
from negprep.config import parse_job
from negprep.errors import ConfigError
from negprep.input.checks import twin_exclusions
from negprep.input.shards import text_key
from negprep.rules import mining
from negprep.rules.candidates import mine_candidates
from negprep.rules.mining import KEEP, REASONS, Rules
from negprep.runner import run_job

from .conftest import rows_for_output

DUP = 1 + REASONS.index("duplicate_of_candidate")


def test_repeated_texts_keeps_the_best_ranked_copy_inside_the_window():
    keys = np.array([[5, 7, 5, 9, 7, 5], [1, 2, 3, 1, 0, 0]], dtype=np.int64)
    known = np.array([[True] * 6, [True, True, True, True, False, False]])
    got = mining.repeated_texts(keys, known, range_min=1, range_max=6)
    # row 0: rank 0 is outside the window, so the key-5 copy at rank 2 is the first in the window
    assert got.tolist() == [[False, False, False, False, True, True], [False, False, False, False, False, False]]


def test_a_pair_never_gets_the_same_text_twice_and_twins_positives_count_as_its_own():
    cand = pa.table({
        "query_id": ["q1"], "candidate_ids": [["a", "a-copy", "b", "t", "c"]],
        "candidate_scores": [[0.9, 0.9, 0.8, 0.7, 0.6]], "positive_ids": [["p"]], "positive_scores": [[0.95]],
        "excluded_ids": [["twin-pos"]],
    })
    keys = {"a": 1, "a-copy": 1, "b": 2, "t": 3, "twin-pos": 3, "c": 4, "p": 5}
    mined, counts = mine_candidates(cand, Rules(num_negatives=4, range_max=5), text_keys=keys)
    assert mined.code[0].tolist() == [KEEP, DUP, KEEP, 1 + REASONS.index("duplicate_of_positive"), KEEP]
    assert counts["dropped_duplicate_of_candidate"] == 1 and counts["dropped_duplicate_of_positive"] == 1
    assert rows_for_output(mined, "triplet", 4)["negative_id"] == ["a", "b", "c"]


def test_near_copies_of_a_positive_are_dropped_and_only_near_scores_are_looked_at():
    v = {"p": [1.0, 0.0], "near": [0.995, 0.0999], "far": [0.0, 1.0], "close": [0.9, 0.4359]}
    asked: list[set[str]] = []

    def vectors(ids: set[str]) -> dict[str, np.ndarray]:
        asked.append(set(ids))
        return {d: np.asarray(v[d]) / np.linalg.norm(v[d]) for d in ids}

    cand = pa.table({"query_id": ["q"], "candidate_ids": [["near", "close", "far"]],
                     "candidate_scores": [[0.80, 0.78, 0.10]], "positive_ids": [["p"]], "positive_scores": [[0.81]],
                     "excluded_ids": [[]]})
    mined, counts = mine_candidates(cand, Rules(num_negatives=3, range_max=3, near_duplicate=0.97), vectors=vectors)
    assert mined.code[0].tolist() == [1 + REASONS.index("near_duplicate_of_positive"), KEEP, KEEP]
    assert counts["dropped_near_duplicate_of_positive"] == 1
    # "far" scores 0.71 below the positive: more than sqrt(2 - 2 x 0.97) = 0.245, so it cannot be a near-copy
    assert asked == [{"near", "close", "p"}]


def test_twin_queries_share_positives_for_exclusion():
    queries = pl.DataFrame({"id": ["q1", "q2", "q3"], "text": ["What is X?", "what  is x?", "Other"]})
    positives = pl.DataFrame({"query_id": ["q1", "q2", "q2", "q3"], "doc_id": ["d1", "d2", "d1", "d3"]})
    got = twin_exclusions(queries, positives).rows()
    assert got == [("q1", "d2")]  # q2 already has d1; q3 has no twin


def _twin_collection(root: Path) -> Path:
    """The demo towns plus a twin of query q0a (same question, other id, another positive) and an
    exact copy of passage d1g under another id."""
    corpus, queries, qrels = demo.generate(20)
    q0a = next(q for q in queries if q["_id"] == "q0a")
    queries.append({"_id": "q0twin", "text": "  " + q0a["text"].upper() + " "})
    corpus.append({"_id": "extra", "title": "", "text": "A second account of the town in the first question."})
    d1g = next(c for c in corpus if c["_id"] == "d1g")
    corpus.append({**d1g, "_id": "d1g-copy"})
    d0g = next(c for c in corpus if c["_id"] == "d0g")
    corpus.append({**d0g, "_id": "d0g-near", "text": d0g["text"].replace("people live there", "people lived there")})
    qrels.append(("q0twin", "extra", 1))
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n"
                                                                                     for q, d, s in qrels))
    return root


def _candidates(work: Path) -> dict[str, dict]:
    (folder,) = (work / "search").iterdir()
    return {r["query_id"]: r for r in pq.read_table(folder).to_pylist()}


def test_twin_queries_and_copied_passages_never_become_negatives(ray_session, tiny_bert, tmp_path):
    data = _twin_collection(tmp_path / "data")
    # the window covers nearly the whole corpus: without the exclusions every twin positive would be a candidate
    job = {"input": str(data), "output": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
           "model": str(tiny_bert), "num_negatives": 5, "range_max": 40, "dropped": str(tmp_path / "audit")}
    m = run_job(parse_job(job))
    audit = pq.read_table(tmp_path / "audit").to_pylist()
    assert ("q0a", "d0g-near", "near_duplicate_of_positive") in {(r["query_id"], r["candidate_id"], r["reason"])
                                                                 for r in audit}
    assert m["config"]["near_duplicate"] == 0.97
    cand = _candidates(tmp_path / "work")
    positives = {"q0a": {"d0g"} | ({"d0e"} if "d0e" in cand["q0a"]["positive_ids"] else set())}
    assert cand["q0a"]["excluded_ids"] == ["extra"] and "extra" not in cand["q0a"]["candidate_ids"]
    assert set(cand["q0twin"]["excluded_ids"]) == set(cand["q0a"]["positive_ids"]) == positives["q0a"]
    assert not positives["q0a"] & set(cand["q0twin"]["candidate_ids"])
    assert m["counts"]["exclusions"] == len(cand["q0a"]["excluded_ids"]) + len(cand["q0twin"]["excluded_ids"])
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    by_pair: dict[tuple[str, str], list[int]] = {}
    for r in rows:
        by_pair.setdefault((r["query_id"], r["positive_id"]), []).append(text_key(r["negative"]))
    assert all(len(k) == len(set(k)) for k in by_pair.values())  # d1g and its copy never both
    assert m["counts"]["dropped_duplicate_of_candidate"] > 0
    assert not any(r["negative_id"] in ("d1g", "d1g-copy") for r in rows if r["query_id"] in ("q1a", "q1b")
                   and r["positive_id"] == "d1g")


def test_twin_queries_through_the_pairs_input(ray_session, tiny_bert, tmp_path):
    corpus, queries, qrels = demo.generate(20)
    text = {r["_id"]: r["text"] for r in corpus}
    qtext = {r["_id"]: r["text"] for r in queries}
    pairs = {"query": [qtext[q] for q, _, _ in qrels], "positive": [text[d] for _, d, _ in qrels]}
    pairs["query"].append(qtext["q0a"].lower())  # the same question written another way
    pairs["positive"].append("A second account of the town in the first question.")
    pl.DataFrame(pairs).write_parquet(tmp_path / "pairs.parquet")
    job = {"input": {"pairs": str(tmp_path / "pairs.parquet")}, "output": str(tmp_path / "out"),
           "work_dir": str(tmp_path / "work"), "model": str(tiny_bert), "num_negatives": 5, "range_max": 40}
    m = run_job(parse_job(job))
    assert m["counts"]["exclusions"] >= 2
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    own = {}
    for q, p in zip(pairs["query"], pairs["positive"], strict=True):
        own.setdefault(" ".join(q.casefold().split()), set()).add(p)
    assert not any(r["negative"] in own[" ".join(r["query"].casefold().split())] for r in rows)


@pytest.mark.parametrize(("settings", "message"), [
    ({"num_negatives": 11, "range_max": 10}, "num_negatives (11) is larger than the rank window"),
    ({"num_negatives": 5, "range_min": 8, "range_max": 10, "format": "ntuple"}, "range_max - range_min (10 - 8 = 2)"),
])
def test_settings_with_empty_output_by_construction_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_job({"input": "x", "output": str(tmp_path / "out"), **settings})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"input": str(tmp_path), "output": str(tmp_path / "out"), **settings}))
    r = subprocess.run([sys.executable, "-m", "negprep", "run", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
    assert not (tmp_path / "out").exists()
