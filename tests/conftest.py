"""Shared fixtures: one local Ray for the session, a tiny BERT built offline, the data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NEGPREP_SHARED", ROOT.parent / "shared")) / "data"


def shared_data(name: str) -> Path:
    """A data set from ../shared/data; missing data fails under CI=true and skips elsewhere."""
    path = SHARED / name
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI needs ../shared/data beside the checkout")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 << 20,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}},
    )
    yield ray
    ray.shutdown()


def _demo_words() -> list[str]:
    """Whole words of the generated demo collection: the tiny tokenizer's vocabulary."""
    import re

    from negprep import demo

    corpus, queries, _ = demo.generate(150)
    text = " ".join([r["text"] + " " + r["title"] for r in corpus] + [r["text"] for r in queries])
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def build_tiny_bert(path: Path, seed: int = 0, classifier: bool = False) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece tokenizer, saved like a hub model (~100 KB)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,?;'-")
    vocab = {
        t: i for i, t in enumerate(dict.fromkeys(specials + _demo_words() + letters + ["##" + c for c in letters]))
    }
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from negprep import demo

    return demo.write(tmp_path_factory.mktemp("data") / "towns", n_towns=40)


EXPORTED_NEGATIVES = 3


@pytest.fixture(scope="session")
def exported(ray_session, tiny_bert, demo_data, tmp_path_factory):
    """A triplet job with a bi-encoder guide (the teacher) and both grouped exports; its work
    directory serves the other formats' jobs over the same data (tests/test_reranker.py)."""
    from negprep.config import parse_job
    from negprep.runner import run_job

    base = tmp_path_factory.mktemp("exports")
    guide = build_tiny_bert(base / "guide", seed=1)
    job = {"input": str(demo_data), "output": str(base / "out"), "work_dir": str(base / "work"),
           "model": str(tiny_bert), "num_negatives": EXPORTED_NEGATIVES, "range_max": 20,
           "guide": {"model": str(guide), "absolute_margin": 0.0, "relative_margin": None},
           "exports": ["flagembedding", "tevatron"], "export": {"flagembedding_temperature": 0.05}}
    return base, run_job(parse_job(job))


def rows_for_output(mined, fmt: str, n: int) -> dict[str, list]:
    """The rows format `fmt` writes for a mined shard, texts left out (what the writer does with them)."""
    from negprep.output.formats import FORMATS
    from negprep.output.formats.pairs import select, written
    from negprep.stages.mine import pairs_for_output

    pairs = pairs_for_output(mined, n)
    return FORMATS[fmt].rows(select(pairs, written(pairs, n, FORMATS[fmt].pairs)), n)
