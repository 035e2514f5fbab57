"""Do negprep's negatives train better retrievers where false negatives are common? MedQuAD, end to end.

MedQuAD (../shared/data/medquad) answers one consumer-health question on several NIH sites; each
training question has one labelled answer, and the other sites' answers on the same topic and
question type are real but unlabelled positives (`qrels/train_silver.tsv`, never shown to a miner).
Naive mining takes exactly those as "hard negatives". This benchmark measures, with
all-MiniLM-L6-v2 as the mining model and `max_length` 128 throughout:

1. **Silver leak**, mining all 14,773 training questions with one negative each: the share of
   chosen negatives that are silver positives (or exact copies of the question's own answer),
   negatives per question, the share of questions left without one, the median negative rank.
   Settings: sentence-transformers' `mine_hard_negatives` naive (ranks 0-50, no margin) and with its
   recommended `relative_margin` 0.05; negprep with no rules; negprep's defaults with the
   all-mpnet-base-v2 guide; the GIST-rule recipe; the defaults in topic batches of 32.
2. **In-batch false negatives**: with MultipleNegativesRankingLoss every other row's passages in a
   batch are negatives too. The share of in-batch (query, other row's passage) pairs that are
   silver or labelled positives of the query, for topic batches with and without negprep's batch
   guard (`batch_guard`), and for the same rows shuffled into batches of 32.
3. **Downstream**: a fresh all-MiniLM-L6-v2 fine-tuned on each setting's triplets
   (MultipleNegativesRankingLoss, 1 epoch, batch 32, lr 2e-5, one negative per question) on a fixed,
   seeded subset of training questions (the same for every setting), once per seed; nDCG@10 on the
   held-out topics (`qrels/test.tsv`, full corpus; own answer gain 2, silver 1) and on TREC 2017
   LiveQA-Med (`qrels/liveqa.tsv`, graded 1-3), for the base model too.

    python benchmarks/medquad.py [--work /tmp/negprep-medquad] [--seeds 0 1] [--train-questions 2000]
    python benchmarks/medquad.py --readme     # the README's tables from benchmarks/results/medquad.json

Everything is cached in `--work`: negprep's work directory (embeddings, search, guide scores: settings
that differ only in mining rules reuse them), sentence-transformers' embedding cache, the mined
outputs. The JSON is written after every step and a rerun resumes from it: mined settings whose job is
unchanged are not mined again, finished (setting, seed) runs are kept. A check of the whole script in
a few minutes: `--smoke` (400 corpus passages, 200 questions, 64 training rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from negprep.models.resolve import resolve_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import downstream  # noqa: E402
from common import machine  # noqa: E402

MODEL, GUIDE = downstream.MODEL, downstream.GUIDE
MAX_LENGTH = 128  # MedQuAD's answers are long; a question's topic is in an answer's first tokens
BATCH, LR = downstream.BATCH, downstream.LR
RANGE_MAX = 50

_EMBED = {"dtype": "float32", "runtime": "torch", "max_length": MAX_LENGTH}


def _negprep(setting: dict) -> dict:
    job = {**downstream.COMMON, **setting, "embed": _EMBED}
    if job.get("guide"):
        job["guide"] = {**job["guide"], "max_length": MAX_LENGTH}
    return json.loads(json.dumps(job))


#: negprep's settings, every mining key written out (downstream.py's SciFact settings at 128 tokens)
NEGPREP = {
    "no-rules": _negprep(downstream.SETTINGS["naive"]),
    "defaults": _negprep(downstream.SETTINGS["shuffled"]),
    "gist": _negprep({**downstream.SETTINGS["gist"], "batch_size": None}),
    "defaults-batches": _negprep({**downstream.SETTINGS["defaults"], "batch_guard": True}),
    # the same topic batches without the guard: only for the in-batch measurement, not trained
    "defaults-batches-noguard": _negprep({**downstream.SETTINGS["defaults"], "batch_guard": False}),
}
#: sentence-transformers' mine_hard_negatives, as its users run it
ST = {
    "st-naive": {"range_max": RANGE_MAX, "num_negatives": 1, "sampling_strategy": "top"},
    "st-margin": {"range_max": RANGE_MAX, "num_negatives": 1, "sampling_strategy": "top", "relative_margin": 0.05},
}
#: in the order they train: the comparison the issue asks for first
TRAINED = ["st-naive", "defaults", "defaults-batches", "st-margin", "no-rules", "gist"]
LABELS = {
    "st-naive": "sentence-transformers `mine_hard_negatives`, naive top-1 (ranks 0-50, no margin)",
    "st-margin": "sentence-transformers `mine_hard_negatives`, `relative_margin` 0.05",
    "no-rules": "negprep, no rules (duplicate handling only), ranks 0-50",
    "defaults": "negprep's defaults, mpnet guide (relative 0.05, absolute 0.0, max_zscore 2.0, ranks 0-200)",
    "gist": "negprep, GIST rule only (guide absolute 0.0), ranks 0-200",
    "defaults-batches": "negprep's defaults + topic batches of 32 (batch guard on)",
    "defaults-batches-noguard": "negprep's defaults + topic batches of 32, batch guard off",
}


# ---------------------------------------------------------------- the collection


def norm(text: str) -> str:
    """A text as negprep compares copies: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


class MedQuAD:
    """The collection's texts and judgments, as negprep reads them (`{title} {text}`)."""

    def __init__(self, data: Path, corpus_limit: int | None = None, questions_limit: int | None = None):
        self.data = data
        self.corpus = {}
        for line in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            self.corpus[str(r["_id"])] = f"{r.get('title', '')} {r['text']}".strip()
        self.queries = {}
        for line in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            self.queries[str(r["_id"])] = r["text"]
        self.train = [(q, d) for q, d, _ in self.qrels("train")]
        self.silver: dict[str, set[str]] = {}
        for q, d, _ in self.qrels("train_silver"):
            self.silver.setdefault(q, set()).add(d)
        if questions_limit:  # a smoke run: the first questions, their judged passages and the first passages
            self.train = self.train[:questions_limit]
            keep = {d for _, d in self.train} | {d for q, _ in self.train for d in self.silver.get(q, ())}
            for name in ("test", "liveqa"):
                keep |= {d for q, d, _ in self.qrels(name)}
            keep |= set(list(self.corpus)[:corpus_limit or 0])
            self.corpus = {d: t for d, t in self.corpus.items() if d in keep}

    def qrels(self, name: str) -> list[tuple[str, str, float]]:
        out = []
        with open(self.data / "qrels" / f"{name}.tsv") as f:
            next(f)
            for line in f:
                q, d, s = line.split("\t")
                out.append((q, d, float(s)))
        return out

    def write_input(self, root: Path, questions: list[str] | None = None) -> Path:
        """A BEIR folder for negprep: this corpus and the training judgments (of `questions` only, if given)."""
        (root / "qrels").mkdir(parents=True, exist_ok=True)
        with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
            for line in (self.data / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
                if json.loads(line)["_id"] in self.corpus:
                    f.write(line + "\n")
        keep = set(questions) if questions is not None else None
        pairs = [(q, d) for q, d in self.train if keep is None or q in keep]
        with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
            for q in dict.fromkeys(q for q, _ in pairs):
                f.write(json.dumps({"_id": q, "text": self.queries[q]}) + "\n")
        with open(root / "qrels" / "train.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            f.writelines(f"{q}\t{d}\t1\n" for q, d in pairs)
        return root

    def silver_texts(self, q: str) -> set[str]:
        """The normalised texts of question q's silver positives (a copy of one is one too)."""
        return {norm(self.corpus[d]) for d in self.silver.get(q, ()) if d in self.corpus}


# ---------------------------------------------------------------- mining


def mine_negprep(name: str, settings: dict, data: MedQuAD, work: Path, questions: list[str] | None = None) -> dict:
    """Run negprep with `settings` into `<work>/out/<name>` (on the training `questions` only, if given)."""
    from negprep.config import parse_job
    from negprep.runner import run_job

    src = data.write_input(work / "input" / ("subset" if questions else "all"), questions)
    job = {"input": str(src), "output": str(work / "out" / name), "work_dir": str(work / "negprep"), **settings}
    t0 = time.perf_counter()
    m = run_job(parse_job(job), overwrite=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "counts": m["counts"],
            "batches": m.get("batches"), "timings": m.get("timings_s")}


def embed_guide_corpus(data: MedQuAD, work: Path) -> dict:
    """The guide's embeddings of the whole corpus, made once by a job that mines with the guide.

    A guide stage embeds only its window's passages unless the whole corpus is embedded with the guide
    already; the window differs with the questions, so the topic-batch job on the training subset would
    embed most of the corpus with mpnet again (about 20 minutes here). With this, every guide stage
    reuses these embeddings."""
    guide = NEGPREP["defaults"]["guide"]
    settings = {**NEGPREP["no-rules"], "model": GUIDE,
                "embed": {k: guide[k] for k in ("dtype", "runtime", "max_length")}}
    return mine_negprep("guide-corpus", settings, data, work)


def negprep_rows(out: Path) -> list[dict]:
    """The output rows in file and batch order."""
    import pyarrow.parquet as pq

    rows = []
    for f in sorted((out / "data").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def mine_st(name: str, data: MedQuAD, work: Path) -> tuple[dict, list[dict]]:
    """sentence-transformers' mine_hard_negatives over all training pairs; rows carry ids where texts allow."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(resolve_model(MODEL), device="cpu")
    model.max_seq_length = MAX_LENGTH
    pairs = {"query": [data.queries[q] for q, _ in data.train], "positive": [data.corpus[d] for _, d in data.train]}
    t0 = time.perf_counter()
    ds = mine_hard_negatives(Dataset.from_dict(pairs), model, corpus=list(data.corpus.values()),
                             output_format="triplet", batch_size=64, use_faiss=True, verbose=False,
                             cache_folder=str(work / "st-cache"), **ST[name])
    seconds = round(time.perf_counter() - t0, 1)
    # a row is a (query text, positive text) pair: map it back to the training questions that have it
    by_key: dict[tuple[str, str], list[str]] = {}
    for q, d in data.train:
        by_key.setdefault((data.queries[q], data.corpus[d]), []).append(q)
    rows = []
    for r in ds:
        qids = by_key[(r["query"], r["positive"])]
        rows.append({"query_ids": qids, "query": r["query"], "positive": r["positive"], "negative": r["negative"]})
    st_ranks(rows, data, work / "st-cache")
    return {"seconds": seconds}, rows


def st_ranks(rows: list[dict], data: MedQuAD, cache: Path) -> None:
    """Each row's negative rank as negprep counts it: passages (not positives) the model scores higher.

    From sentence-transformers' own cached embeddings, in its own order (deduplicated texts)."""
    queries = list(dict.fromkeys(data.queries[q] for q, _ in data.train))
    corpus = list(dict.fromkeys(list(data.corpus.values()) + [data.corpus[d] for _, d in data.train]))
    qemb = next(np.load(f) for f in cache.glob("query_embeddings_*.npy") if np.load(f).shape[0] == len(queries))
    cemb = next(np.load(f) for f in cache.glob("corpus_embeddings_*.npy") if np.load(f).shape[0] == len(corpus))
    qidx, cidx = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(corpus)}
    positives: dict[str, set[int]] = {}
    for q, d in data.train:
        positives.setdefault(data.queries[q], set()).add(cidx[data.corpus[d]])
    for a in range(0, len(rows), 1024):
        chunk = rows[a:a + 1024]
        scores = qemb[[qidx[r["query"]] for r in chunk]] @ cemb.T
        for r, s in zip(chunk, scores, strict=True):
            neg = s[cidx[r["negative"]]]
            pos = list(positives[r["query"]])
            r["negative_rank"] = int((s > neg).sum() - (s[pos] > neg).sum())


# ---------------------------------------------------------------- measurements


def leak(rows: list[dict], data: MedQuAD, questions: list[str]) -> dict:
    """Silver leak and coverage of one setting's rows over `questions`."""
    silver = own = with_silver = 0
    got: set[str] = set()
    for r in rows:
        qids = r.get("query_ids") or [r["query_id"]]
        neg = norm(r["negative"])
        got.update(qids)
        with_silver += any(data.silver.get(q) for q in qids)
        if any(neg in data.silver_texts(q) for q in qids):
            silver += 1
        elif neg == norm(r["positive"]):
            own += 1
    ranks = sorted(r["negative_rank"] for r in rows)
    n = len(rows)
    without = sum(q not in got for q in questions)
    return {"negatives": n, "questions": len(questions), "negatives_per_question": round(n / len(questions), 4),
            "questions_without_negative": without, "share_without_negative": round(without / len(questions), 4),
            "silver_negatives": silver, "silver_share": round(silver / max(1, n), 5),
            # among the negatives of questions that have a silver positive at all
            "negatives_of_questions_with_silver": with_silver,
            "silver_share_where_possible": round(silver / max(1, with_silver), 4),
            "own_answer_copies": own, "own_answer_copy_share": round(own / max(1, n), 5),
            "median_negative_rank": statistics.median(ranks) if ranks else None}


def in_batch(rows: list[dict], data: MedQuAD, batch_size: int, shuffle_seed: int | None = None) -> dict:
    """Share of in-batch (query, another row's passage) pairs that are positives of the query.

    Batches are `batch_id` (negprep's topic batches) or, with `shuffle_seed`, the rows shuffled and cut
    into consecutive batches of `batch_size` (a trainer's default random batches)."""
    labelled: dict[str, set[str]] = {}
    for q, d in data.train:
        labelled.setdefault(data.queries[q], set()).add(norm(data.corpus[d]))
    if shuffle_seed is None:
        groups: dict[int, list[dict]] = {}
        for r in rows:
            groups.setdefault(r["batch_id"], []).append(r)
        batches = list(groups.values())
    else:
        order = list(rows)
        random.Random(shuffle_seed).shuffle(order)
        batches = [order[a:a + batch_size] for a in range(0, len(order) - batch_size + 1, batch_size)]
    pairs = hits = 0
    batches_with = 0
    for b in batches:
        found = 0
        for r in b:
            q = r["query_id"]
            bad = data.silver_texts(q) | labelled[data.queries[q]]
            for s in b:
                if s is r:
                    continue
                for p in (s["positive"], s["negative"]):
                    pairs += 1
                    found += norm(p) in bad
        hits += found
        batches_with += found > 0
    return {"batches": len(batches), "pairs": pairs, "positive_pairs": hits,
            "positive_pair_share": round(hits / max(1, pairs), 6), "batches_with_one": batches_with}


def evaluate(model, data: MedQuAD, limit: int | None = None) -> dict:
    """nDCG@10 (graded gains, as pytrec_eval's ndcg_cut) on the held-out topics and on LiveQA, full corpus."""
    ids = list(data.corpus)
    cemb = model.encode([data.corpus[d] for d in ids], batch_size=64, normalize_embeddings=True,
                        convert_to_numpy=True, show_progress_bar=False)
    out = {}
    for name in ("test", "liveqa"):
        rel: dict[str, dict[str, float]] = {}
        for q, d, s in data.qrels(name):
            if s > 0 and d in data.corpus:
                rel.setdefault(q, {})[d] = s
        qids = sorted(rel)[:limit] if limit else sorted(rel)
        qemb = model.encode([data.queries[q] for q in qids], batch_size=64, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
        scores = qemb @ cemb.T
        ndcg = []
        for q, s in zip(qids, scores, strict=True):
            top = np.argsort(-s, kind="stable")[:10]
            dcg = sum(rel[q].get(ids[i], 0.0) / np.log2(k + 2) for k, i in enumerate(top))
            ideal = sorted(rel[q].values(), reverse=True)[:10]
            ndcg.append(dcg / sum(g / np.log2(k + 2) for k, g in enumerate(ideal)))
        out[name] = round(float(np.mean(ndcg)), 4)
        out[f"{name}_queries"] = len(qids)
    return out


def fine_tune(rows: list[dict], in_order: bool, seed: int, work: Path, name: str):
    """A fresh all-MiniLM-L6-v2 after one epoch of MultipleNegativesRankingLoss on (query, positive, negative)."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    ds = Dataset.from_dict({c: [r[c] for r in rows] for c in ("query", "positive", "negative")})
    model = SentenceTransformer(resolve_model(MODEL), device="cpu")
    model.max_seq_length = MAX_LENGTH
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work / "train" / f"{name}-{seed}"), num_train_epochs=1, per_device_train_batch_size=BATCH,
        learning_rate=LR, seed=seed, data_seed=seed, save_strategy="no", eval_strategy="no", report_to="none",
        logging_steps=20, disable_tqdm=True,
        batch_sampler=downstream.in_order if in_order else BatchSamplers.BATCH_SAMPLER)
    trainer = SentenceTransformerTrainer(model=model, args=args, loss=MultipleNegativesRankingLoss(model),
                                         train_dataset=ds)
    out = trainer.train()
    return model, {"rows": len(ds), "steps": out.global_step, "train_loss": round(float(out.training_loss), 4)}


def subset(data: MedQuAD, n: int, seed: int = 0) -> list[str]:
    """The training questions every setting trains on: a seeded sample, the same for every setting."""
    qs = list(dict.fromkeys(q for q, _ in data.train))
    return sorted(random.Random(seed).sample(qs, min(n, len(qs))))


def training_rows(name: str, rows: list[dict], questions: list[str]) -> list[dict]:
    keep = set(questions)
    if name.startswith("st-"):  # a text row trains once however many question ids share its texts
        return [r for r in rows if any(q in keep for q in r["query_ids"])]
    return [r for r in rows if r["query_id"] in keep]


# ---------------------------------------------------------------- the README's tables

BEGIN, END = "<!-- medquad:begin (python benchmarks/medquad.py --readme) -->", "<!-- medquad:end -->"


def readme_tables(result: dict) -> str:
    lines = ["Silver leak: all training questions, one negative each (floors: the silver list covers part of the "
             "unlabelled positives).", "",
             "| setting | negatives that are silver positives | among questions with a silver positive | copies "
             "of the own answer | questions without a negative | median negative rank |",
             "|---|---|---|---|---|---|"]
    for n, s in result["settings"].items():
        lk = s.get("leak")
        if lk:
            lines.append(f"| {LABELS.get(n, n)} | {100 * lk['silver_share']:.2f}% ({lk['silver_negatives']}) | "
                         f"{100 * lk.get('silver_share_where_possible', 0):.1f}% | "
                         f"{100 * lk['own_answer_copy_share']:.2f}% | {100 * lk['share_without_negative']:.1f}% | "
                         f"{lk['median_negative_rank']} |")
    ib = result.get("in_batch")
    if ib:
        lines += ["", "In-batch false negatives: (query, another row's passage) pairs in batches of 32 that are "
                  "silver or labelled positives of the query.", "",
                  "| batches | pairs | positive pairs | share | batches with one |", "|---|---|---|---|---|"]
        for label, v in ib.items():
            lines.append(f"| {label} | {v['pairs']} | {v['positive_pairs']} | {100 * v['positive_pair_share']:.4f}% "
                         f"| {v['batches_with_one']} of {v['batches']} |")
    runs = result.get("runs", [])
    if runs:
        lines += ["", f"Downstream: all-MiniLM-L6-v2 fine-tuned on {result['train_questions']:,} training questions "
                  "(a seeded subset, the same for every setting), nDCG@10, per seed and the mean; the difference "
                  "is to sentence-transformers' naive top-1, in points.", "",
                  "| setting | held-out topics (seeds) | mean | vs naive | LiveQA (seeds) | mean | vs naive |",
                  "|---|---|---|---|---|---|---|"]
        if "base" in result:
            b = result["base"]
            lines.append(f"| all-MiniLM-L6-v2, not fine-tuned | | {b['test']:.4f} | | | {b['liveqa']:.4f} | |")
        mean = {(n, k): statistics.mean(r[k] for r in runs if r["setting"] == n)
                for n in dict.fromkeys(r["setting"] for r in runs) for k in ("test", "liveqa")}
        for n in [s for s in TRAINED if (s, "test") in mean]:
            rs = [r for r in runs if r["setting"] == n]
            cells = []
            for k in ("test", "liveqa"):
                diff = f"{100 * (mean[n, k] - mean['st-naive', k]):+.2f}" if ("st-naive", k) in mean else ""
                cells += [" / ".join(f"{r[k]:.4f}" for r in rs), f"{mean[n, k]:.4f}", diff if n != "st-naive" else ""]
            lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(result: dict) -> None:
    downstream.write_block(BEGIN, END, readme_tables(result))


# ---------------------------------------------------------------- the run


def fingerprint(name: str) -> str:
    job = NEGPREP.get(name) or ST[name]
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]


def main() -> None:  # noqa: C901 (a script: its steps in order)
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "medquad"))
    ap.add_argument("--work", default="/tmp/negprep-medquad")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-questions", type=int, default=2000)
    ap.add_argument("--settings", nargs="+", default=[*ST, *NEGPREP], choices=[*ST, *NEGPREP])
    ap.add_argument("--no-train", action="store_true", help="mine and measure leaks only")
    ap.add_argument("--smoke", action="store_true", help="a few minutes: 200 questions, 400 extra passages")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "medquad.json"))
    ap.add_argument("--readme", action="store_true", help="only rewrite the README's tables from --out")
    args = ap.parse_args()
    if args.readme:
        write_readme(json.loads(Path(args.out).read_text()))
        return
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = MedQuAD(Path(args.data), *((400, 200) if args.smoke else (None, None)))
    questions = list(dict.fromkeys(q for q, _ in data.train))
    train_qs = subset(data, 64 if args.smoke else args.train_questions)
    t_start = time.perf_counter()
    before = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    # mined settings stay valid for another training subset; finished training runs do not
    same = before.get("smoke") == args.smoke
    same_runs = same and before.get("train_questions") == len(train_qs)
    result = {"data": args.data, "model": MODEL, "guide": GUIDE, "max_length": MAX_LENGTH, "smoke": args.smoke,
              "train_questions": len(train_qs), "questions": len(questions), "epochs": 1, "batch_size": BATCH,
              "lr": LR, "loss": "MultipleNegativesRankingLoss", "seeds": args.seeds,
              "settings": before.get("settings", {}) if same else {}, "in_batch": before.get("in_batch", {}) if same
              else {}, "runs": before.get("runs", []) if same_runs else [], "machine": machine()}
    if same and "base" in before:
        result["base"] = before["base"]

    def save() -> None:
        result["total_seconds"] = round(time.perf_counter() - t_start, 1)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    rows: dict[str, list[dict]] = {}
    if any(NEGPREP.get(n, {}).get("guide") for n in args.settings) and "guide-corpus" not in result["settings"]:
        result["settings"]["guide-corpus"] = embed_guide_corpus(data, work)
        print(f"guide embeddings of the corpus: {result['settings']['guide-corpus']['seconds']} s", flush=True)
        save()
    for name in args.settings:
        done = result["settings"].get(name, {}).get("fingerprint") == fingerprint(name)
        if name in ST:
            if done and (work / "st" / f"{name}.json").exists():
                rows[name] = json.loads((work / "st" / f"{name}.json").read_text())
                info = result["settings"][name]
            else:
                info, rows[name] = mine_st(name, data, work)
                (work / "st").mkdir(exist_ok=True)
                (work / "st" / f"{name}.json").write_text(json.dumps(rows[name]))
        else:
            if not (done and (work / "out" / name / "_SUCCESS").exists()):
                info = mine_negprep(name, NEGPREP[name], data, work)
                result["settings"][name] = {"fingerprint": fingerprint(name), **info}
            rows[name] = negprep_rows(work / "out" / name)
            info = result["settings"][name]
        result["settings"][name] = {**info, "fingerprint": fingerprint(name), "leak": leak(rows[name], data, questions)}
        lk = result["settings"][name]["leak"]
        print(f"{name}: {lk['negatives']} negatives, silver {100 * lk['silver_share']:.2f}%, own copies "
              f"{100 * lk['own_answer_copy_share']:.2f}%, without {100 * lk['share_without_negative']:.1f}%, "
              f"median rank {lk['median_negative_rank']} ({result['settings'][name].get('seconds')} s)", flush=True)
        save()
    for name, label in (("defaults-batches-noguard", "topic batches, guard off"),
                        ("defaults-batches", "topic batches, guard on")):
        if name in rows:
            result["in_batch"][label] = in_batch(rows[name], data, BATCH)
    if "defaults" in rows:  # the same negatives in a trainer's random batches
        result["in_batch"]["the defaults' rows shuffled"] = in_batch(rows["defaults"], data, BATCH, shuffle_seed=0)
    save()
    print(json.dumps(result["in_batch"], indent=1), flush=True)
    if args.no_train:
        return

    import ray

    ray.shutdown()  # the mining's local Ray would hold memory and cores during training
    # the topic batches of the training subset: mined again on those questions only, so its batches are whole
    sub_name = "defaults-batches"
    train_rows = {n: training_rows(n, rows[n], train_qs) for n in TRAINED if n in rows and n != sub_name}
    if sub_name in args.settings:
        sub_out = work / "out" / "subset-batches"
        key = fingerprint(sub_name) + hashlib.sha256(",".join(train_qs).encode()).hexdigest()[:8]
        known = result["settings"].get("subset-batches", {}).get("fingerprint")
        if known != key or not (sub_out / "_SUCCESS").exists():
            info = mine_negprep("subset-batches", NEGPREP[sub_name], data, work, train_qs)
            result["settings"]["subset-batches"] = {"fingerprint": key, **info}
            save()
        ray.shutdown()
        train_rows[sub_name] = negprep_rows(sub_out)
    limit = 100 if args.smoke else None
    for name in TRAINED:  # setting by setting: the comparison the issue asks for first is complete first
        for seed in args.seeds:
            if name not in train_rows or any(r["setting"] == name and r["seed"] == seed for r in result["runs"]):
                continue
            t0 = time.perf_counter()
            model, info = fine_tune(train_rows[name], name == sub_name, seed, work, name)
            t1 = time.perf_counter()
            scores = evaluate(model, data, limit)
            run = {"setting": name, "seed": seed, **scores, **info, "train_seconds": round(t1 - t0, 1),
                   "eval_seconds": round(time.perf_counter() - t1, 1)}
            result["runs"].append(run)
            print(f"{name} seed {seed}: held-out {scores['test']:.4f}, LiveQA {scores['liveqa']:.4f} "
                  f"(train {run['train_seconds']:.0f} s, eval {run['eval_seconds']:.0f} s, {info['steps']} steps)",
                  flush=True)
            save()
    if "base" not in result:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(resolve_model(MODEL), device="cpu")
        model.max_seq_length = MAX_LENGTH
        result["base"] = evaluate(model, data, limit)
        save()
    result["runs"].sort(key=lambda r: (TRAINED.index(r["setting"]), r["seed"]))
    save()
    print(readme_tables(result))


if __name__ == "__main__":
    main()
