"""The sentence-transformers side of benchmarks/vs_sentence_transformers.py (run in its own process)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives


def main(data: str, out: str, model_dir: str) -> None:
    t0 = time.perf_counter()
    corpus = {}
    for line in Path(f"{data}/corpus.jsonl").read_text().splitlines():
        r = json.loads(line)
        corpus[str(r["_id"])] = f"{r.get('title', '')} {r['text']}".strip()
    lines = Path(f"{data}/queries.jsonl").read_text().splitlines()
    queries = {str(r["_id"]): r["text"] for r in map(json.loads, lines)}
    pairs = {"query": [], "positive": []}
    with open(f"{data}/qrels/train.tsv") as f:
        next(f)
        for line in f:
            q, d, s = line.split()
            if float(s) > 0 and d in corpus and q in queries:
                pairs["query"].append(queries[q])
                pairs["positive"].append(corpus[d])
    model = SentenceTransformer(model_dir, device="cpu")
    ds = mine_hard_negatives(Dataset.from_dict(pairs), model, corpus=list(corpus.values()), range_max=50,
                             relative_margin=0.05, num_negatives=5, sampling_strategy="top", output_format="triplet",
                             batch_size=32, use_faiss=True, verbose=True)
    ds.to_parquet(out)
    print(json.dumps({"seconds_inside": round(time.perf_counter() - t0, 2), "rows": len(ds)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
