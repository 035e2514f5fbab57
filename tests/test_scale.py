"""Scale and fault tolerance: sharded search, resume after a kill, killed workers, determinism."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from negprep import execution
from negprep.config import SearchConfig, parse_job
from negprep.execution import Executor
from negprep.index import faiss_shard
from negprep.input.shards import Shard
from negprep.paths import Folder
from negprep.runner import run_job
from negprep.schemas import conform
from negprep.stages import search

# ---------------------------------------------------------------------------------------------
# The search stage on synthetic vectors


def _clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.15 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _emb_table(ids: list[str], vecs: np.ndarray) -> pa.Table:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
    return conform(pa.table({"id": ids, "embedding": emb.cast(pa.list_(pa.float32()))}), "embeddings")


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """3000 clustered passages in 5 embedding files (with exact duplicates, so scores tie), 120
    queries in 2 files, 1-3 positives each."""
    rng = np.random.default_rng(7)
    dim = 16
    centers = rng.standard_normal((12, dim))
    corpus = _clustered(rng, 3000, dim, centers)
    corpus[2000:2100] = corpus[100:200]  # duplicates: equal scores, ordered by id
    # ids in an order unrelated to the rows, so "by id" differs from "by position"
    ids = [f"d{(i * 7919) % 3000:05d}" for i in range(3000)]
    base = tmp_path_factory.mktemp("vectors")
    pdir, qdir = Folder(str(base / "p")), Folder(str(base / "q"))
    corpus_shards = []
    for i, (a, b) in enumerate([(0, 700), (700, 1100), (1100, 1900), (1900, 2600), (2600, 3000)]):
        pdir.write_parquet(f"c{i}.parquet", _emb_table(ids[a:b], corpus[a:b]))
        corpus_shards.append(Shard(f"{i:05d}.parquet", b - a, b - a, f"c{i}"))
    queries = _clustered(rng, 120, dim, centers)
    qids = [f"q{i:03d}" for i in range(120)]
    query_shards = []
    for i, (a, b) in enumerate([(0, 70), (70, 120)]):
        qdir.write_parquet(f"q{i}.parquet", _emb_table(qids[a:b], queries[a:b]))
        query_shards.append(Shard(f"{i:05d}.parquet", b - a, b - a, f"q{i}"))
    rel_q, rel_d = [], []
    for i, q in enumerate(qids):
        for j in range(1 + i % 3):
            rel_q.append(q)
            rel_d.append(ids[(i * 31 + j * 997) % 3000])
    Folder(str(base)).write_parquet("qrels.parquet", pa.table({"query_id": rel_q, "doc_id": rel_d}))
    return {
        "base": base,
        "inputs": search.SearchInputs(pdir, tuple(corpus_shards), qdir, tuple(query_shards),
                                      Folder(str(base)).file("qrels.parquet")),
        "ids": ids,
        "corpus_vecs": corpus,
        "qids": qids,
        "query_vecs": queries,
        "positives": {q: [d for qq, d in zip(rel_q, rel_d, strict=True) if qq == q] for q in qids},
    }


def _run(v, out: str, range_max: int = 20, **cfg) -> tuple[dict, list[dict]]:
    sdir = Folder(str(v["base"] / out))
    stats = search.search_all(Executor(retries=3), SearchConfig(**cfg), v["inputs"], sdir, range_max)
    rows = []
    for s in v["inputs"].query_shards:
        rows += pq.read_table(sdir.path(s.name)).to_pylist()
    return stats, rows


def _brute_force(v, range_max: int) -> list[tuple[list[str], list[float]]]:
    """Exact candidates in float64 with ties broken by id: what one exact index must give."""
    c64, q64 = v["corpus_vecs"].astype(np.float64), v["query_vecs"].astype(np.float64)
    out = []
    for qi, q in enumerate(v["qids"]):
        s = (c64 * q64[qi]).sum(axis=1).astype(np.float32)
        pos = set(v["positives"][q])
        order = sorted(range(len(s)), key=lambda j: (-s[j], v["ids"][j]))
        keep = [j for j in order if v["ids"][j] not in pos][:range_max]
        out.append(([v["ids"][j] for j in keep], [float(s[j]) for j in keep]))
    return out


def test_plan_shards_balances_and_splits_files():
    shards = faiss_shard.plan_shards([("a", 5), ("b", 10), ("c", 1)], 6)
    assert [sum(p.stop - p.start for p in s) for s in shards] == [6, 6, 4]
    assert shards[0] == (faiss_shard.RowSpan("a", 0, 5), faiss_shard.RowSpan("b", 0, 1))
    assert faiss_shard.plan_shards([], 10) == []


def test_top_k_breaks_ties_by_id():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, -np.inf]], np.float32)
    ids = np.array([["c", "z", "a", "b", None]], dtype=object)
    s, i = faiss_shard.top_k(scores, ids, 3)
    assert i.tolist() == [["z", "a", "b"]] and s.tolist() == [[pytest.approx(0.9), 0.5, 0.5]]
    s, i = faiss_shard.top_k(scores, ids, 7)  # padded
    assert i.tolist() == [["z", "a", "b", "c", None, None, None]]


def test_sharded_flat_search_equals_one_exact_index(ray_session, vectors):
    one_stats, one = _run(vectors, "one")  # default budget: one index shard
    many_stats, many = _run(vectors, "many", shard_mb=0.2, query_batch=16, threads=1)
    assert one_stats["index_shards"] == 1 and many_stats["index_shards"] >= 4
    assert one == many  # same ids, same order, bit-identical scores
    expect = _brute_force(vectors, 20)
    for row, (ids, scores) in zip(one, expect, strict=True):
        assert row["candidate_ids"] == ids
        assert row["candidate_scores"] == pytest.approx(scores, abs=0)
        assert row["positive_ids"] == vectors["positives"][row["query_id"]]
    # and one faiss flat index over the whole corpus finds the same passages (up to ties)
    import faiss

    index = faiss.IndexFlatIP(16)
    index.add(vectors["corpus_vecs"])
    _, nn = index.search(vectors["query_vecs"], 40)
    for qi, row in enumerate(one):
        pos = set(vectors["positives"][row["query_id"]])
        flat = [vectors["ids"][j] for j in nn[qi] if vectors["ids"][j] not in pos][:20]
        assert len(set(flat) & set(row["candidate_ids"])) >= 18  # duplicates tie; faiss orders them by row


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_index_reports_recall_and_runs_in_groups(ray_session, vectors, monkeypatch, index):
    # pretend each node holds only two index shards at once: the search runs in groups and merges
    monkeypatch.setattr(execution, "nodes", lambda: [(2.0, 2.1 * 0.2 * 2**20)])
    cfg = {"index": index, "shard_mb": 0.2, "recall_sample": 60, "ivf_nprobe": 4}
    stats, rows = _run(vectors, f"approx-{index}", **cfg)
    assert stats["groups"] >= 2 and stats["index_shards"] >= 4
    rec = stats["recall"]
    assert rec["queries"] >= 60 and 0.8 <= rec["recall_at_k"] <= 1.0
    expect = _brute_force(vectors, 20)
    overlap = np.mean([len(set(r["candidate_ids"]) & set(e[0])) / 20 for r, e in zip(rows, expect, strict=True)])
    assert overlap >= 0.8
    assert not list(Folder(str(vectors["base"] / f"approx-{index}")).fs.glob(str(vectors["base"] / "*" / "group-*")))
    # a rerun reuses every query shard and still reports the recall
    again, _ = _run(vectors, f"approx-{index}", **cfg)
    assert again["reused"] == 2 and again["recall"] == rec


def test_shard_budget_larger_than_any_node_is_a_config_error(ray_session, vectors, monkeypatch):
    from negprep.errors import ConfigError

    monkeypatch.setattr(execution, "nodes", lambda: [(2.0, 1000.0)])
    with pytest.raises(ConfigError, match="lower search.shard_mb"):
        _run(vectors, "too-big")


# ---------------------------------------------------------------------------------------------
# Whole jobs: determinism, resume, invalidation, killed workers


def _job_dict(tmp_path: Path, data: Path, model: Path, name: str, **kw) -> dict:
    job = {
        "input": str(data),
        "output": str(tmp_path / name / "out"),
        "work_dir": str(tmp_path / name / "work"),
        "model": str(model),
        "num_negatives": 3,
        "range_max": 12,
        "sampling": "random",
        "embed": {"batch_size": 16},
    }
    for k, v in kw.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) else v
    return job


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "data").to_pylist()


@pytest.fixture(scope="module")
def reference(ray_session, tiny_bert, demo_data, tmp_path_factory) -> list[dict]:
    """The undisturbed run every other layout and every interrupted run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    run_job(parse_job(_job_dict(tmp, demo_data, tiny_bert, "ref")))
    rows = _rows(tmp / "ref" / "out")
    # enough rows to compare (the random tiny model finds many templated town passages near-copies)
    assert len(rows) > 80
    return rows


def test_output_is_identical_whatever_the_sharding(ray_session, tiny_bert, demo_data, tmp_path, reference):
    layout = {
        "read": {"shard_rows": 7, "query_shard_rows": 9},
        "embed": {"actors": 2, "batch_size": 5},
        "search": {"shard_mb": 0.005, "query_batch": 4, "threads": 1},
    }
    m = run_job(parse_job(_job_dict(tmp_path, demo_data, tiny_bert, "sharded", **layout)))
    assert m["stages"]["search"]["index_shards"] >= 4 and m["stages"]["embed"]["corpus"]["shards"] >= 10
    assert _rows(tmp_path / "sharded" / "out") == reference


def test_changes_invalidate_exactly_what_depends_on_them(
    ray_session, tiny_bert, demo_data, tmp_path, reference, monkeypatch
):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    job = _job_dict(tmp_path, data, tiny_bert, "x", read={"shard_rows": 20})
    run_job(parse_job(job))
    out = tmp_path / "x" / "out"
    assert _rows(out) == reference
    reads = lambda: sorted(p.name for p in (tmp_path / "x" / "work" / "input").iterdir())  # noqa: E731

    def stages(m: dict) -> tuple:
        e, s = m["stages"]["embed"], m["stages"]["search"]
        return e["corpus"]["shards_reused"], e["queries"]["shards_reused"], s["reused"]

    # a mining rule: read, embeddings and search are all reused
    assert stages(run_job(parse_job({**job, "num_negatives": 2}), overwrite=True)) == (4, 1, 1)
    # the window: search again, embeddings reused
    assert stages(run_job(parse_job({**job, "range_max": 15}), overwrite=True)) == (4, 1, 0)
    # the query prompt: only the queries are embedded again
    assert stages(run_job(parse_job({**job, "embed": {"query_prompt": "query: "}}), overwrite=True)) == (4, 0, 0)
    assert len(reads()) == 1
    # the input changes (a passage inserted first, two appended, one edited, one deleted, one renamed with
    # the same text, a query added): read again; only the new texts are embedded, wherever the others moved
    new = _change(data)
    m = run_job(parse_job(job), overwrite=True)
    fresh = run_job(parse_job({**job, "output": str(tmp_path / "y" / "out"),
                               "work_dir": str(tmp_path / "y" / "work")}))
    assert len(reads()) == 2 and m["counts"] == fresh["counts"] and m["rows"] == fresh["rows"]
    for name in m["data_files"]:  # exactly what a run from scratch writes
        assert (out / name).read_bytes() == (tmp_path / "y" / "out" / name).read_bytes()
    for part, texts in new.items():
        e, f = m["stages"]["embed"][part], fresh["stages"]["embed"][part]
        assert e["rows_embedded"] == texts and f["rows_reused"] == 0
        before, after = _shards(tmp_path / "x" / "work", part)
        whole = [s["rows"] for s in after if s["digest"] in {b["digest"] for b in before}]  # shards that did not move
        assert len(whole) == e["shards_reused"] and e["rows_reused"] + e["rows_embedded"] + sum(whole) == \
            f["rows_embedded"]
    assert m["stages"]["embed"]["corpus"]["rows_reused"] > 20  # moved shards were assembled, not embedded again

    # a run killed while writing the output left no _SUCCESS: the rerun replaces it without --overwrite
    (out / "_SUCCESS").unlink()
    (out / "_INCOMPLETE").touch()
    m = run_job(parse_job(job))
    assert (out / "_SUCCESS").exists() and not (out / "_INCOMPLETE").exists()
    # ... but a finished output is kept unless --overwrite
    from negprep.errors import ConfigError

    with pytest.raises(ConfigError, match="output exists"):
        run_job(parse_job(job))

    # --from STAGE recomputes that stage and the later ones; --force all of them
    from negprep.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["run", str(path), "--overwrite", "--from", "search", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert stages(m) == (5, 1, 0)
    calls = []
    monkeypatch.setattr("negprep.runner.run_job", lambda job, overwrite, redo: calls.append(redo) or {})
    monkeypatch.setattr("negprep.output.summary.format_summary", lambda m: "")
    assert main(["run", str(path), "--force"]) == 0 and main(["run", str(path), "--from", "embed"]) == 0
    assert calls == ["read", "embed"]


def _change(data: Path) -> dict[str, int]:
    """Change the demo data in place (see the caller); the new texts per part."""
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    edited, deleted, renamed = corpus[10], corpus[30], corpus[50]
    edited["text"] += " It also has a new harbour."
    renamed["_id"] += "-renamed"
    corpus.remove(deleted)
    extra = [{"_id": f"new{i}", "title": "Velmor", "text": f"Velmor is a new town number {i} on the coast."}
             for i in range(3)]
    (data / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [extra[0], *corpus, *extra[1:]]))
    with open(data / "queries.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"_id": "qnew", "text": "Which town is new on the coast?"}) + "\n")
    with open(data / "qrels" / "train.tsv", "a", encoding="utf-8") as f:
        f.write("qnew\tnew0\t1\n")
    return {"corpus": len(extra) + 1, "queries": 1}


def _shards(work: Path, part: str) -> tuple[list[dict], ...]:
    """The text shards of `part` (corpus or query) of each read of `work`, oldest first."""
    reads = sorted((work / "input").iterdir(), key=lambda p: p.stat().st_mtime)
    key = "corpus_shards" if part == "corpus" else "query_shards"
    return tuple(json.loads((r / "stats.json").read_text())[key] for r in reads)


def _own_ray_env(ray_tmp: str) -> dict:
    """A fresh local Ray for a CLI run: no address inherited, its own temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": ray_tmp}


def _kill_tree(proc: psutil.Process) -> None:
    """SIGKILL a process, then whatever it started that outlives it (only our own descendants)."""
    children = proc.children(recursive=True)
    proc.kill()
    _, alive = psutil.wait_procs(children, timeout=15)
    for c in alive:
        c.kill()


@pytest.mark.slow
def test_killed_run_resumes_from_finished_shards(tiny_bert, demo_data, tmp_path, reference):
    # 20 corpus shards of 4 passages: enough to kill mid-embed, few enough that two Ray starts stay short
    job = _job_dict(tmp_path, demo_data, tiny_bert, "resume", read={"shard_rows": 4}, ray={"num_cpus": 2})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    cmd = [sys.executable, "-m", "negprep", "run", str(path), "--quiet"]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = _own_ray_env(ray_tmp)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    emb = tmp_path / "resume" / "work" / "embeddings"
    deadline = time.time() + 240
    done = []
    while time.time() < deadline and proc.poll() is None:
        done = list(emb.glob("*/*.parquet")) if emb.exists() else []
        if len(done) >= 3:  # a few finished shards, so the rerun has something to reuse
            break
        time.sleep(0.02)
    assert done, f"no embedding file appeared: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
    _kill_tree(psutil.Process(proc.pid))
    proc.wait()
    finished = len(list(emb.glob("*/*.parquet")))
    assert 0 < finished < 20, finished  # killed mid-embed
    assert not (tmp_path / "resume" / "out" / "_SUCCESS").exists()

    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "resume" / "out" / "manifest.json").read_text())
    assert m["stages"]["embed"]["corpus"]["shards_reused"] >= min(finished, 20) - 1 > 0
    assert _rows(tmp_path / "resume" / "out") == reference


@pytest.mark.slow
def test_killed_workers_are_replaced_and_output_is_unchanged(ray_session, tiny_bert, demo_data, tmp_path, reference):
    layout = {
        "read": {"shard_rows": 4, "query_shard_rows": 8},
        "embed": {"actors": 1},
        "search": {"shard_mb": 0.01, "query_batch": 4, "threads": 1},
    }
    job = parse_job(_job_dict(tmp_path, demo_data, tiny_bert, "faults", **layout))
    emb = tmp_path / "faults" / "work" / "embeddings"
    killed: dict[str, int] = {}
    stop = threading.Event()

    def killer() -> None:
        me = psutil.Process()
        for prefix in ("ray::ShardEmbedder", "ray::IndexShard"):
            while not stop.is_set():
                if prefix == "ray::ShardEmbedder" and not list(emb.glob("*/*.parquet")):
                    time.sleep(0.01)  # wait until the embedding is under way
                    continue
                victims = []
                for p in me.children(recursive=True):
                    try:
                        if " ".join(p.cmdline()).startswith(prefix):
                            victims.append(p)
                    except psutil.Error:
                        pass
                if victims:
                    victims[0].send_signal(signal.SIGKILL)
                    killed[prefix] = victims[0].pid
                    break
                time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        run_job(job)
    finally:
        stop.set()
        t.join(5)
    assert set(killed) == {"ray::ShardEmbedder", "ray::IndexShard"}, killed
    assert _rows(tmp_path / "faults" / "out") == reference
