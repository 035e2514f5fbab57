"""The driver's peak memory does not grow with the corpus.

Runs the whole job (`negprep run`, its own local Ray) on generated corpora of increasing size with
the tiny offline model and records the driver process's peak RSS (getrusage in the driver itself),
the largest RSS any Ray worker reached, and the stage timings. Texts, embeddings and candidates
move between workers through storage; the driver only handles shard names and counts.

    .venv/bin/python benchmarks/driver_memory.py                       # 10k 100k 300k 1M
    .venv/bin/python benchmarks/driver_memory.py --sizes 10000 100000 --out /tmp/driver.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from common import NOTE, run_cli, tiny_model, write_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/driver_memory.json")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a new temp dir)")
    args = ap.parse_args()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="negprep-bench-"))
    model = tiny_model(tmp / "tiny-bert")
    rows = []
    print(f"{'passages':>10} {'driver peak MB':>15} {'largest worker MB':>18} {'wall s':>8}  stage seconds")
    for n in args.sizes:
        data = write_corpus(tmp / f"corpus-{n}", n, args.queries)
        job = {
            "input": str(data),
            "output": str(tmp / f"out-{n}"),
            "work_dir": str(tmp / f"work-{n}"),
            "model": str(model),
            "num_negatives": 3,
            "range_max": 20,
            "embed": {"batch_size": 64, "max_length": 64},
            "ray": {"num_cpus": 2, "object_store_mb": 512},
        }
        r = run_cli(job, tmp / f"run-{n}")
        m = r.pop("manifest")
        row = {"passages": n, "queries": args.queries, **r, "timings_s": m["timings_s"], "rows": m["rows"]}
        row["corpus_shards"] = m["stages"]["embed"]["corpus"]["shards"]
        rows.append(row)
        stages = " ".join(f"{k} {v:.0f}" for k, v in m["timings_s"].items())
        mem = f"{r['driver_peak_mb']:>15.0f} {r['largest_worker_rss_mb']:>18.0f}"
        print(f"{n:>10,} {mem} {r['wall_s']:>8.0f}  {stages}")
    growth = rows[-1]["driver_peak_mb"] - rows[0]["driver_peak_mb"]
    print(f"driver peak grew {growth:+.0f} MB from {rows[0]['passages']:,} to {rows[-1]['passages']:,} passages")
    print(NOTE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"runs": rows, "driver_growth_mb": growth, "note": NOTE, "machine": platform.node()}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
