"""The read stage cuts big inputs into pieces read in parallel: the result never depends on the cut.

Inputs with bad rows, blank lines and duplicate ids far apart are read whole and cut into many
small pieces; shards (and so their digests, the embedding cache key), rejected rows with their
line numbers and the accounting must be identical, and equal to `negprep validate`'s whole-file
checks. Plus: CSV fields holding a newline across a cut, compressed files, Parquet row groups,
resume from finished pieces, and worker memory that follows the piece size, not the file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from negprep.config import parse_job
from negprep.errors import InputError
from negprep.execution import Executor
from negprep.input import checks, pieces
from negprep.input.tables import load_table
from negprep.paths import Folder
from negprep.stages.base import Run
from negprep.stages.read import Read

TINY_MB = 4096 / 2**20  # 4 KiB pieces: dozens of pieces for a few hundred rows


def _corpus_rows(n: int, seed: int = 0) -> list[dict | str]:
    """Passages with ids repeated far apart, empty texts and (as str) lines that are not JSON."""
    rng = random.Random(seed)
    rows: list[dict | str] = []
    for i in range(n):
        r = rng.random()
        did = f"d{rng.randrange(int(n * 0.9))}"
        if r < 0.02:
            rows.append("{not json")
        elif r < 0.04:
            rows.append({"_id": did, "title": "", "text": "   "})
        else:
            rows.append({"_id": did, "title": f"title {i}", "text": f"passage {i} " + "words " * rng.randrange(5, 40)})
        if rng.random() < 0.02:
            rows.append("")  # a blank line is not a row
    return rows


def _write_inputs(root: Path, fmt: str, n: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed + 1)
    rows = _corpus_rows(n, seed)
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (root / "corpus.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    elif fmt in ("csv", "tsv"):
        buf = io.StringIO()
        w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        w.writerow(["_id", "title", "text"])
        for r in rows:
            if isinstance(r, str):
                buf.write('x,"bad"quote",y\n' if r else "\n")  # a quoting error, or a blank line
            else:
                w.writerow([r["_id"], r["title"], r["text"]])
        (root / f"corpus.{fmt}").write_text(buf.getvalue())
    else:
        good = [r for r in rows if isinstance(r, dict)]
        pq.write_table(pa.Table.from_pylist(good), root / "corpus.parquet", row_group_size=40)
    queries = [{"_id": f"q{i}", "text": f"question {i % 97}"} for i in range(120)]
    (root / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    qrels = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{rng.randrange(int(n * 0.95))}\t1" for i in range(120)]
    (root / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    return root


def _job(root: Path, fmt: str, work: Path, piece_mb: float, **extra):
    return parse_job({
        "input": {"corpus": str(root / f"corpus.{fmt}"), "queries": str(root / "queries.jsonl"),
                  "qrels": str(root / "qrels.tsv")},
        "output": str(work.parent / f"{work.name}-out"), "work_dir": str(work), "model": "unused",
        "on_bad_input": "lenient", "read": {"piece_mb": piece_mb, "shard_rows": 50, "query_shard_rows": 30},
        **extra,
    })


def _read(job, force: bool = True):
    run = Run(job, Folder(job.work_dir), Folder(job.output), Executor(0))
    Read().run(run, force=force)
    return run.read


def _rejected(read) -> pl.DataFrame:
    return pl.read_parquet(read.rejected.uri).select("input", "line", "reason", "detail").sort("input", "line")


def _without_pieces(stats: dict) -> dict:
    return {role: {k: v for k, v in s.items() if k not in ("pieces", "sha256")} for role, s in stats.items()}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_any_piece_size_gives_the_same_shards_rejected_rows_and_counts(ray_session, tmp_path, fmt):
    root = _write_inputs(tmp_path / "in", fmt)
    whole = _read(_job(root, fmt, tmp_path / "whole", 64))
    cut = _read(_job(root, fmt, tmp_path / "cut", TINY_MB))
    assert whole.inputs["corpus"]["pieces"] == 1
    assert cut.inputs["corpus"]["pieces"] >= 8
    assert [s.digest for s in cut.corpus_shards] == [s.digest for s in whole.corpus_shards]
    assert [s.digest for s in cut.query_shards] == [s.digest for s in whole.query_shards]
    assert (cut.passages, cut.queries, cut.positives) == (whole.passages, whole.queries, whole.positives)
    assert _rejected(cut).equals(_rejected(whole))
    assert _without_pieces(cut.inputs) == _without_pieces(whole.inputs)
    # and both equal the whole-file checks of `negprep validate`
    job = _job(root, fmt, tmp_path / "v", 64)
    files = {"corpus": str(root / f"corpus.{fmt}"), "queries": str(root / "queries.jsonl"),
             "qrels": str(root / "qrels.tsv")}
    ref = checks.normalise(job, {r: load_table(u) for r, u in files.items()})
    assert ref["corpus"].height == cut.passages
    assert ref["rejected"].select("input", "line", "reason", "detail").sort("input", "line").equals(_rejected(cut))
    reasons = cut.inputs["corpus"]["rejected"]
    assert reasons.get("duplicate_id", 0) > 10
    s = cut.inputs["corpus"]
    assert s["rows_read"] == s["rows_used"] + s["rows_rejected"]


def test_line_numbers_far_into_a_later_piece_are_the_files_own(ray_session, tmp_path):
    root = tmp_path / "in"
    _write_inputs(root, "jsonl", n=50)
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines += [json.dumps({"_id": f"late{i}", "text": "passage " + "w " * 30}) for i in range(300)]
    lines[-7] = '{"_id": "late-bad", "text": '  # malformed, far into the last piece
    lines[-3] = json.dumps({"_id": "late5", "text": "a copy of an earlier id"})
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    job = _job(root, "jsonl", tmp_path / "w", TINY_MB, on_bad_input="strict")
    with pytest.raises(InputError) as e:
        _read(job)
    n_bad, n_dup, first = len(lines) - 6, len(lines) - 2, lines.index(next(x for x in lines if '"late5"' in x)) + 1
    assert "corpus.jsonl: line" in str(e.value)
    read = _read(_job(root, "jsonl", tmp_path / "w2", TINY_MB))
    assert read.inputs["corpus"]["pieces"] > 5
    rej = _rejected(read).filter(pl.col("input") == "corpus")
    bad = rej.filter(pl.col("line") == n_bad)
    assert bad["reason"].to_list() == ["malformed_json"]
    dup = rej.filter(pl.col("line") == n_dup).row(0, named=True)
    assert dup["reason"] == "duplicate_id" and f"(first on line {first})" in dup["detail"]


@pytest.mark.parametrize("key", ["body", "other"])
def test_pieces_whose_rows_lack_the_files_column_are_read_as_a_whole_read_does(ray_session, tmp_path, key):
    """JSON lines name their own keys: a run of rows with only an alias of the text key ("body"), or none
    ("other"), fills whole pieces; a whole read picks "text" for the file and rejects them, and so must the pieces."""
    root = _write_inputs(tmp_path / "in", "jsonl", n=300)
    lines = (root / "corpus.jsonl").read_text().splitlines()
    gap = [json.dumps({"_id": f"gap{i}", key: f"not the text {i} " + "w " * 40}) for i in range(150)]  # > 2 pieces
    (root / "corpus.jsonl").write_text("\n".join(lines[:100] + gap + lines[100:]) + "\n")
    whole = _read(_job(root, "jsonl", tmp_path / "whole", 64))
    cut = _read(_job(root, "jsonl", tmp_path / "cut", TINY_MB))
    assert cut.inputs["corpus"]["pieces"] >= 8
    rej = _rejected(cut)
    gaps = rej.filter(pl.col("detail").str.contains("'gap"))
    assert gaps.height == 150 and set(gaps["reason"]) == {"empty_text"}  # one by one, with their lines
    assert rej.equals(_rejected(whole))
    assert _without_pieces(cut.inputs) == _without_pieces(whole.inputs)
    assert [s.digest for s in cut.corpus_shards] == [s.digest for s in whole.corpus_shards]


def test_a_column_no_piece_has_stops_the_job_as_a_whole_read_does(ray_session, tmp_path):
    root = _write_inputs(tmp_path / "in", "jsonl", n=50)
    (root / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "words": "w " * 40}) for i in range(300)))
    errors = []
    for name, mb in (("whole", 64), ("cut", TINY_MB)):
        with pytest.raises(InputError) as e:
            _read(_job(root, "jsonl", tmp_path / name, mb))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "no text column" in errors[0]
    assert not list((tmp_path / "cut").rglob("corpus/*.parquet"))  # stopped before any shard was written


def test_csv_field_with_a_newline_across_a_cut_reads_that_file_whole(ray_session, tmp_path):
    root = _write_inputs(tmp_path / "in", "csv", n=200)
    rows = [["_id", "title", "text"]] + [[f"d{i}", "t", f"line one {i}\nline two {i} " + "w " * 60] for i in range(200)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    (root / "corpus.csv").write_text(buf.getvalue())
    cut = _read(_job(root, "csv", tmp_path / "cut", TINY_MB))
    whole = _read(_job(root, "csv", tmp_path / "whole", 64))
    assert cut.inputs["corpus"]["pieces"] == 1  # a cut fell inside a quoted field: read whole
    assert cut.passages == whole.passages == 200
    assert [s.digest for s in cut.corpus_shards] == [s.digest for s in whole.corpus_shards]


def test_compressed_files_are_one_piece_each_with_the_same_result(ray_session, tmp_path):
    root = _write_inputs(tmp_path / "in", "jsonl")
    plain = _read(_job(root, "jsonl", tmp_path / "plain", TINY_MB))
    data = (root / "corpus.jsonl").read_bytes()
    (root / "corpus.jsonl.gz").write_bytes(gzip.compress(data))
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as z:
        z.write(data)
    (root / "corpus.jsonl.zst").write_bytes(sink.getvalue().to_pybytes())
    for name in ("jsonl.gz", "jsonl.zst"):
        got = _read(_job(root, name, tmp_path / name, TINY_MB))
        assert got.inputs["corpus"]["pieces"] == 1
        assert [s.digest for s in got.corpus_shards] == [s.digest for s in plain.corpus_shards]
        assert _rejected(got).drop("detail").equals(_rejected(plain).drop("detail"))  # details name the file


def test_parquet_is_cut_by_row_groups_and_numbers_rows_as_in_the_file(tmp_path):
    rows = [{"_id": f"d{i}", "text": os.urandom(100).hex()} for i in range(1000)]  # incompressible
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=100)
    plan = pieces.plan("corpus", str(path), path.stat().st_size, 30_000)
    assert len(plan) > 3 and plan[0].first_line == 1
    for p in plan:
        t = pieces.read(p)
        first = t.frame["__negprep_line__"][0]
        assert first == p.first_line and t.frame["_id"][0] == f"d{first - 1}"
    assert sum(pieces.read(p).frame.height for p in plan) == 1000


def test_text_pieces_hold_each_line_once(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"_id": f"d{i}", "text": "y" * (i % 50)}) for i in range(500)]
    path.write_text("\n".join(lines))  # no newline at the end
    size = path.stat().st_size
    for piece_bytes in (100, 1000, 4096, size):
        plan = pieces.plan("corpus", str(path), size, piece_bytes)
        counts = [pieces.count_newlines(p) for p in plan] if len(plan) > 1 else []
        plan = pieces.with_lines(plan, counts) if counts else plan
        frames = [f for f in (pieces.read(p).frame for p in plan) if f.height]  # a piece may start no line
        got = [row for f in frames for row in f.select("_id", "__negprep_line__").iter_rows()]
        assert got == [(f"d{i}", i + 1) for i in range(500)], piece_bytes


def test_a_killed_read_resumes_from_its_finished_pieces(ray_session, tmp_path):
    root = _write_inputs(tmp_path / "in", "jsonl")
    job = _job(root, "jsonl", tmp_path / "w", TINY_MB)
    first = _read(job)
    folder = next((tmp_path / "w" / "input").iterdir())
    done = sorted(folder.glob("pieces/*/piece.json"))
    # a kill: the stage never finished, and one piece was lost mid-write
    (folder / "_SUCCESS").unlink()
    (done[3].parent / "piece.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in done if p.exists()}
    again = _read(job, force=False)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished pieces were not redone
    assert (done[3].parent / "piece.json").exists()
    assert [s.digest for s in again.corpus_shards] == [s.digest for s in first.corpus_shards]
    assert _rejected(again).equals(_rejected(first))


# VmHWM, the peak of this process's own memory since exec (getrusage's peak would include the
# parent's at fork time: the test process, after a suite's worth of tests)
_PEAK = """
import json, sys
from negprep.input import pieces
from negprep.input.checks import check_piece
from negprep.config import parse_job
path, piece_bytes = sys.argv[1], int(sys.argv[2])
job = parse_job({"input": "x", "output": "o", "model": "m"})
import os
plan = pieces.plan("corpus", path, os.path.getsize(path), piece_bytes)
plan = pieces.with_lines(plan, [0] * len(plan)) if len(plan) > 1 else plan
rows, kept = check_piece(job, "corpus", pieces.read(plan[len(plan) // 2]))
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"peak_mb": hwm / 1024, "rows": kept.height}))
"""


def _peak(path: Path, piece_bytes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(piece_bytes)], capture_output=True, text=True,
                         check=True, env={**os.environ, "POLARS_MAX_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_memory_follows_the_piece_size_not_the_file(tmp_path):
    def write(n: int) -> Path:
        path = tmp_path / f"corpus-{n}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"_id": f"d{i}", "text": f"passage {i} " + "word " * 60}) + "\n")
        return path

    small, big = write(40_000), write(160_000)  # about 13 MB and 52 MB
    piece = 2 << 20
    p_small, p_big, whole_big = _peak(small, piece), _peak(big, piece), _peak(big, 1 << 40)
    assert abs(p_small["rows"] - p_big["rows"]) < 0.05 * p_small["rows"]  # the same piece size holds as many rows
    assert p_big["peak_mb"] < p_small["peak_mb"] * 1.2, (p_small, p_big)
    assert whole_big["peak_mb"] > p_big["peak_mb"] + 100, (p_big, whole_big)  # the measurement sees memory
