"""The end-of-run summary printed by `negprep run`, built from the manifest alone."""

from __future__ import annotations

from negprep.mining import REASONS


def _n(x: int) -> str:
    return f"{x:,}"


def format_summary(m: dict) -> str:
    c = m["counts"]
    cfg = m["config"]
    lines = [
        f"negprep: {_n(m['rows'])} {m['format']} rows for {_n(c.get('pairs', 0))} (query, positive) pairs "
        f"of {_n(c.get('queries', 0))} queries in {m['timings_s']['total']:.1f} s",
        f"  inputs: {_n(c['passages'])} passages, {_n(c['queries'])} queries with positives, "
        f"{_n(c['positives'])} positives; {_n(c['rejected_input_rows'])} input rows rejected",
        f"  candidates in ranks [{cfg['range_min']}, {cfg['range_max']}): {_n(c.get('candidates', 0))}, "
        f"kept {_n(c.get('kept', 0))}",
    ]
    drops = [f"{r} {_n(c.get('dropped_' + r, 0))}" for r in REASONS if c.get("dropped_" + r)]
    lines.append("  skipped by rule: " + (", ".join(drops) if drops else "none"))
    lines.append(
        f"  queries short of {cfg['num_negatives']} negatives: {_n(c.get('queries_short', 0))} "
        f"(with no candidate left: {_n(c.get('queries_without_candidates', 0))}); "
        f"pairs short: {_n(c.get('pairs_short', 0))}; negatives chosen: {_n(c.get('negatives', 0))}"
    )
    head = f"  {'':16}" + "".join(f"{k:>9}" for k in ("min", "p05", "p25", "p50", "p75", "p95", "max"))
    lines.append(head)
    for name, label in (
        ("positive_scores", "positive score"),
        ("negative_scores", "negative score"),
        ("negative_ranks", "negative rank"),
    ):
        q = m["scores"].get(name)
        if q:
            lines.append(f"  {label:16}" + "".join(f"{v:>9.4g}" for v in q.values()))
    lines.append("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    lines.append(f"  output: {m['output']}/data/*.parquet (manifest.json, _SUCCESS)")
    lines.append(f'  load: datasets.load_dataset("parquet", data_files="{m["output"]}/data/*.parquet", split="train")')
    return "\n".join(lines)
