"""What the command line prints: the end-of-run summary of `negprep run`, built from the manifest
alone, and the input check of `negprep validate`."""

from __future__ import annotations

from negprep.config import Job
from negprep.output.formats import FORMATS
from negprep.rules.mining import REASONS


def _n(x: int) -> str:
    return f"{x:,}"


def format_summary(m: dict) -> str:
    c = m["counts"]
    cfg = m["config"]
    lines = [
        f"negprep: {_n(m['rows'])} {m['format']} rows for {_n(c.get('pairs', 0))} (query, positive) pairs "
        f"of {_n(c.get('queries', 0))} queries in {m['timings_s']['total']:.1f} s",
        f"  inputs: {_n(c['passages'])} passages, {_n(c['queries'])} queries with positives, "
        f"{_n(c['positives'])} positives; {_n(c['rows_rejected'])} input rows rejected",
        f"  candidates in ranks [{cfg['range_min']}, {cfg['range_max']}): {_n(c.get('candidates', 0))}, "
        f"kept {_n(c.get('kept', 0))}",
    ]
    if c["rows_rejected"]:
        why: dict[str, int] = {}
        for s in (m.get("inputs") or {}).values():
            for k, v in (s.get("rejected") or {}).items():
                why[k] = why.get(k, 0) + v
        where = f"{m['output']}/{m['rejected_input_file']}" if m.get("rejected_input_file") else "the work directory"
        lines.insert(2, f"  rejected input rows: {', '.join(f'{k} {_n(v)}' for k, v in why.items())} (in {where})")
    drops = [f"{r} {_n(c.get('dropped_' + r, 0))}" for r in REASONS if c.get("dropped_" + r)]
    lines.append("  dropped by rule: " + (", ".join(drops) if drops else "none"))
    lines.append(
        f"  queries short of {cfg['num_negatives']} negatives: {_n(c.get('queries_short', 0))} "
        f"(with no candidate left: {_n(c.get('queries_without_candidates', 0))}); "
        f"pairs short: {_n(c.get('pairs_short', 0))}; negatives chosen: {_n(c.get('negatives', 0))}"
    )
    if "pairs_written" in c:
        lines.append(f"  written: {_n(c['pairs_written'])} pairs with {_n(c['negatives_written'])} negatives"
                     + (" (before topic batches)" if m.get("batches") else ""))
    lines += _score_lines(m) + _topic_lines(m)
    lines.append("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in m["timings_s"].items()))
    lines.append(f"  output: {m['output']}/data/*.parquet (manifest.json, README.md, report.html, _SUCCESS)")
    for name, e in (m.get("exports") or {}).items():
        lines.append(f"  export {name}: {m['output']}/{e['path']}/ ({_n(e['queries'])} queries, "
                     f"{_n(e['positives'])} positives, {_n(e['negatives'])} negatives)")
    if m.get("teacher"):
        lines.append(f"  teacher scores (`scores`): the {m['teacher']['role']} model, {m['teacher']['model']}")
    configs = [*FORMATS[m["format"]].configs(int(cfg["num_negatives"])), "default"]
    lines.append(f'  load: datasets.load_dataset("{m["output"]}", "{configs[0]}", split="train")  '
                 f'(or {", ".join(f"{c!r}" for c in configs[1:])})'.replace("'", '"'))
    return "\n".join(lines)


def _score_lines(m: dict) -> list[str]:
    """The score quantiles: a header and one line per sampled score."""
    lines = [f"  {'':16}" + "".join(f"{k:>9}" for k in ("min", "p05", "p25", "p50", "p75", "p95", "max"))]
    labels = {"positive_scores": "positive", "kept_scores": "kept cand.", "dropped_scores": "dropped cand.",
              "negative_scores": "negative", "negative_ranks": "negative rank", "margins": "margin"}
    for name, q in m["scores"].items():
        if q:
            base = name.replace("_guide", "")
            label = labels.get(base, base) + (" (guide)" if "_guide" in name else "")
            lines.append(f"  {label:16}" + "".join(f"{v:>9.4g}" for v in q.values()))
    return lines


def _topic_lines(m: dict) -> list[str]:
    """The clusters and the topic batches, when the job has them."""
    lines = []
    cl, b = m.get("clusters"), m.get("batches")
    if cl:
        s = cl["sizes"]
        lines.append(
            f"  clusters: {cl['k']} (k-means on {_n(cl['trained_on'])} queries); queries per cluster "
            f"min {_n(s['min'])}, median {s['median']:g}, max {_n(s['max'])}"
        )
    if b:
        lines.append(
            f"  batches of {b['batch_size']}: {_n(b['batches'])} ({_n(b['batches_mixed'])} mixed from cluster ends, "
            f"{_n(b['batches_short'])} short); rows in single-cluster batches "
            f"{(b['rows_batched'] - b['rows_merged']) / max(1, b['rows']):.1%}, in mixed {_n(b['rows_merged'])} "
            f"({b['rows_merged'] / max(1, b['rows']):.1%}), "
            f"left out {_n(b['rows_left_out'])} (partial_batches: {b['partial_batches']})"
            + (f"; batch guard ({b.get('guard_model') or 'labels only'}): {_n(b['guard_pairs'])} row pairs kept "
               f"apart, {_n(b['guard_pairs_separated'])} of them would have shared a batch, "
               f"{_n(b['rows_left_out_by_guard'])} rows left out for it" if b.get("batch_guard") else "")
        )
    return lines


def format_check(source: str, job: Job, stats: dict[str, dict]) -> str:
    """What `negprep validate` prints: per input rows read, used, not used and rejected, first problems."""
    lines = [f"{source}: ok (on_bad_input: {job.on_bad_input})"]
    for role, s in stats.items():
        parts = [f"{s['rows_read']:,} rows read", f"{s['rows_used']:,} used"]
        parts += [f"{v:,} not used ({k.removeprefix('rows_unused_')})" for k, v in s.items() if
                  k.startswith("rows_unused_") and v]
        if s["rows_rejected"]:
            why = ", ".join(f"{k} {v:,}" for k, v in s["rejected"].items())
            parts.append(f"{s['rows_rejected']:,} rejected ({why})")
        lines.append(f"  {role}: {s['path']}: " + ", ".join(parts))
        lines += [f"    {p}" for p in s["problems"]]
    total = sum(s["rows_rejected"] for s in stats.values())
    if total:
        lines.append(
            f"  {total:,} input row{'s' if total > 1 else ''} rejected; a run sets them aside in "
            f"{job.output.rstrip('/')}/rejected/input.parquet"
        )
    return "\n".join(lines)
