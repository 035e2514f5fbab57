"""Devices: `auto` resolves to the CPU without GPUs, `cuda` without one is one line, and the CUDA
code paths (the encoder's GPU batching, CPU tokenising streamed to GPU actors) run on CPU tensors
under the test switch, giving the CPU's embeddings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from negprep.config import parse_job
from negprep.errors import ConfigError
from negprep.models import devices
from negprep.models.encoders import GPU_BATCH_TOKENS, Encoder, EncoderSpec, encoder_specs, load_model
from negprep.models.pool import ShardEmbedder, batching, embed_shard, tokenize_rows
from negprep.models.tokens import piece_bounds
from negprep.paths import Folder
from negprep.runner import run_job


class _Cfg:
    pooling, max_length, normalize, passage_prompt, query_prompt, trust_remote_code = "auto", 128, True, "", "", False
    dtype = "auto"


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    monkeypatch.setenv(devices.CUDA_ON_CPU, "1")


def _job(**extra):
    return parse_job({"input": "x", "output": "/tmp/o", "model": "m", **extra})


def test_auto_is_the_cpu_without_gpus_and_cuda_when_the_cluster_has_them():
    assert devices.job_devices(_job(), 0) == {"embed": "cpu", "search": "cpu"}
    assert devices.job_devices(_job(guide={"model": "g"}), 2) == {"embed": "cuda", "search": "cuda", "guide": "cuda"}
    # onnxruntime and approximate indexes stay on the CPU under auto
    cpu_only = _job(embed={"runtime": "onnxruntime"}, search={"index": "ivf"})
    assert devices.job_devices(cpu_only, 1) == {"embed": "cpu", "search": "cpu"}
    assert devices.job_devices(_job(embed={"device": "cpu"}), 1)["embed"] == "cpu"
    assert devices.resolve_dtype("auto", "cuda") == "bfloat16"
    native = devices.cpu_multiplies_bfloat16()
    assert devices.resolve_dtype("auto", "cpu") == ("bfloat16" if native else "float32")
    assert devices.resolve_dtype("auto", "cpu", "onnxruntime") == "float32"
    assert devices.resolve_dtype("int8", "cpu") == "int8"


def test_int8_on_cuda_is_refused_before_any_work():
    # named on the device: refused when the job is read
    with pytest.raises(ConfigError, match="dtype int8 runs on the CPU"):
        _job(embed={"device": "cuda", "dtype": "int8"})
    # auto resolving to cuda (the cluster has GPUs): refused when the devices are resolved, before any stage
    with pytest.raises(ConfigError, match=r"^embed.dtype: int8 runs on the CPU, but the device resolved to cuda"):
        devices.job_devices(_job(embed={"dtype": "int8"}), 1)
    with pytest.raises(ConfigError, match=r"^guide.dtype: int8"):
        devices.job_devices(_job(guide={"model": "g", "dtype": "int8"}), 1)
    assert devices.job_devices(_job(embed={"dtype": "int8"}), 0)["embed"] == "cpu"  # fine on the CPU
    assert devices.job_devices(_job(embed={"dtype": "int8", "device": "cpu"}), 1)["embed"] == "cpu"
    # auto never picks int8
    assert devices.resolve_dtype("auto", "cuda") == "bfloat16"


def test_sdpa_only_where_the_architecture_supports_it(tiny_bert, monkeypatch):
    import torch
    from transformers import AutoModel, BertModel

    assert load_model(AutoModel, str(tiny_bert), torch.float32, {}, sdpa=True).config._attn_implementation == "sdpa"
    monkeypatch.setattr(BertModel, "_supports_sdpa", False)  # transformers' own check refuses SDPA now
    model = load_model(AutoModel, str(tiny_bert), torch.float32, {}, sdpa=True)
    assert model.config._attn_implementation != "sdpa"


def test_cuda_without_a_gpu_is_one_line_before_any_work(ray_session, tmp_path, demo_data, tiny_bert):
    job = parse_job({"input": str(demo_data), "output": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                     "model": str(tiny_bert), "embed": {"device": "cuda"}})
    with pytest.raises(ConfigError, match=r"^embed.device: cuda, but the Ray cluster offers no GPU"):
        run_job(job)
    assert not (tmp_path / "work" / "input").exists()  # no stage started
    with pytest.raises(ConfigError, match="device cuda searches index flat"):
        _job(search={"device": "cuda", "index": "hnsw"})
    with pytest.raises(ConfigError, match="onnxruntime runs on the CPU"):
        _job(embed={"device": "cuda", "runtime": "onnxruntime"})


def test_the_device_is_part_of_the_cache_key(tiny_bert):
    cpu, _ = encoder_specs(str(tiny_bert), _Cfg())
    gpu, _ = encoder_specs(str(tiny_bert), _Cfg(), device="cuda")
    assert cpu.device == "cpu" and cpu.dtype == devices.resolve_dtype("auto", "cpu")
    assert (gpu.device, gpu.dtype) == ("cuda", "bfloat16")
    gpu32 = EncoderSpec(**{**gpu.__dict__, "dtype": "float32"})
    assert len({cpu.key(), gpu.key(), gpu32.key()}) == 3


def _texts() -> list[str]:
    return [" ".join(["word"] * k) + f" {k}" for k in range(1, 120, 3)] * 2


def test_gpu_code_path_on_cpu_tensors_gives_the_cpu_embeddings(tiny_bert, cuda_on_cpu):
    cpu_spec, _ = encoder_specs(str(tiny_bert), _Cfg())
    cpu_spec = EncoderSpec(**{**cpu_spec.__dict__, "dtype": "float32"})
    gpu_spec = EncoderSpec(**{**cpu_spec.__dict__, "device": "cuda"})
    cpu, gpu = Encoder(cpu_spec), Encoder(gpu_spec)
    assert gpu.gpu and gpu.device.type == "cpu" and "CPU tensors" in gpu.device_name
    assert gpu._mask_4d  # padded batches hand transformers a prepared mask: no check of it on the host
    ref = cpu.encode(_texts(), batch_size=16, batch_tokens=2048)
    # the GPU's batching (a token budget, every batch of a width padded to the same rows) changes nothing
    for batch_size, batch_tokens in ((4096, GPU_BATCH_TOKENS), (5, 64), (1, None)):
        got = gpu.encode(_texts(), batch_size=batch_size, batch_tokens=batch_tokens)
        assert np.array_equal(got, ref), (batch_size, batch_tokens)
    # bfloat16, as auto picks on a GPU: close to fp32
    bf16 = Encoder(EncoderSpec(**{**gpu_spec.__dict__, "dtype": "bfloat16"})).encode(_texts(), 4096, GPU_BATCH_TOKENS)
    cos = (bf16 * ref).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.99


def _pieces(spec, src, bounds):
    return [tokenize_rows(spec, src, a, b, spec.prompt) for a, b in bounds]


def test_tokenising_in_cpu_tasks_gives_the_actors_own_embeddings_whatever_the_pieces(tiny_bert, tmp_path,
                                                                                      cuda_on_cpu):
    spec, _ = encoder_specs(str(tiny_bert), _Cfg(), device="cuda")
    spec = EncoderSpec(**{**spec.__dict__, "dtype": "float32", "prompt": "q: "})
    folder = Folder(str(tmp_path))
    texts = _texts() + _texts()[:7]  # repeated texts, within and across pieces
    n = len(texts)
    folder.write_parquet("shard.parquet", pa.table({"id": [f"d{i}" for i in range(n)], "text": texts}))
    src = folder.file("shard.parquet")
    actor = ShardEmbedder(spec, 1, *batching(_job(embed={"dtype": "float32"}).embed, "cuda"))
    enc = actor.encoder
    ref = enc.encode_pieces(iter(_pieces(spec, src, piece_bounds(n))), n, 16, 256)
    # the batches depend on the shard's rows alone: any cut into pieces gives the same bits
    for bounds in ([(0, n)], [(0, 1), (1, 40), (40, n)], [(i, min(n, i + 7)) for i in range(0, n, 7)]):
        assert np.array_equal(enc.encode_pieces(iter(_pieces(spec, src, bounds)), n, 16, 256), ref), bounds
    # a repeated text is embedded once and has one vector
    assert np.array_equal(ref[len(_texts())], ref[0])
    # and the CPU's embeddings (same widths, no mask for unpadded batches, pooled the same way)
    embed_shard(Encoder(EncoderSpec(**{**spec.__dict__, "device": "cpu"})), src, folder.file("direct.parquet"), 16,
                2048, "q: ")
    direct = folder.read_parquet("direct.parquet")
    assert np.array_equal(np.array(direct.column("embedding").to_pylist(), dtype=np.float32), ref)
    with pytest.raises(ValueError, match="pieces held 1 rows"):
        enc.encode_pieces(iter(_pieces(spec, src, [(0, 1)])), n, 16, 256)


def test_piece_bounds_start_small_and_cover_the_shard():
    assert piece_bounds(0) == []
    assert piece_bounds(100) == [(0, 100)]
    assert piece_bounds(6000) == [(0, 256), (256, 768), (768, 1792), (1792, 3840), (3840, 5888), (5888, 6000)]


def test_gpu_batching_defaults_unless_the_job_sets_them():
    assert batching(_job().embed, "cuda") == (4096, GPU_BATCH_TOKENS)
    assert batching(_job().embed, "cpu") == (256, 2048)
    assert batching(_job(embed={"batch_tokens": 8192}).embed, "cuda") == (4096, 8192)


def test_bfloat16_on_a_cpu_does_not_depend_on_the_sharding(tiny_bert):
    # bfloat16 GEMMs round differently for other row counts: every batch of a width has the same rows
    spec, _ = encoder_specs(str(tiny_bert), _Cfg())
    enc = Encoder(EncoderSpec(**{**spec.__dict__, "dtype": "bfloat16"}))
    texts = _texts()
    ref = enc.encode(texts, 256, 2048)
    for cut in (1, 17, 50):
        got = np.concatenate([enc.encode(texts[:cut], 256, 2048), enc.encode(texts[cut:], 256, 2048)])
        assert np.array_equal(got, ref), cut
