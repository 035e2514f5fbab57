"""Rewrite the README's "Speed against sentence-transformers" section from benchmarks/results/*.json.

    python benchmarks/readme_table.py   # after vs_sentence_transformers.py and embed_throughput.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- speed:begin (benchmarks/readme_table.py) -->", "<!-- speed:end -->"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def render(vs: dict, emb: dict) -> str:
    m = vs["machine"]
    v = m["versions"]
    st = vs["sentence_transformers"]
    rows = [["sentence-transformers `mine_hard_negatives`", f"{st['seconds']:.0f} s", "1.00",
             f"{st['peak_pss_mb']:,} MB", "1.00", "", "", ""]]
    for run, r in vs["negprep"].items():
        s = r["stage_seconds"]
        runtime, _, dtype = run.rpartition(":")
        dtype, _, compiled = dtype.partition("+")
        label = f"negprep, {'runtime onnxruntime, ' if runtime else ''}embed.dtype {dtype}" + (
            ", embed.compile" if compiled else "")
        rows.append([label, f"{r['seconds']:.0f} s", f"{r['wall_time_ratio']:.2f}",
                     f"{r['peak_pss_mb']:,} MB", f"{r['peak_pss_ratio']:.2f}",
                     f"{r['negative_overlap_on_common_pairs']:.1%}", f"{s['embed']:.0f} s",
                     f"{s['total'] - s['embed']:.0f} s"])
    e2e = table(["run", "wall", "x ST", "peak memory (PSS)", "x ST", "same negatives", "embed", "rest"], rows)
    split = "; ".join(
        f"{run}: the embedding actor {g['ray_workers']:,} MB, the driver {g['driver']:,} MB, Ray's own processes "
        f"{g['ray_system']:,} MB" for run, r in vs["negprep"].items() if (g := r.get("peak_pss_by_group_mb")))
    split = f"At negprep's peak ({split})." if split else ""
    b = emb["fp32_bound_tokens_per_s"]
    erows = [["sentence-transformers `encode` (fp32)", f"{emb['sentence_transformers']['tokens_per_s']:,}",
              f"{emb['sentence_transformers']['share_of_fp32_bound']:.0%}", "", "", "", ""]]
    for name, r in emb.items():
        if name.startswith("negprep_"):
            onnx = name.startswith("negprep_onnxruntime_")
            dtype, _, compiled = name.removeprefix("negprep_onnxruntime_" if onnx else "negprep_").partition("_")
            label = f"negprep Encoder ({'onnxruntime ' if onnx else ''}{dtype}{', embed.compile' if compiled else ''})"
            first = r.get("compile_and_first_64_seconds")
            erows.append([label, f"{r['tokens_per_s']:,}", f"{r['share_of_fp32_bound']:.0%}",
                          f"{r['recall_at_10']:.3f}", r.get("mean_cosine_to_fp32", ""),
                          r.get("recall_at_10_points_vs_fp32", ""), f"{first:.0f} s" if first else ""])
    et = table(["encoder", "non-pad tokens/s", "of fp32 bound", "recall@10", "cosine to fp32",
                "recall@10 vs fp32 (points)", "compile (+ first 64 texts)"], erows)
    return f"""{BEGIN}
Measured on {m['cores']} cores of an {m['cpu']} ({', '.join(m['isa'])}), {m['memory_gib']} GiB, Python {m['python']};
torch {v['torch']}, onnxruntime {v.get('onnxruntime', '?')}, transformers {v['transformers']},
sentence-transformers {v['sentence-transformers']},
ray {v['ray']}, faiss-cpu {v['faiss-cpu']}. {vs['settings']}; both embed from scratch.
Peak memory is the proportional set size (PSS) summed over each tool's process tree, sampled every
1 s (reading every process's smaps costs CPU): for negprep that includes every Ray process.

{e2e}

{split}

Embedding alone, {emb['passages']:,} SciFact passages ({emb['tokens']:,} tokens), {emb['threads']} threads.
The fp32 bound is the measured fp32 `linear` rate at the model's shapes
({emb['gemm_gflops_fp32_model_shapes']} GFLOP/s on average; bf16: {emb['gemm_gflops_bf16_model_shapes']}) over
{emb['mflops_per_token']} MFLOP per token = {b:,} tokens/s. This host's speed drifts (the GEMM rate ranged
{emb.get('gemm_gflops_fp32_range', ['?', '?'])[0]}-{emb.get('gemm_gflops_fp32_range', ['?', '?'])[1]} GFLOP/s
during the run), so the encoders take turns on {emb.get('blocks', 1)} blocks of the corpus with the rate
probed between blocks, and each one's share of the bound is against the rate probed around its own blocks.
Recall@10 is over the {emb['queries_judged']}
judged SciFact queries (train and test qrels) against the whole corpus.

{et}

Regenerate: `python benchmarks/vs_sentence_transformers.py; python benchmarks/embed_throughput.py;
python benchmarks/readme_table.py`.
{END}"""


def main() -> None:
    res = ROOT / "benchmarks" / "results"
    vs = json.loads((res / "vs_sentence_transformers.json").read_text())
    emb = json.loads((res / "embed_throughput.json").read_text())
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = render(vs, emb)
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        raise SystemExit(f"README.md has no {BEGIN} marker")
    readme.write_text(text)
    print(block)


if __name__ == "__main__":
    main()
