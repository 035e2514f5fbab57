"""Real-GPU checks of the encoder (`pytest -m cuda tests/test_cuda.py`; skipped without CUDA).

This file imports only what the GPU test machine has (torch, transformers, tokenizers, numpy,
pytest): negprep.models.encoders and negprep.models.devices, never the config, Ray, faiss or polars.
tests/test_gpu_imports.py collects it with those blocked, so the device check cannot fail at
collection.
"""

from __future__ import annotations

import numpy as np
import pytest

from negprep.models import devices
from negprep.models.encoders import GPU_BATCH_SIZE, GPU_BATCH_TOKENS, Encoder, EncoderSpec
from negprep.models.tokens import text_tokenizer, tokenize_piece


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (the device check)")]


def _texts() -> list[str]:
    return [" ".join(["word"] * k) + f" {k}" for k in range(1, 120, 3)] * 2


def _spec(model_dir, **kw) -> EncoderSpec:
    return EncoderSpec(**{"model_dir": str(model_dir), "fingerprint": "t", "pooling": "mean", "max_length": 128,
                          "normalize": True, "prompt": "", "dtype": "bfloat16", "device": "cuda", **kw})


@pytest.fixture(autouse=True)
def _real_cuda(monkeypatch):
    monkeypatch.delenv(devices.CUDA_ON_CPU, raising=False)


def test_on_a_real_gpu_the_encoder_stays_within_tolerance_and_repeats_itself(tiny_bert):
    cpu = Encoder(_spec(tiny_bert, device="cpu", dtype="float32")).encode(_texts(), 16, 2048)
    gpu = Encoder(_spec(tiny_bert))
    assert gpu.device.type == "cuda"
    ref = gpu.encode(_texts(), GPU_BATCH_SIZE, GPU_BATCH_TOKENS)
    cos = (ref * cpu).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() >= 0.99
    # another actor with the same shard: the same batches, the same bits
    assert np.array_equal(Encoder(_spec(tiny_bert)).encode(_texts(), GPU_BATCH_SIZE, GPU_BATCH_TOKENS), ref)


def test_on_a_real_gpu_pieces_stream_and_give_the_same_bits_whatever_the_cut(tiny_bert):
    enc = Encoder(_spec(tiny_bert, dtype="float32"))
    ids = text_tokenizer(str(tiny_bert), 128)
    texts = _texts()
    n = len(texts)

    def run(bounds):
        return enc.encode_pieces((tokenize_piece(ids, texts[a:b]) for a, b in bounds), n, 16, 512)

    ref = run([(0, n)])
    assert np.array_equal(run([(0, 3), (3, 50), (50, n)]), ref)
    cpu = Encoder(_spec(tiny_bert, device="cpu", dtype="float32")).encode(texts, 16, 2048)
    assert ((ref * cpu).sum(1)).min() >= 0.999


def test_int8_is_refused_on_cuda(tiny_bert):
    from negprep.errors import ConfigError

    with pytest.raises(ConfigError, match="int8 runs on the CPU"):
        Encoder(_spec(tiny_bert, dtype="int8"))
