"""End-to-end jobs on a local Ray with the tiny offline BERT."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.errors import ConfigError
from negprep.runner import run_job
from negprep.schemas import schema


def _job(tmp_path, data, model, **kw):
    base = {
        "input": str(data),
        "output": str(tmp_path / "out"),
        "work_dir": str(tmp_path / "work"),
        "model": str(model),
        "num_negatives": 3,
        "range_max": 20,
        "embed": {"batch_size": 16},
    }
    base.update(kw)
    return parse_job(base)


def _positives(data) -> set[tuple[str, str]]:
    q = pl.read_csv(
        data / "qrels" / "train.tsv", separator="\t", schema_overrides={"query-id": pl.String, "corpus-id": pl.String}
    )
    return set(zip(q["query-id"], q["corpus-id"], strict=True))


def test_triplet_job_end_to_end(ray_session, tiny_bert, demo_data, tmp_path):
    job = _job(tmp_path, demo_data, tiny_bert, max_score=0.9999)
    m = run_job(job)
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists() and (out / "manifest.json").exists()
    table = pq.read_table(out / "data")
    assert table.schema.equals(schema("triplet"))
    assert table.num_rows == m["rows"] == m["counts"]["negatives"] > 0
    c = m["counts"]
    assert c["kept"] + sum(v for k, v in c.items() if k.startswith("dropped_")) == c["candidates"]
    assert c["queries"] == 80 and c["pairs"] == 120
    pos = _positives(demo_data)
    rows = table.to_pylist()
    assert not any((r["query_id"], r["negative_id"]) in pos for r in rows)
    assert all(r["negative_rank"] < 20 for r in rows)
    # every read row is accounted for
    for role, s in m["inputs"].items():
        used = s["rows_used"] + s.get("rows_unused_no_positive", 0) + s.get("rows_unused_not_positive", 0)
        assert used + s["rows_rejected"] == s["rows_read"], role
    assert m["versions"]["faiss-cpu"] and m["timings_s"]["embed"] > 0


def test_rerun_reuses_embeddings_and_refuses_existing_output(ray_session, tiny_bert, demo_data, tmp_path):
    job = _job(tmp_path, demo_data, tiny_bert, sampling="random", seed=3)
    first = run_job(job)
    with pytest.raises(ConfigError, match="output exists"):
        run_job(job)
    second = run_job(job, overwrite=True)
    emb = second["stages"]["embed"]
    assert emb["corpus"]["shards_reused"] == emb["corpus"]["shards"] == 1
    assert emb["corpus"]["rows_embedded"] == 0
    assert second["stages"]["search"]["reused"] == 1
    a = first["counts"]
    assert a == second["counts"]
    t = pq.read_table(tmp_path / "out" / "data").to_pylist()
    # a different seed draws different negatives, same counts
    other = run_job(_job(tmp_path, demo_data, tiny_bert, sampling="random", seed=4), overwrite=True)
    t2 = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert other["counts"]["negatives"] == a["negatives"]
    assert [r["negative_id"] for r in t] != [r["negative_id"] for r in t2]


def test_onnxruntime_job_exports_once_and_reuses_the_export(ray_session, tiny_bert, demo_data, tmp_path):
    # (that onnxruntime mines what torch mines, to 1e-5 in every score: the bi-encoder guide test)
    import onnx

    job = _job(tmp_path, demo_data, tiny_bert, embed={"batch_size": 16, "runtime": "onnxruntime"})
    first = run_job(job)
    (export,) = (tmp_path / "work" / "models").iterdir()  # made before the actors started, in the work directory
    assert {p.name for p in export.iterdir()} == {"model.onnx", "tokenizer.json", "meta.json", "_SUCCESS"}
    made = (export / "model.onnx").stat().st_mtime_ns
    # eager attention: the SDPA export's NaN guard over every attention score cost a quarter of the time
    ops = {n.op_type for n in onnx.load(str(export / "model.onnx")).graph.node}
    assert "Softmax" in ops and "IsNaN" not in ops
    c = first["counts"]
    assert c["kept"] + sum(v for k, v in c.items() if k.startswith("dropped_")) == c["candidates"]
    assert pq.read_table(tmp_path / "out" / "data").num_rows == c["negatives"] > 0
    assert first["versions"]["onnxruntime"]
    second = run_job(job, overwrite=True)
    assert (export / "model.onnx").stat().st_mtime_ns == made and second["counts"] == c
    assert second["timings_s"]["export"] < first["timings_s"]["export"]  # reused, not made again
    assert second["stages"]["embed"]["corpus"]["shards_reused"] == 1


def test_ntuple_and_table_inputs(ray_session, tiny_bert, demo_data, tmp_path):
    # the same collection as separate Parquet / CSV / JSONL tables
    corpus = pl.read_ndjson(demo_data / "corpus.jsonl").rename({"_id": "id"})
    corpus.write_parquet(tmp_path / "corpus.parquet")
    pl.read_ndjson(demo_data / "queries.jsonl").rename({"_id": "id"}).write_ndjson(tmp_path / "queries.jsonl")
    pl.read_csv(demo_data / "qrels" / "train.tsv", separator="\t").rename(
        {"query-id": "query_id", "corpus-id": "doc_id"}
    ).write_csv(tmp_path / "qrels.csv")
    inp = {
        "corpus": str(tmp_path / "corpus.parquet"),
        "queries": str(tmp_path / "queries.jsonl"),
        "qrels": str(tmp_path / "qrels.csv"),
    }
    m = run_job(_job(tmp_path, None, tiny_bert, input=inp, format="ntuple", range_max=30))
    table = pq.read_table(tmp_path / "out" / "data")
    assert table.schema.equals(schema("ntuple", n=3))
    assert table.num_rows == m["counts"]["pairs"] - m["counts"]["pairs_short"] > 0
    for r in table.to_pylist():
        assert len({r["negative_1_id"], r["negative_2_id"], r["negative_3_id"]}) == 3
        assert r["negative_1_rank"] < r["negative_2_rank"] < r["negative_3_rank"]


def test_pairs_input(ray_session, tiny_bert, tmp_path):
    from negprep import demo

    corpus, queries, qrels = demo.generate(20)
    text = {r["_id"]: r["text"] for r in corpus}
    qtext = {r["_id"]: r["text"] for r in queries}
    pairs = pl.DataFrame({"anchor": [qtext[q] for q, _, _ in qrels], "positive": [text[d] for _, d, _ in qrels]})
    pairs.write_parquet(tmp_path / "pairs.parquet")
    m = run_job(
        _job(tmp_path, None, tiny_bert, input={"pairs": str(tmp_path / "pairs.parquet"), "query_column": "anchor"})
    )
    rows = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert m["counts"]["pairs"] == len(qrels) and rows
    assert all(r["negative"] != r["positive"] for r in rows)
    own = {(q, p) for q, p in zip(pairs["anchor"], pairs["positive"], strict=True)}
    assert not any((r["query"], r["negative"]) in own for r in rows)


def test_output_loads_with_datasets_and_trains_with_sentence_transformers(ray_session, tiny_bert, demo_data, tmp_path):
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments

    run_job(_job(tmp_path, demo_data, tiny_bert))
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert ds.column_names[:3] == ["query", "positive", "negative"]
    model = SentenceTransformer(str(tiny_bert), device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st"), max_steps=2, per_device_train_batch_size=8, report_to=[], use_cpu=True
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=ds.select_columns(["query", "positive", "negative"]),
        loss=losses.MultipleNegativesRankingLoss(model),
    )
    assert trainer.train().global_step == 2


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"input": "x", "output": "y", "num_negativs": 3}, "unknown key 'num_negativs'"),
        ({"input": "x", "output": "y", "embed": {"batch_size": -1}}, "embed.batch_size"),
        ({"input": "/nonexistent/beir", "output": "y"}, "corpus file not found"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, job, message):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))
    r = subprocess.run([sys.executable, "-m", "negprep", "run", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
