"""Teacher scores, the card's column-selecting configs and the grouped exports, each read and trained on
by its real consumer: sentence-transformers here, FlagEmbedding and Tevatron in the trainers'
environment (`make trainers`: transformers<5, which FlagEmbedding needs; Tevatron's source from
../shared/third_party on PYTHONPATH)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.output.formats import EXPORTS, group_rows
from negprep.output.formats.flagembedding import flagembedding_table
from negprep.output.formats.tevatron import tevatron_table
from negprep.schemas import schema

from .conftest import EXPORTED_NEGATIVES as N
from .conftest import ROOT, SHARED


def _pairs() -> pa.Table:
    """A shard's pairs (the ntuple layout, null past a pair's negatives): q1 has two positives sharing
    negative a (rank 0); q2's pair got one negative of two."""
    cols = {"query_id": ["q1", "q1", "q2"], "positive_id": ["p1", "p2", "p3"], "negative_1_id": ["b", "a", "d"],
            "negative_1_rank": [1, 0, 0], "negative_2_id": ["a", "c", None], "negative_2_rank": [0, 2, None],
            "scores": [[0.9, 0.4, 0.5], [0.8, 0.5, 0.3], [0.7, 0.6, None]]}
    for i in (1, 2):
        cols[f"negative_{i}"] = [d and f"text {d}" for d in cols[f"negative_{i}_id"]]
    cols["query"] = [f"query {q}" for q in cols["query_id"]]
    cols["positive"] = [f"text {p}" for p in cols["positive_id"]]
    return pa.table(cols)


def test_each_export_is_one_registry_entry_with_its_contract_and_unknown_names_fail_at_config_time(tmp_path):
    from negprep.errors import ConfigError

    assert list(EXPORTS) == ["flagembedding", "tevatron"]
    for name, e in EXPORTS.items():
        assert e.name == name and (ROOT / "schemas" / f"{name}.yaml").exists()
        assert any(name.lower() in line.lower() for line in e.card_lines("OUT", {}))  # the card says how to train
    job = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": "m"}
    assert parse_job({**job, "exports": ["tevatron"]}).exports == ["tevatron"]
    with pytest.raises(ConfigError, match="exports: unknown export 'sbert': negprep writes flagembedding, tevatron"):
        parse_job({**job, "exports": ["tevatron", "sbert"]})


def test_groups_hold_each_passage_once_in_rank_order_and_add_up():
    table = _pairs()
    groups, counts = group_rows(table, 2)
    q1 = groups[0]
    assert [g.query_id for g in groups][:1] == ["q1"] and list(q1.pos) == ["p1", "p2"]
    assert [d for d, _, _ in q1.negatives()] == ["a", "b", "c"]  # a once, though both positives have it
    assert [s for _, _, s in q1.negatives()] == [0.5, 0.4, 0.3] and [s for _, s in q1.pos.values()] == [0.9, 0.8]
    assert counts["negatives"] + counts["negatives_merged"] == 5  # the pairs' negatives, q2's missing one not counted
    assert [d for d, _, _ in groups[1].negatives()] == ["d"]
    assert counts["positives"] == len({(q, p) for q, p in zip(table["query_id"].to_pylist(),
                                                               table["positive_id"].to_pylist(), strict=True)})
    fe = flagembedding_table(groups, temperature=0.05).to_pylist()[0]
    assert fe["neg"] == ["text a", "text b", "text c"] and fe["pos_scores"] == pytest.approx([18.0, 16.0])
    tev = tevatron_table(groups)
    assert tev.schema.equals(schema("tevatron"))
    assert [p["docid"] for p in tev.to_pylist()[0]["negative_passages"]] == ["a", "b", "c"]


def test_teacher_scores_and_grouped_exports_add_up(exported):
    base, m = exported
    out = base / "out"
    rows = pq.read_table(out / "data").to_pylist()
    assert m["teacher"]["role"] == "guide" and rows
    for r in rows:  # the teacher is the guide: scores = [guide(q, pos), guide(q, neg)]
        assert r["scores"] == pytest.approx([r["positive_guide_score"], r["negative_guide_score"]])
    assert sorted(os.listdir(out / "flagembedding")) == [f.removeprefix("flagembedding/")
                                                          for f in m["exports"]["flagembedding"]["files"]]
    assert all(f.endswith(".jsonl") for f in os.listdir(out / "flagembedding"))  # nothing else for --train_data
    fe = [json.loads(line) for f in sorted((out / "flagembedding").iterdir()) for line in f.read_text().splitlines()]
    tev = pq.read_table(out / "tevatron").to_pylist()
    for name, groups in (("flagembedding", fe), ("tevatron", tev)):
        e = m["exports"][name]
        assert e["queries"] == len(groups) == len({r["query_id"] for r in rows})
        assert e["positives"] == len({(r["query_id"], r["positive_id"]) for r in rows})
        assert e["negatives"] == len({(r["query_id"], r["negative_id"]) for r in rows})
        assert e["negatives"] + e["negatives_merged"] == m["rows"]
    assert sum(len(g["neg"]) for g in fe) == sum(len(g["negative_passages"]) for g in tev) == e["negatives"]
    guide_of = {(r["query_id"], r["negative_id"]): r["negative_guide_score"] for r in rows}
    rank_of: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r["query_id"], r["negative_id"])
        rank_of[key] = min(rank_of.get(key, 1 << 30), r["negative_rank"])
    for g in tev:
        ranks = [rank_of[(g["query_id"], p["docid"])] for p in g["negative_passages"]]
        assert ranks == sorted(ranks)
        assert all(p["score"] == pytest.approx(guide_of[(g["query_id"], p["docid"])]) for p in g["negative_passages"])
    card = (out / "README.md").read_text()
    assert "config_name: mnrl" in card and "config_name: tevatron" in card and "--train_group_size" in card


@pytest.mark.parametrize("config,loss", [("mnrl", "MultipleNegativesRankingLoss"), ("distill", "MarginMSELoss"),
                                         ("distill", "DistillKLDivLoss")])
def test_card_configs_train_sentence_transformers_as_is(exported, tiny_bert, tmp_path, config, loss):
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    base, _ = exported
    ds = datasets.load_dataset(str(base / "out"), config, split="train")  # no select_columns, no map
    texts = ["query", "positive", "negative"]
    assert ds.column_names == (texts if config == "mnrl" else [*texts, "scores"])
    model = SentenceTransformer(str(tiny_bert), device="cpu")
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "st"), max_steps=2,
                                                per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=getattr(losses, loss)(model))
    assert trainer.train().global_step == 2


@pytest.fixture(scope="module")
def trainer_model(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT as transformers 4 reads it too: its tokenizer named by a class both versions have."""
    import shutil

    path = Path(shutil.copytree(tiny_bert, tmp_path_factory.mktemp("model") / "tiny-bert"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(cfg | {"tokenizer_class": "PreTrainedTokenizerFast"}))
    return path


def _trainers_python() -> Path:
    """The trainers' environment (`make trainers`); missing fails under CI=true and skips elsewhere."""
    py = Path(os.environ.get("NEGPREP_TRAINERS", ROOT / ".venv-trainers")) / "bin" / "python"
    if not py.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{py} is missing: `make trainers` builds it")
        pytest.skip(f"{py} not built (make trainers)")
    return py


def _run(script: str, tmp_path: Path, pythonpath: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([str(_trainers_python()), "-c", textwrap.dedent(script)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_flagembedding_reads_and_trains_on_its_export(exported, trainer_model, tmp_path):
    tiny_bert = trainer_model
    base, m = exported
    data = base / "out" / "flagembedding"
    out = _run(f"""
        import transformers
        from transformers import AutoTokenizer
        from FlagEmbedding.abc.finetune.embedder import AbsEmbedderDataArguments, AbsEmbedderTrainDataset
        assert transformers.__version__.startswith("4."), transformers.__version__
        args = AbsEmbedderDataArguments(train_data=[{str(data)!r}], train_group_size={N + 1},
                                        knowledge_distillation=True, cache_path={str(tmp_path / "cache")!r})
        ds = AbsEmbedderTrainDataset(args, AutoTokenizer.from_pretrained({str(tiny_bert)!r}))
        query, passages, teacher = ds[0]
        assert len(passages) == {N + 1} and len(teacher) == {N + 1}, (passages, teacher)
        print(len(ds))
    """, tmp_path)
    assert int(out.split()[-1]) == m["exports"]["flagembedding"]["queries"]
    # FlagEmbedding's own fine-tuning entry point, with its distillation mode, for two steps
    _run(f"""
        import sys, runpy
        sys.argv = ["base", "--model_name_or_path", {str(tiny_bert)!r}, "--train_data", {str(data)!r},
                    "--output_dir", {str(tmp_path / "fe")!r}, "--max_steps", "2", "--per_device_train_batch_size", "2",
                    "--train_group_size", "{N + 1}", "--knowledge_distillation", "True", "--query_max_len", "32",
                    "--passage_max_len", "64", "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
                    "--cache_path", {str(tmp_path / "cache2")!r}]
        runpy.run_module("FlagEmbedding.finetune.embedder.encoder_only.base", run_name="__main__")
    """, tmp_path)


@pytest.mark.parametrize("driver", ["train", "train_distil"])
def test_tevatron_trains_on_its_export(exported, trainer_model, tmp_path, driver):
    tiny_bert = trainer_model
    src = SHARED.parent / "third_party" / "tevatron" / "src"
    if not src.exists() and os.environ.get("CI") == "true":
        pytest.fail(f"{src} is missing: CI needs ../shared beside the checkout")
    base, _ = exported
    _run(f"""
        import sys, runpy
        sys.argv = ["train", "--model_name_or_path", {str(tiny_bert)!r}, "--dataset_name", {str(base / "out")!r},
                    "--dataset_config", "tevatron", "--output_dir", {str(tmp_path / "tev")!r}, "--max_steps", "2",
                    "--per_device_train_batch_size", "2", "--train_group_size", "{N + 1}", "--query_max_len", "32",
                    "--passage_max_len", "64", "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
                    "--pooling", "mean", "--normalize", "--temperature", "0.05", "--attn_implementation", "sdpa"]
        runpy.run_module("tevatron.retriever.driver.{driver}", run_name="__main__")
    """, tmp_path, pythonpath=str(src))
