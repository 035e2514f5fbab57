"""The run report (report.html), the dataset card (README.md) and `negprep report`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from negprep.cli import main
from negprep.output.card import dataset_card, size_category, write_card
from negprep.output.distributions import histograms, merge_distributions
from negprep.output.report import render, write_report
from negprep.paths import Folder
from negprep.schemas import schema

HEADINGS = ["Inputs", "Scores", "Margins", "Filter funnel", "Negatives per query"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _manifest(output: str = "/data/out", clusters=None, rows: int = 6) -> dict:
    rng = np.random.default_rng(0)
    pos = rng.normal(0.7, 0.08, 400)
    neg = rng.normal(0.45, 0.1, 1200)
    samples = {
        "positive_scores": pos,
        "negative_scores": neg,
        "margins": rng.choice(pos, 1200) - neg,
        "negative_ranks": rng.integers(0, 30, 1200),
        "kept_scores": rng.normal(0.4, 0.1, 3000),
        "dropped_scores": rng.normal(0.72, 0.05, 500),
    }
    dists = merge_distributions([{"negatives_per_pair": [1, 0, 2, 30]}, {"negatives_per_pair": [0, 1], "kept": [3]}])
    m = {
        "negprep_version": "0.1.0",
        "created_unix": 1_700_000_000,
        "output": output,
        "format": "triplet",
        "data_files": ["data/train-00000-of-00001.parquet"],
        "rows": rows,
        "config": {"model": "tiny", "num_negatives": 3, "range_min": 0, "range_max": 30, "relative_margin": 0.05},
        "inputs": {
            "corpus": {
                "rows_read": 10,
                "rows_used": 8,
                "rows_rejected": 2,
                "rejected": {"empty_text": 1, "duplicate_id": 1},
                "problems": ["corpus.jsonl: line 3: empty text (id '<script>alert(1)</script>')"],
                "path": "corpus.jsonl",
            },
            "queries": {"rows_read": 5, "rows_used": 4, "rows_unused_no_positive": 1, "rows_rejected": 0},
        },
        "counts": {
            "passages": 8,
            "queries": 4,
            "pairs": 5,
            "candidates": 120,
            "kept": 90,
            "dropped_relative_margin": 30,
            "negatives": rows,
            "pairs_short": 1,
            "rows_rejected": 2,
        },
        "histograms": histograms(samples, dists),
        "rejected_input_file": "rejected/input.parquet",
        "timings_s": {"read": 1.0, "total": 3.5},
        "versions": {"numpy": "2"},
    }
    if clusters is not None:
        m["clusters"] = clusters
    return m


def test_histograms_share_edges_and_count_every_sample():
    h = _manifest()["histograms"]
    assert sum(h["scores"]["positive"]) == 400 and sum(h["scores"]["negative"]) == 1200
    assert len(h["scores"]["edges"]) == len(h["scores"]["positive"]) + 1
    assert h["scores"]["sampled"] == {"positive": 400, "negative": 1200}
    assert sum(h["margins"]["margin"]) == 1200
    assert h["negatives_per_pair"]["counts"] == [1, 1, 2, 30] and h["kept"]["counts"] == [3]
    assert sum(h["negative_ranks"]["counts"]) == 1200
    json.dumps(h)  # plain JSON for the manifest
    assert histograms({}) == {}
    one = histograms({"positive_scores": np.array([0.5, 0.5]), "negative_scores": np.array([])})
    assert sum(one["scores"]["positive"]) == 2 and sum(one["scores"]["negative"]) == 0


def test_report_page_is_self_contained_and_escapes_text():
    page = render(_manifest(output="/out/<b>x</b>"))
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in page
    assert page.count("<svg") >= 6
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page
    assert not re.search(r"""(src|href)\s*=|url\(|@import""", page)  # nothing loaded from anywhere
    assert "Clusters" not in page


@pytest.mark.parametrize(
    "clusters",
    [
        {"k": 4, "sizes": {"min": 1, "median": 2.5, "max": 9}, "queries": 15},
        {"k": 4, "sizes": [1, 2, 3, 9]},
        12,
    ],
)
def test_cluster_section_handles_what_the_manifest_has(clusters):
    page = render(_manifest(clusters=clusters))
    assert "<h2>Clusters</h2>" in page
    if isinstance(clusters, dict) and isinstance(clusters["sizes"], list):
        assert 'aria-label="cluster sizes"' in page


def test_report_from_an_empty_run_still_renders():
    m = _manifest()
    m["histograms"] = {}
    m["counts"] = {}
    page = render(m)
    assert "No scores" in page and "<h2>Filter funnel</h2>" in page


def _fake_output(tmp_path: Path, m: dict) -> Path:
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    rows = {f.name: [] for f in schema("triplet")}
    for i in range(m["rows"]):
        rows["query"].append(f"q{i}")
        rows["positive"].append(f"p{i}")
        rows["negative"].append(f"n{i}")
        for k in ("query_id", "positive_id", "negative_id"):
            rows[k].append(f"{k}{i}")
        rows["positive_score"].append(0.8)
        rows["negative_score"].append(0.5)
        rows["negative_rank"].append(i)
        rows["scores"].append([0.8, 0.5])
    (out / "data").mkdir(parents=True)
    pq.write_table(pa.table(rows, schema=schema("triplet")), out / m["data_files"][0])
    (out / "rejected").mkdir()
    pl.DataFrame({"input": ["corpus"], "reason": ["empty_text"]}).write_parquet(out / "rejected" / "input.parquet")
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_dataset_card_front_matter_loads_with_datasets(tmp_path):
    import datasets

    m = _manifest(rows=6)
    out = _fake_output(tmp_path, m)
    m["output"] = str(out)
    write_card(Folder(str(out)), m)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data/*.parquet"}]
    assert front["size_categories"] == ["n<1K"] and "sentence-transformers" in front["tags"]
    for needle in ("## How it was made", "## Counts", "## Schema", "## How to load", "| `negative_rank` | int32 |"):
        assert needle in text
    ds = datasets.load_dataset(str(out), split="train")  # the card's configs point at data/
    assert ds.num_rows == 6 and ds.column_names[:3] == ["query", "positive", "negative"]
    rej = datasets.load_dataset(str(out), "rejected_input", split="train")
    assert rej.num_rows == 1
    distill = datasets.load_dataset(str(out), "distill", split="train")
    assert distill.column_names == ["query", "positive", "negative", "scores"]


def test_a_second_run_into_the_same_folder_is_not_read_from_datasets_cache(tmp_path):
    """datasets caches a local folder by its name and card: a scheduled job rewriting its output folder must not
    hand the trainer the previous run's rows."""
    import datasets

    cache = str(tmp_path / "hf-cache")
    for rows in (6, 4):
        m = _manifest(rows=rows) | {"created_unix": 1_700_000_000}  # same second, same config: only the data differ
        out = _fake_output(tmp_path, m)
        m["output"] = str(out)
        write_card(Folder(str(out)), m)
        ds = datasets.load_dataset(str(out), "mnrl", split="train", cache_dir=cache)
        assert ds.num_rows == rows


def test_card_lists_ntuple_columns_and_size_categories():
    m = _manifest() | {"format": "ntuple"}
    text = dataset_card(m)
    assert "| `negative_3_rank` | int32 |" in text and "negative_4" not in text
    front = yaml.safe_load(text.split("---\n")[1])
    columns = {c["config_name"]: c.get("columns") for c in front["configs"]}
    assert columns["mnrl"] == ["query", "positive", "negative_1", "negative_2", "negative_3"]
    assert columns["distill"] == [*columns["mnrl"], "scores"]
    assert [size_category(n) for n in (0, 999, 1000, 2_500_000)] == ["n<1K", "n<1K", "1K<n<10K", "1M<n<10M"]


def test_negprep_report_rebuilds_page_and_card(tmp_path, capsys):
    m = _manifest()
    out = _fake_output(tmp_path, m)
    assert main(["report", str(out), "--card"]) == 0
    assert (out / "report.html").exists() and (out / "README.md").exists()
    assert capsys.readouterr().out.split() == [f"{out}/report.html", f"{out}/README.md"]
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_negprep_report_reads_an_older_outputs_key_names(tmp_path, capsys):
    from negprep.output.manifest import RENAMED, upgrade

    m = _manifest()
    m["batches"] = {"rows_dropped": 3, "rows_dropped_by_guard": 1}
    old = {**m, "counts": {({v: k for k, v in RENAMED["counts"].items()}).get(k, k): v for k, v in m["counts"].items()}}
    assert "rows_rejected" not in old["counts"] and old["counts"]["rejected_input_rows"] == 2
    assert upgrade(old)["counts"] == m["counts"] and upgrade(old)["batches"] == {"rows_left_out": 3,
                                                                                 "rows_left_out_by_guard": 1}
    out = _fake_output(tmp_path, old)
    assert main(["report", str(out)]) == 0
    # the old count is shown, not a 0 for a key the page no longer knows
    assert '<div class="tile warn"><b>2</b><span>input rows rejected</span>' in (out / "report.html").read_text()


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    if not CHROMIUM:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: `make install` installs it (apt-get install chromium)")
        pytest.skip("chromium not installed")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_report(Folder(str(out)), _manifest())
    url = (out / "report.html").as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr
    for h in HEADINGS:
        assert f"<h2>{h}</h2>" in dom.stdout
    assert dom.stdout.count("<svg") >= 6
    png = tmp_path / "report.png"
    shot = _chromium([f"--screenshot={png}", "--window-size=1000,2400", url], tmp_path)
    assert shot.returncode == 0, shot.stderr
    assert png.exists() and png.stat().st_size > 20_000  # a blank page is a few KB


def test_job_publishes_report_card_and_rejected_inputs(ray_session, tiny_bert, demo_data, tmp_path):
    from negprep.config import parse_job
    from negprep.runner import run_job

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    with open(data / "corpus.jsonl", "a") as f:
        f.write('{"_id": "bad1", "text": "  "}\n{"_id": "bad2", "text": "oops\n')
    job = parse_job(
        {
            "input": str(data),
            "output": str(tmp_path / "out"),
            "work_dir": str(tmp_path / "work"),
            "model": str(tiny_bert),
            "num_negatives": 3,
            "range_max": 20,
            "relative_margin": 0.01,
        }
    )
    m = run_job(job)
    out = tmp_path / "out"
    for name in ("report.html", "README.md", "rejected/input.parquet", "_SUCCESS", "manifest.json"):
        assert (out / name).exists(), name
    # published before _SUCCESS
    assert (out / "_SUCCESS").stat().st_mtime_ns >= (out / "report.html").stat().st_mtime_ns
    rej = pq.read_table(out / "rejected" / "input.parquet")
    assert rej.schema.names == ["input", "file", "line", "reason", "detail", "row"]
    assert sorted(zip(rej["line"].to_pylist(), rej["reason"].to_pylist(), strict=True)) == [
        (81, "empty_text"),
        (82, "malformed_json"),
    ]
    assert m["rejected_input_file"] == "rejected/input.parquet"
    c = m["inputs"]["corpus"]
    assert (c["rows_read"], c["rows_used"], c["rows_rejected"]) == (82, 80, 2)
    h = m["histograms"]
    assert sum(h["negatives_per_pair"]["counts"]) == m["counts"]["pairs"]
    assert sum(k * v for k, v in enumerate(h["negatives_per_pair"]["counts"])) == m["counts"]["negatives"]
    assert sum(h["kept_per_query"]["counts"]) == m["counts"]["queries"]
    assert sum(h["margins"]["margin"]) == m["counts"]["negatives"]
    page = (out / "report.html").read_text()
    assert "line 82: malformed JSON" in page
    before = page
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").read_text() == before  # rebuilt from the manifest alone
