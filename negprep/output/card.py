"""The dataset card: a Hugging Face style README.md next to the data, built from the manifest.

The YAML front matter's `configs` tell `datasets.load_dataset(<output folder or Hub repo>)` where
the data files are; the body says how the data was made, how many rows each step kept, the columns
(from the contract in schemas/) and how to load it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

import yaml

from negprep.output.formats import EXPORTS, FORMATS
from negprep.paths import Folder
from negprep.schemas import spec

_SIZES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)


def size_category(rows: int) -> str:
    """The Hub's size_categories value for `rows` rows."""
    return next((label for limit, label in _SIZES if rows < limit), "n>1B")


def _columns(fmt: str, n: int, present: list[str] | None) -> list[tuple[str, str, str]]:
    """(column, type, meaning) of the output contract, patterns expanded; only `present` columns if given."""
    out = []
    for f in spec(fmt)["fields"]:
        names = [f["name"].format(i=i) for i in range(1, n + 1)] if "{i}" in f["name"] else [f["name"]]
        for name in names:
            if present is not None and name not in present:
                continue
            if present is None and f.get("group"):
                continue
            out.append((name, f["type"], f["meaning"]))
    if present is not None:  # columns the contract does not describe (should not happen) are still listed
        known = {c for c, _, _ in out}
        out += [(c, "?", "") for c in present if c not in known]
        out.sort(key=lambda r: present.index(r[0]))
    return out


def _md(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def dataset_card(m: dict, columns: list[str] | None = None) -> str:
    """README.md text for manifest `m`; `columns`: the data files' column names, when known."""
    cfg = m.get("config") or {}
    fmt = m.get("format") or cfg.get("format", "triplet")
    n = int(cfg.get("num_negatives") or 1)
    out_path = m.get("output", "OUTPUT")
    lines = ["---", yaml.safe_dump(_front(m, fmt, n), sort_keys=False).rstrip(), "---", ""]
    lines += _made_lines(m, fmt, n) + _count_lines(m) + _load_lines(fmt, n, columns, out_path)
    lines += _exports_section(m, out_path, n)
    return "\n".join(lines)


def _front(m: dict, fmt: str, n: int) -> dict:
    """The card's YAML front matter: the `datasets` configs (column-selecting ones for the losses)."""
    rejected = m.get("rejected_input_file")
    data = [{"split": "train", "path": "data/*.parquet"}]
    configs: list[dict] = [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}], "default": True}
    ]
    # configs that select columns: straight into sentence-transformers' losses, no select_columns or map
    configs += [{"config_name": name, "data_files": data, "columns": columns}
                for name, columns in FORMATS[fmt].configs(n).items()]
    for name in m.get("exports") or {}:
        e = EXPORTS.get(name)
        if e is not None and e.card_config:
            configs.append({"config_name": name, "data_files": [{"split": "train", "path": f"{name}/*{e.suffix}"}]})
    if rejected:
        configs.append({"config_name": "rejected_input", "data_files": [{"split": "train", "path": rejected}]})
    # datasets caches a local folder under its name and a hash of its card, never of the data files: a card that
    # names the run makes a job rewriting its output folder load fresh, not the previous run's cached rows
    run = hashlib.sha256(json.dumps(m, sort_keys=True, default=str).encode()).hexdigest()[:16]
    for config in configs:
        config["description"] = f"negprep run {run}"
    return {
        "configs": configs,
        "tags": ["sentence-transformers", "hard-negatives", "negprep"],
        "task_categories": [FORMATS[fmt].task],
        "size_categories": [size_category(int(m.get("rows", 0)))],
        "pretty_name": f"Hard negatives mined by negprep ({fmt})",
    }


def _made_lines(m: dict, fmt: str, n: int) -> list[str]:
    """The title, what the data is and how it was made."""
    cfg, c = m.get("config") or {}, m.get("counts") or {}
    created = m.get("created_unix")
    when = dt.datetime.fromtimestamp(created, dt.timezone.utc).strftime("%Y-%m-%d") if created else "unknown date"
    keys = ("range_min", "range_max", "relative_margin", "absolute_margin", "max_score", "min_score", "sampling",
            "seed")
    rules = [f"`{k}`: {cfg[k]}" for k in keys if cfg.get(k) is not None]
    guide, teacher = cfg.get("guide"), m.get("teacher") or {}
    lines = [
        f"# Hard negatives mined by negprep ({fmt})",
        "",
        f"Training data for {FORMATS[fmt].purpose}: {c.get('pairs', 0):,} (query, positive) pairs of "
        f"{c.get('queries', 0):,} queries, each with up to {n} hard negatives mined from a corpus of "
        f"{c.get('passages', 0):,} passages; {m.get('rows', 0):,} rows in `{fmt}` format.",
        "",
        "## How it was made",
        "",
        f"- Input: `{_md(cfg.get('input'))}` (split `{cfg.get('split', 'train')}`).",
        f"- Every query and passage was embedded with `{_md(cfg.get('model', '?'))}` and searched exactly (inner "
        "product) against the whole corpus; the query's labelled positives were removed from its neighbours.",
        "- Negatives are candidates in the rank window that pass positive-aware rules (NV-Retriever): "
        + ", ".join(rules)
        + ".",
    ]
    if guide:
        lines.append(f"- A guide model `{_md(guide.get('model'))}` vetted the candidates.")
    if teacher:
        lines.append(f"- Teacher scores (`scores`, and the grouped exports' scores) are the {teacher.get('role')} "
                     f"model's (`{_md(teacher.get('model'))}`): inner products of normalised embeddings"
                     f"{' or cross-encoder probabilities' if teacher.get('type') == 'crossencoder' else ''}.")
    lines.append(f"- Made by negprep {m.get('negprep_version') or ''} on {when}; the full configuration, input "
                 "checksums and package versions are in `manifest.json`, plots in `report.html`.")
    return lines


def _count_lines(m: dict) -> list[str]:
    """The counts, every input row accounted for, and where the rejected rows are."""
    c, rejected = m.get("counts") or {}, m.get("rejected_input_file")
    lines = ["", "## Counts", "", "| | |", "|---|---:|"]
    for label, key in (
        ("passages", "passages"),
        ("queries with positives", "queries"),
        ("positives", "positives"),
        ("candidates in the rank window", "candidates"),
        ("kept by the rules", "kept"),
        ("negatives chosen", "negatives"),
        ("pairs short of negatives", "pairs_short"),
        ("pairs written", "pairs_written"),
        ("negatives written", "negatives_written"),
        ("output rows", "rows"),
        ("input rows rejected", "rows_rejected"),
    ):
        v = m.get("rows") if key == "rows" else c.get(key)
        if v is not None:
            lines.append(f"| {label} | {v:,} |")
    lines += [f"| dropped by `{k.removeprefix('dropped_')}` | {v:,} |" for k, v in c.items()
              if k.startswith("dropped_") and v]
    lines += ["", "Every input row is accounted for (rows read = used + not used + rejected):", "",
              "| input | read | used | not used | rejected |", "|---|---:|---:|---:|---|"]
    for role, s in (m.get("inputs") or {}).items():
        unused = sum(v for k, v in s.items() if k.startswith("rows_unused_"))
        why = ", ".join(f"{k} {v:,}" for k, v in (s.get("rejected") or {}).items()) or "0"
        lines.append(f"| {role} | {s.get('rows_read', 0):,} | {s.get('rows_used', 0):,} | {unused:,} | {why} |")
    if rejected:
        lines += ["", f"The rejected input rows, with line and reason, are in `{rejected}`."]
    return lines


def _load_lines(fmt: str, n: int, columns: list[str] | None, out_path: str) -> list[str]:
    """The schema, and how to load the data into sentence-transformers' losses."""
    lines = ["", "## Schema", "", f"Contract `schemas/{fmt}.yaml` of negprep:", "",
             "| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {typ} | {_md(meaning)} |" for name, typ, meaning in _columns(fmt, n, columns)]
    return lines + [
        "",
        "## How to load",
        "",
        "```python",
        "import datasets",
        "",
        f'ds = datasets.load_dataset("parquet", data_files="{out_path}/data/*.parquet", split="train")',
        "# or, thanks to this card's `configs`, from the folder or a Hub repository holding it:",
        f'# ds = datasets.load_dataset("{out_path}", split="train")',
        "",
        *FORMATS[fmt].usage(out_path, n),
        "",
    ]


def _exports_section(m: dict, out_path: str, n: int) -> list[str]:
    """How to train on the grouped exports, with the advice their trainers need."""
    exports = m.get("exports") or {}
    if not exports:
        return []
    lines = ["## Grouped exports", "",
             "One row per query, with every positive and the query's negatives (each passage once, nearest first):", "",
             "| export | files | queries | positives | negatives | negatives shared by positives (written once) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, e in exports.items():
        lines.append(f"| {name} | `{e['path']}/` | {e['queries']:,} | {e['positives']:,} | {e['negatives']:,} | "
                     f"{e['negatives_merged']:,} |")
    lines.append("")
    cfg = m.get("config") or {}
    for name, e in EXPORTS.items():  # the registry's order, whatever the job's
        if name in exports:
            lines += e.card_lines(out_path, cfg)
    lines += [
        f"- Both default to `train_group_size` 8 and repeat negatives when a query has fewer than "
        f"train_group_size - 1: this data has up to {n} per (query, positive), so pass "
        f"`--train_group_size {n + 1}` or less, or mine with `num_negatives` >= train_group_size - 1.",
        "",
    ]
    return lines


def write_card(out: Folder, manifest: dict) -> str:
    """Write README.md into the output folder, with the columns of its first data file; returns its URL."""
    columns = None
    files = manifest.get("data_files") or []
    if files:
        import pyarrow.parquet as pq

        with out.open(files[0]) as f:
            columns = pq.read_schema(f).names
    out.write_bytes("README.md", dataset_card(manifest, columns).encode("utf-8"))
    return out.uri("README.md")
