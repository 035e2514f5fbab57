"""The read stage on one big input file: time, worker and driver memory, 1 vs 2 workers.

Generates corpora of 1M and 5M short passages, each as ONE JSONL file and ONE Parquet file
(row groups of 64k rows), and runs only the read stage on them in a fresh process with its own
local Ray of 1 and then 2 CPUs. Records the read time, the driver's peak RSS and the largest peak
RSS of any Ray worker process (both polled every 0.2 s; not getrusage, whose peak a child process
inherits from the parent that forked it). A whole-file read
(`read.piece_mb` larger than the file: one task, as before pieces existed) is run at 1M for
comparison.

    .venv/bin/python benchmarks/read_scale.py                        # 1M and 5M passages
    .venv/bin/python benchmarks/read_scale.py --sizes 200000 --out /tmp/read.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
from common import NOTE, machine, write_corpus

_DRIVER = """
import json, sys, time
from negprep.config import parse_job
from negprep.execution import Executor, start_ray
from negprep.paths import Folder
from negprep.stages.base import Run
from negprep.stages.read import Read
job = parse_job(json.loads(sys.argv[1]))
start_ray(None, int(sys.argv[2]), 1024)
run = Run(job, Folder(job.work_dir), Folder(job.output), Executor(0))
t0 = time.perf_counter()
Read().run(run, force=True)
r = run.read
print("RESULT", json.dumps({"read_s": round(time.perf_counter() - t0, 2), "passages": r.passages,
      "pieces": r.inputs["corpus"]["pieces"], "shards": len(r.corpus_shards)}), flush=True)
"""


def _is_worker(p) -> bool:
    with contextlib.suppress(Exception):
        cmd = " ".join(p.cmdline())
        return "default_worker.py" in cmd or p.name().startswith("ray::")
    return False


def read_once(job: dict, cpus: int) -> dict:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, json.dumps(job), str(cpus)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peaks: dict[int, int] = {}
    driver = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal driver
        me = psutil.Process(proc.pid)
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                driver = max(driver, me.memory_info().rss)
                for c in me.children(recursive=True):
                    if _is_worker(c):
                        with contextlib.suppress(psutil.Error):
                            peaks[c.pid] = max(peaks.get(c.pid, 0), c.memory_info().rss)
            time.sleep(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(err[-3000:])
    res = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[7:])
    res["largest_worker_mb"] = round(max(peaks.values(), default=0) / 2**20, 1)
    res["driver_peak_mb"] = round(driver / 2**20, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--piece-mb", type=float, default=None, help="read.piece_mb (default: the job default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "read_scale.json"))
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="negprep-read-"))
    rows = []
    print(f"{'passages':>10} {'format':>8} {'MB':>7} {'workers':>8} {'pieces':>7} {'read s':>8} "
          f"{'largest worker MB':>18} {'driver MB':>10}")
    for n in args.sizes:
        data = tmp / f"corpus-{n}"
        if not (data / "corpus.jsonl").exists():
            write_corpus(data, n)
        parquet = data / "corpus.parquet"
        if not parquet.exists():
            pl.read_ndjson(data / "corpus.jsonl").write_parquet(parquet, row_group_size=65_536)
        for fmt in ("jsonl", "parquet"):
            corpus = data / f"corpus.{fmt}"
            runs = [(1, None), (2, None)] + ([(1, 1e6)] if n == min(args.sizes) else [])
            for cpus, piece in runs:
                job = {"input": {"corpus": str(corpus), "queries": str(data / "queries.jsonl"),
                                 "qrels": str(data / "qrels" / "train.tsv")},
                       "output": str(tmp / "out"), "work_dir": str(tmp / f"work-{n}-{fmt}-{cpus}-{piece}"),
                       "model": "unused"}
                if piece or args.piece_mb:
                    job["read"] = {"piece_mb": piece or args.piece_mb}
                r = read_once(job, cpus)
                row = {"passages": n, "format": fmt, "file_mb": round(corpus.stat().st_size / 2**20), "workers": cpus,
                       "whole_file": bool(piece), **r}
                rows.append(row)
                label = f"{cpus}{' (whole file)' if piece else ''}"
                print(f"{n:>10,} {fmt:>8} {row['file_mb']:>7} {label:>8} {r['pieces']:>7} {r['read_s']:>8.1f} "
                      f"{r['largest_worker_mb']:>18.0f} {r['driver_peak_mb']:>10.0f}", flush=True)
    summary = {}
    for fmt in ("jsonl", "parquet"):
        split = [r for r in rows if r["format"] == fmt and not r["whole_file"]]
        one = {r["passages"]: r for r in split if r["workers"] == 1}
        two = {r["passages"]: r for r in split if r["workers"] == 2}
        lo, hi = min(one), max(one)
        summary[fmt] = {
            "worker_peak_growth": round(one[hi]["largest_worker_mb"] / one[lo]["largest_worker_mb"] - 1, 3),
            "speedup_2_workers": {n: round(one[n]["read_s"] / two[n]["read_s"], 2) for n in one},
        }
        print(f"{fmt}: largest worker {one[lo]['largest_worker_mb']:.0f} -> {one[hi]['largest_worker_mb']:.0f} MB "
              f"({summary[fmt]['worker_peak_growth']:+.0%}) from {lo:,} to {hi:,} passages; "
              f"2 workers vs 1: {summary[fmt]['speedup_2_workers']}")
    print(NOTE)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": rows, "summary": summary, "note": NOTE, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
