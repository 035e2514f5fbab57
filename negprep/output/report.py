"""The run report: one self-contained HTML page (inline SVG plots, no scripts, no links) per output.

Built from the manifest alone, so `negprep report OUTPUT` rebuilds it from a published dataset. The
runner stores what the plots need in `manifest["histograms"]` (fixed-bin histograms of the mine
tasks' score samples, exact count distributions), computed by `negprep.output.distributions`.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from negprep.errors import InputError
from negprep.output.distributions import edges_for, hist_counts
from negprep.output.manifest import upgrade
from negprep.output.plots import NEG, POS, THIRD, counts_svg, funnel_svg, hist_svg
from negprep.paths import Folder

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# The page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:980px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:30px 0 8px;border-bottom:1px solid #e3e5e8;padding-bottom:4px}
p.sub{color:#666;margin:0 0 16px;word-break:break-all}p.note{color:#555;margin:4px 0 8px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{border:1px solid #e3e5e8;border-radius:6px;padding:8px 14px;min-width:120px}
.tile b{display:block;font-size:20px}.tile span{color:#666;font-size:12px}.warn b{color:#b3471d}
table{border-collapse:collapse;margin:6px 0;font-size:13px}td,th{border-bottom:1px solid #eceef1;padding:4px 10px;
text-align:left;vertical-align:top}th{background:#f3f4f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
svg.plot{display:block;max-width:100%;height:auto;margin:6px 0 2px}svg text{font-size:11px;fill:#333}
svg .axis{stroke:#888}svg .grid{stroke:#eceef1}svg .note{fill:#444}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
pre{background:#f3f4f6;padding:10px;overflow:auto}ul.problems{font-size:12px;color:#7a2e12;word-break:break-all}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _tile(label: str, value: Any, warn: bool = False) -> str:
    shown = f"{value:,}" if isinstance(value, int) else _e(value)
    return f'<div class="tile{" warn" if warn else ""}"><b>{shown}</b><span>{_e(label)}</span></div>'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    cell = lambda v: f'<td class="n">{v:,}</td>' if isinstance(v, int) else f"<td>{_e(v)}</td>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _inputs_section(m: dict) -> str:
    rows, problems = [], []
    for role, s in (m.get("inputs") or {}).items():
        unused = {k.removeprefix("rows_unused_"): v for k, v in s.items() if k.startswith("rows_unused_")}
        rows.append(
            [
                role,
                s.get("path", ""),
                int(s.get("rows_read", 0)),
                int(s.get("rows_used", 0)),
                ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in unused.items() if v) or "-",
                int(s.get("rows_rejected", 0)),
                ", ".join(f"{k} {v:,}" for k, v in (s.get("rejected") or {}).items()) or "-",
            ]
        )
        problems += s.get("problems") or []
    out = _table(["input", "file", "rows read", "used", "not used", "rejected", "rejected by reason"], rows)
    out += '<p class="note">rows read = used + not used + rejected, for every input.</p>'
    if problems:
        where = m.get("rejected_input_file")
        all_in = f" (all of them: <code>{_e(where)}</code>)" if where else ""
        out += f'<p class="note">First problems{all_in}:</p>'
        out += '<ul class="problems">' + "".join(f"<li>{_e(p)}</li>" for p in problems[:20]) + "</ul>"
    return out


def _funnel(c: dict) -> str:
    stages = [("candidates in rank window", int(c.get("candidates", 0)), "#7b8794")]
    for k, v in c.items():
        if k.startswith("dropped_") and v:
            stages.append((f"dropped: {k.removeprefix('dropped_').replace('_', ' ')}", int(v), NEG))
    stages.append(("kept", int(c.get("kept", 0)), THIRD))
    stages.append(("chosen (over all pairs)", int(c.get("negatives", 0)), POS))
    return funnel_svg(stages, "filter funnel")


def _clusters(m: dict) -> str:
    """Cluster sizes when the job clustered its queries; the manifest holds a list or a summary."""
    hist = (m.get("histograms") or {}).get("cluster_sizes")
    info = m.get("clusters") or (m.get("counts") or {}).get("clusters")
    if not hist and not info:
        return ""
    out = "<h2>Clusters</h2>"
    sizes = info.get("sizes") if isinstance(info, dict) else None
    if isinstance(info, dict):
        flat = {k: v for k, v in info.items() if not isinstance(v, (dict, list))}
        if isinstance(sizes, dict):
            flat |= {f"queries per cluster, {k}": v for k, v in sizes.items()}
        out += '<p class="note">' + " &middot; ".join(f"{_e(k)} {_e(v)}" for k, v in flat.items()) + "</p>"
    elif info is not None:
        out += f'<p class="note">clusters: {_e(info)}</p>'
    if hist:
        key = next(k for k in hist if k not in ("edges", "sampled"))
        out += hist_svg(hist, [(key, "clusters", POS)], "queries per cluster", "cluster sizes")
    elif isinstance(sizes, list) and sizes:
        arr = np.asarray(sizes, dtype=np.int64)
        if arr.max() <= 60:  # exact: one bar per size
            out += counts_svg(np.bincount(arr).tolist(), "queries per cluster", "clusters", "cluster sizes")
        else:
            edges = edges_for(arr)
            h = {"edges": edges.tolist(), "clusters": hist_counts(arr, edges)}
            out += hist_svg(h, [("clusters", "clusters", POS)], "queries per cluster", "cluster sizes")
    return out


def _score_plots(h: dict, cfg: dict) -> list[str]:
    """Scores (positives against negatives, kept against dropped, the guide's) and margins."""
    out = ["<h2>Scores</h2>"]
    if "scores" in h:
        out.append(
            hist_svg(
                h["scores"],
                [("positive", "positives", POS), ("negative", "chosen negatives", NEG)],
                "mining-model score",
                "positive vs negative scores",
            )
        )
    else:
        out.append('<p class="note">No scores: the job produced no pairs.</p>')
    if "candidate_scores" in h:
        out.append('<p class="note">All candidates in the rank window: kept by the rules vs dropped.</p>')
        out.append(
            hist_svg(
                h["candidate_scores"],
                [("kept", "kept candidates", THIRD), ("dropped", "dropped candidates", NEG)],
                "mining-model score",
                "kept vs dropped candidates",
            )
        )
    if "guide_scores" in h:
        out.append('<p class="note">Guide model (teacher) scores.</p>')
        out.append(
            hist_svg(
                h["guide_scores"],
                [("positive", "positive", POS), ("negative", "chosen negatives", NEG)],
                "guide-model score",
                "guide scores",
            )
        )
    out.append("<h2>Margins</h2>")
    if "margins" in h:
        out.append(
            '<p class="note">Positive score minus negative score, per output row: near or below 0 are negatives '
            "the model finds as relevant as the positive (false-negative risk).</p>"
        )
        vlines = [(0.0, "0")]
        if cfg.get("absolute_margin"):
            vlines.append((float(cfg["absolute_margin"]), f"absolute_margin {cfg['absolute_margin']}"))
        out.append(hist_svg(h["margins"], [("margin", "margin", POS)], "positive - negative score", "margins", vlines))
    else:
        out.append('<p class="note">No margins recorded.</p>')
    return out


def _count_plots(h: dict, c: dict, cfg: dict) -> list[str]:
    """The filter funnel, negatives per pair, kept candidates per query and negative ranks."""
    out: list[str] = []
    out += ["<h2>Filter funnel</h2>", _funnel(c)]
    out.append(
        f'<p class="note">Candidates in ranks [{_e(cfg.get("range_min", 0))}, {_e(cfg.get("range_max", "?"))}) '
        "of every query; each is kept or dropped by the first rule that rejects it. Chosen negatives are counted "
        "per (query, positive) pair, so a kept candidate can be chosen for several pairs.</p>"
    )
    out.append("<h2>Negatives per query</h2>")
    if "negatives_per_pair" in h:
        out.append(
            counts_svg(
                h["negatives_per_pair"]["counts"],
                "negatives chosen",
                "(query, positive) pairs",
                "negatives per pair",
            )
        )
    if "kept_per_query" in h:
        out.append('<p class="note">Candidates left after the rules, per query.</p>')
        out.append(counts_svg(h["kept_per_query"]["counts"], "kept candidates", "queries", "kept per query", THIRD))
    if "negative_ranks" in h:
        out.append("<h2>Negative ranks</h2>")
        out.append(counts_svg(h["negative_ranks"]["counts"], "rank (0 = nearest non-positive)", "negatives", "ranks"))
    return out


def render(m: dict) -> str:
    """The report page for manifest `m`, as one HTML string."""
    c = m.get("counts") or {}
    cfg = m.get("config") or {}
    h = m.get("histograms") or {}
    created = m.get("created_unix")
    when = dt.datetime.fromtimestamp(created, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if created else "?"
    out = [
        f'<h1>negprep report</h1><p class="sub">{_e(m.get("output", ""))} &middot; {m.get("rows", 0):,} '
        f"{_e(m.get('format', ''))} rows &middot; model {_e(cfg.get('model', ''))} &middot; {when} &middot; "
        f"negprep {_e(m.get('negprep_version') or '')}</p>",
        '<div class="tiles">',
        _tile("output rows", int(m.get("rows", 0))),
        _tile("queries", int(c.get("queries", 0))),
        _tile("(query, positive) pairs", int(c.get("pairs", 0))),
        _tile("negatives chosen", int(c.get("negatives", 0))),
        _tile(f"pairs short of {cfg.get('num_negatives', '?')}", int(c.get("pairs_short", 0)), c.get("pairs_short", 0)),
        _tile("input rows rejected", int(c.get("rows_rejected", 0)), c.get("rows_rejected", 0)),
        "</div>",
        "<h2>Inputs</h2>",
        _inputs_section(m),
    ]
    out += _score_plots(h, cfg) + _count_plots(h, c, cfg)
    out.append(_clusters(m))
    timings = m.get("timings_s") or {}
    out += [
        "<h2>Job</h2>",
        _table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]),
        "<pre>" + _e(json.dumps(cfg, indent=2, default=str)) + "</pre>",
        _table(["package", "version"], [[k, v or "-"] for k, v in (m.get("versions") or {}).items()]),
    ]
    title = f"negprep report: {m.get('output', '')}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
        f"<body><main>{''.join(out)}</main></body></html>"
    )


def write_report(out: Folder, manifest: dict) -> str:
    """Write `report.html` into the output folder; returns its URL."""
    out.write_bytes("report.html", render(manifest).encode("utf-8"))
    return out.uri("report.html")


def rebuild(output: str, card: bool = False, storage_options: dict | None = None) -> list[str]:
    """`negprep report OUTPUT`: rewrite report.html (and README.md with `card`) from the manifest."""
    out = Folder(output, storage_options)
    if not out.exists("manifest.json"):
        raise InputError(f"{output}: no manifest.json here (not a finished negprep output?)")
    try:
        manifest = out.read_json("manifest.json")
    except ValueError as e:
        raise InputError(f"{output}/manifest.json: not valid JSON: {e}") from None
    manifest = upgrade(manifest)  # an older output's key names
    written = [write_report(out, manifest)]
    if card:
        from negprep.output.card import write_card

        written.append(write_card(out, manifest))
    return written


def publish_docs(out: Folder, manifest: dict) -> None:
    """README.md and report.html next to the data. A failure here costs the page, never the run:
    it is logged, and `negprep report OUTPUT --card` rebuilds both from the manifest."""
    from negprep.output.card import write_card

    for write in (write_card, write_report):
        try:
            write(out, manifest)
        except Exception:  # noqa: BLE001 - documentation must not fail a finished dataset
            log.exception("could not write %s; rebuild with `negprep report %s --card`", write.__name__, out.url)
