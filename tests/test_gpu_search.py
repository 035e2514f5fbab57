"""Flat search on CUDA (negprep.index.gpu_knn) gives exactly the candidates of CPU flat search.

CI has no GPU: `NEGPREP_CUDA_ON_CPU=1` runs the CUDA code (float16 matrix, query batches, top-k,
the wider rounding bound) on CPU tensors, and Ray schedules the index shard actors on logical GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from negprep.config import SearchConfig, parse_job
from negprep.errors import ConfigError
from negprep.index import faiss_shard, gpu_knn, placement
from negprep.paths import Folder
from negprep.schemas import conform

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    monkeypatch.setenv("NEGPREP_CUDA_ON_CPU", "1")


def _emb_table(ids: list[str], vecs: np.ndarray) -> pa.Table:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
    return conform(pa.table({"id": ids, "embedding": emb.cast(pa.list_(pa.float32()))}), "embeddings")


def _shards(tmp: Path, ids: list[str], vecs: np.ndarray,
            device: str) -> tuple[faiss_shard.IndexShard, faiss_shard.IndexShard]:
    """The same rows as a CPU (faiss) and a CUDA (torch) index shard."""
    folder = Folder(str(tmp))
    folder.write_parquet("c.parquet", _emb_table(ids, vecs))
    pieces = (faiss_shard.RowSpan("c.parquet", 0, len(ids)),)
    return (faiss_shard.IndexShard(folder, pieces, SearchConfig(), 1, "cpu"),
            faiss_shard.IndexShard(folder, pieces, SearchConfig(), 1, device))


def _clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray, spread: float) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _same(a: tuple, b: tuple) -> None:
    (s1, i1, p1), (s2, i2, p2) = a, b
    assert i1.tolist() == i2.tolist()
    assert s1.dtype == s2.dtype == np.float32 and np.array_equal(s1, s2)  # bit-identical, -inf padding too
    assert p1 == p2


def test_torch_flat_equals_cpu_flat_with_ties_and_near_ties(cuda_on_cpu, tmp_path):
    rng = np.random.default_rng(3)
    dim = 48
    centers = rng.standard_normal((6, dim))
    corpus = _clustered(rng, 1500, dim, centers, 0.08)
    corpus[1000:1150] = corpus[0:150]  # exact duplicates under other ids: equal scores, ordered by id
    near = corpus[200:350] + rng.standard_normal((150, dim)).astype(np.float32) * 1e-6
    corpus[1150:1300] = near / np.linalg.norm(near, axis=1, keepdims=True)  # near-ties below float16 resolution
    ids = [f"p{(i * 7919) % 1500:05d}" for i in range(1500)]  # id order unrelated to row order
    queries = np.concatenate([_clustered(rng, 60, dim, centers, 0.08), corpus[[0, 5, 200, 210, 1000]]])
    positives = [(r, ids[(r * 31) % 1500]) for r in range(len(queries))] + [(3, ids[1003])]
    cpu, gpu = _shards(tmp_path, ids, corpus, "cuda")
    assert gpu.gpu is not None and gpu.index is None and str(gpu.gpu.device) == "cpu"
    assert cpu.gpu is None
    gpu.gpu.score_mb = 0.05  # a few queries per matmul: the batching is part of what is tested
    assert gpu.gpu.batch_rows(80) < len(queries)
    for k in (1, 7, 20, 64):
        _same(cpu.search(queries, k, positives), gpu.search(queries, k, positives))
    # and both are the brute-force float64 answer with ties by id
    s, i, _ = gpu.search(queries, 20, [])
    exact = (queries.astype(np.float64) @ corpus.astype(np.float64).T).astype(np.float32)
    for r in range(len(queries)):
        order = sorted(range(len(ids)), key=lambda j: (-exact[r, j], ids[j]))[:20]
        assert i[r].tolist() == [ids[j] for j in order]
        assert s[r].tolist() == exact[r, order].tolist()


def test_shard_with_fewer_rows_than_k(cuda_on_cpu, tmp_path):
    rng = np.random.default_rng(5)
    vecs = rng.standard_normal((7, 16)).astype(np.float32)
    vecs[3] = vecs[1]
    ids = [f"x{i}" for i in (5, 3, 9, 1, 0, 2, 8)]
    cpu, gpu = _shards(tmp_path, ids, vecs, "cuda")
    q = rng.standard_normal((4, 16)).astype(np.float32)
    for k in (3, 7, 20):
        got = gpu.search(q, k, [(0, "x3")])
        _same(cpu.search(q, k, [(0, "x3")]), got)
    assert got[1][:, 7:].tolist() == [[None] * 13] * 4 and np.isneginf(got[0][:, 7:]).all()


def test_near_tie_makes_the_bound_fetch_more(cuda_on_cpu, tmp_path):
    """300 passages whose exact scores differ by less than float16 can tell apart: the first fetch
    (k + SLACK rows by approximate score) misses some of the true top k, and the bound check
    must notice and fetch more."""
    rng = np.random.default_rng(11)
    dim, k = 64, 10
    base = rng.standard_normal(dim)
    base /= np.linalg.norm(base)
    near = base + 2e-5 * rng.standard_normal((300, dim))
    far = rng.standard_normal((700, dim))
    far /= np.linalg.norm(far, axis=1, keepdims=True)  # unit vectors, far from the query
    corpus = np.concatenate([near, far]).astype(np.float32)
    order = rng.permutation(len(corpus))
    corpus = corpus[order]
    ids = [f"d{i:04d}" for i in range(len(corpus))]
    q = base[None, :].astype(np.float32)
    cpu, gpu = _shards(tmp_path, ids, corpus, "cuda")
    wants, firsts = [], []
    knn = gpu.gpu.knn

    def counting(qq, want):
        out = knn(qq, want)
        wants.append(want)
        firsts.append(out[1])
        return out

    gpu.gpu.knn = counting
    got = gpu.search(q, k, [])
    _same(cpu.search(q, k, []), got)
    assert wants[0] == k + faiss_shard.SLACK and len(wants) >= 2 and wants[1] == 4 * wants[0]
    # the first fetch alone would have been wrong: the refetch is what made the answer exact
    first = set(np.array(ids, dtype=object)[firsts[0][0]].tolist())
    assert not set(got[1][0].tolist()) <= first
    # without the bound the torch path gives other candidates
    bound = gpu.gpu.bound
    gpu.gpu.bound = lambda qq, max_norm: np.zeros(len(qq))
    assert gpu.search(q, k, [])[1].tolist() != got[1].tolist()
    gpu.gpu.bound = bound
    # the approximate scores are within the bound, and it exceeds the gaps between near-ties
    approx, rows = knn(q, len(ids))
    exact = corpus[rows[0]].astype(np.float64) @ q[0].astype(np.float64)
    eps = gpu.gpu.bound(q, gpu.max_norm)[0]
    assert np.abs(approx[0] - exact).max() <= eps
    top = np.sort(exact)[::-1]
    assert top[k - 1] - top[k + faiss_shard.SLACK] < eps


@pytest.mark.parametrize("scale", [1.0, 3000.0, 1e-6])
def test_bound_holds_for_every_score(cuda_on_cpu, scale):
    """|approximate - exact| <= bound for every pair, for unit vectors, large norms (float16 would
    overflow unscaled) and tiny ones (subnormal unscaled), with some entries near zero."""
    rng = np.random.default_rng(int(scale * 7) % 1000)
    dim = 96
    p = (rng.standard_normal((800, dim)) * scale).astype(np.float32)
    p[:, :5] *= 1e-6  # entries far below the row's largest: float16 subnormals after scaling
    q = (rng.standard_normal((50, dim)) * scale).astype(np.float32)
    q[:, 5:9] = 0
    knn = gpu_knn.TorchKnn(p, "cuda", score_mb=0.1)
    approx, rows = knn.knn(q, len(p))
    assert np.isfinite(approx).all()
    exact = np.take_along_axis(q.astype(np.float64) @ p.astype(np.float64).T, rows, axis=1)
    eps = knn.bound(q, float(np.linalg.norm(p.astype(np.float64), axis=1).max()))
    err = np.abs(approx - exact).max(axis=1)
    assert (err <= eps).all()
    assert (err > 0).any()  # float16 is approximate, so the test is not vacuous
    # the bound is a few float16 roundings, not a loose one
    norms = np.linalg.norm(q.astype(np.float64), axis=1) * np.linalg.norm(p.astype(np.float64), axis=1).max()
    assert (eps / norms < 3e-3).all()


def test_query_batch_scales_with_the_gpus_free_memory():
    """The score buffer is half the free GPU memory within [256 MB, 8 GB]; queries per matmul follow
    (the top-k's memory counted), at most 16,384 and 2^31 scores. CUDA-like numbers: CI has no GPU."""
    gib = 1 << 30
    h200 = 139 * gib  # what an H200 has free with a CUDA context and a shard's float16 passages
    rows = gpu_knn.batch_rows_for
    assert rows(h200, 1_000_000, 116, 384) >= 1024  # 2,144: 8 GB of float32 scores
    assert rows(h200, 1_000_000, 116, 384) * 1_000_000 <= gpu_knn.MAX_SCORES
    assert rows(h200, 10_000_000, 116, 384) >= 200  # 214 (2^31 scores), where SCORE_MB gave 13
    assert rows(None, 1_000_000, 116, 384) == (512 << 20) // (4_000_000 + 36 * 116 + 768)  # CPU tensors: 134
    assert gpu_knn.score_budget(h200) == gpu_knn.SCORE_MAX
    assert gpu_knn.score_budget(4 * gib) == 2 * gib  # half the free memory
    assert gpu_knn.score_budget(100 << 20) == gpu_knn.SCORE_MIN  # the floor
    assert rows(4 * gib, 1_000_000, 116, 384) == 2 * gib // (4_000_000 + 36 * 116 + 768)
    assert rows(h200, 20_000, 116, 384) == gpu_knn.MAX_ROWS  # a small shard: capped
    assert rows(h200, 1_000_000, 1_000_000, 384) < rows(h200, 1_000_000, 116, 384)  # the top-k's memory counts
    assert rows(100 << 20, 2_000_000_000, 116, 384) == 1  # never zero
    assert all(rows(f << 30, n, w, 384) >= 1 for f in (0, 1, 80) for n in (1, 10**5, 10**8) for w in (1, 10**4))


def test_torch_knn_reports_its_query_batch(cuda_on_cpu):
    rng = np.random.default_rng(2)
    p = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    knn = gpu_knn.TorchKnn(p, "cuda")
    assert knn.free_mb is None and knn.score_mb == gpu_knn.SCORE_MB and knn.query_batch == 0
    full = knn.knn(q, 10)
    assert knn.query_batch == knn.batch_rows(10) == gpu_knn.MAX_ROWS  # 500 passages: capped
    small = gpu_knn.TorchKnn(p, "cuda", score_mb=0.02)
    got = small.knn(q, 10)
    assert 1 < small.query_batch < len(q)  # several batches: the same answer
    assert np.array_equal(got[0], full[0]) and np.array_equal(got[1], full[1])


def _rescore_shard(tmp: Path, threads: int, device: str = "cpu") -> faiss_shard.IndexShard:
    folder = Folder(str(tmp))
    if not folder.exists("c.parquet"):
        rng = np.random.default_rng(8)
        vecs = rng.standard_normal((3000, 64)).astype(np.float32)
        vecs[2000:2100] = vecs[:100]  # ties
        folder.write_parquet("c.parquet", _emb_table([f"p{(i * 37) % 3000:05d}" for i in range(3000)], vecs))
    return faiss_shard.IndexShard(folder, (faiss_shard.RowSpan("c.parquet", 0, 3000),), SearchConfig(), threads, device)


def test_rescoring_on_threads_is_bit_identical(monkeypatch, tmp_path):
    """The exact rescoring splits its queries over the actor's threads; every (query, row) pair is
    computed the same way, so scores, ids and candidates do not depend on the threads."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((300, 64)).astype(np.float32)
    rows = rng.integers(0, 3000, (300, 50))
    rows[::7, -5:] = -1  # fewer rows than wanted: -inf and None
    monkeypatch.setattr(faiss_shard, "RESCORE_ELEMENTS", 60_000)  # many small steps
    monkeypatch.setattr(faiss_shard, "RESCORE_MIN", 10_000)
    one = _rescore_shard(tmp_path, 1)
    ref = one._rescore(q, rows)
    # the float64 dot product as it was always computed
    vecs = one.vecs[np.maximum(rows, 0)].astype(np.float64)
    old = (q.astype(np.float64)[:, None, :] * vecs).sum(axis=-1).astype(np.float32)
    assert np.array_equal(ref[0], np.where(rows >= 0, old, -np.inf).astype(np.float32))
    assert ref[0].dtype == np.float32 and np.isneginf(ref[0][::7, -5:]).all() and (ref[1][::7, -5:] == None).all()  # noqa: E711
    steps: list[int] = []
    real = faiss_shard._dot64
    for threads in (2, 3, 8):
        many = _rescore_shard(tmp_path, threads)
        steps.clear()
        monkeypatch.setattr(faiss_shard, "_dot64", lambda a, b: steps.append(len(a)) or real(a, b))
        got = many._rescore(q, rows)
        monkeypatch.setattr(faiss_shard, "_dot64", real)
        assert len(steps) > threads and sum(steps) == len(q)  # the work was split, every query once
        assert np.array_equal(got[0], ref[0]) and got[1].tolist() == ref[1].tolist()
        assert many._pool is not None and many._pool._max_workers == threads
        for k in (1, 10, 40):
            _same(one.search(q, k, [(0, "p00001"), (5, "p00002")]), many.search(q, k, [(0, "p00001"), (5, "p00002")]))
        assert [x.shape for x in many._rescore(q[:0], rows[:0])] == [(0, 50), (0, 50)]
        assert np.array_equal(many._rescore(q[:1], rows[:1])[0], ref[0][:1])


def test_rescoring_threads_on_cuda_equal_cpu(cuda_on_cpu, tmp_path):
    rng = np.random.default_rng(10)
    q = rng.standard_normal((120, 64)).astype(np.float32)
    cpu, gpu = _rescore_shard(tmp_path, 1), _rescore_shard(tmp_path, 3, "cuda")
    assert gpu.gpu is not None and gpu.threads == 3
    for k in (5, 30):
        _same(cpu.search(q, k, [(1, "p00003")]), gpu.search(q, k, [(1, "p00003")]))


def test_gpu_index_shards_ask_for_their_rescoring_cpus():
    """On CUDA an index shard actor asks Ray for its share of its GPU node's CPUs (whole ones when
    one or more), never more than a node can give every shard it may hold."""
    mb = 1 << 20
    big = 1 << 40
    # one 16-CPU node with 8 GPUs: 8 shards at once take 2 CPUs each; one shard takes all 16
    assert placement.gpu_shard_cpus([(16, 8, big)], mb, 8) == (2, 2.0)
    assert placement.gpu_shard_cpus([(16, 8, big)], mb, 1) == (16, 16.0)
    assert placement.gpu_shard_cpus([(16, 8, big)], mb, 3) == (5, 5.0)  # 16 / 3: whole CPUs
    # search.threads: the threads, but never more CPUs than the node's share
    assert placement.gpu_shard_cpus([(16, 8, big)], mb, 8, threads=4) == (4, 2.0)
    assert placement.gpu_shard_cpus([(16, 8, big)], mb, 8, threads=1) == (1, 1.0)
    # fewer CPUs than GPUs: a fraction each, so both actors still fit the node
    assert placement.gpu_shard_cpus([(1, 2, big)], mb, 2) == (1, 0.5)
    # memory holds 2 shards on the 8-GPU node: they share its CPUs by 2
    assert placement.gpu_shard_cpus([(16, 8, 2 * mb)], mb, 8) == (8, 8.0)
    # nodes differ: the smallest share, wherever Ray places them; a CPU-less node holds none
    nodes = [(32, 4, big), (8, 4, big), (0, 8, big)]
    assert placement.gpu_shard_cpus(nodes, mb, 8) == (2, 2.0)
    assert placement.gpu_fit(nodes, mb) == 8 and placement.gpu_fit(nodes, 8 * big) == 0
    assert placement.gpu_shard_cpus([], mb, 1) == (1, 1.0)
    # every node can hold all the shards it may get
    for nodes, size in (([(16, 8, big)], 8), ([(6, 4, big), (3, 2, big)], 5), ([(3, 8, big)], 8)):
        ask = placement.gpu_shard_cpus(nodes, mb, size)[1]
        assert all(ask * min(g, size) <= c for c, g, _ in nodes)
    res = placement.search_resources(mb, 1.0, 2.0)
    assert res["index_shard"].cpus == 2.0 and res["index_shard"].gpus == 1.0 and res["coordinator"].cpus == 0
    assert placement.search_resources(mb)["index_shard"].cpus == 0.01  # the CPU: a token CPU, as before


def test_gpu_search_imports_without_ray_faiss_polars():
    code = "import sys, negprep.index.gpu_knn; print([m for m in ('ray', 'faiss', 'polars') if m in sys.modules])"
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def test_cuda_shard_without_an_assigned_gpu_is_a_config_error(monkeypatch, tmp_path):
    from negprep import execution

    monkeypatch.delenv("NEGPREP_CUDA_ON_CPU", raising=False)
    monkeypatch.setattr(execution, "assigned_gpus", lambda: [])
    with pytest.raises(ConfigError, match="assigned this index shard actor no GPU"):
        _shards(tmp_path, ["a"], np.ones((1, 4), np.float32), "cuda")


def test_gpu_layout_spreads_over_gpus_and_sizes_by_gpu_memory(tmp_path):
    from negprep.input.shards import Shard
    from negprep.stages import search

    folder = Folder(str(tmp_path))
    rows = [100, 250, 50]
    for i, n in enumerate(rows):
        folder.write_parquet(f"c{i}.parquet", _emb_table([f"{i}-{j}" for j in range(n)], np.ones((n, 8), np.float32)))
    inputs = search.SearchInputs(folder, tuple(Shard(f"c{i}.parquet", n, n, f"c{i}") for i, n in enumerate(rows)),
                                 folder, (), folder.file("q.parquet"))
    cfg = SearchConfig(device="cuda", shard_mb=0.001)  # shard_mb does not apply on cuda
    shards, need = placement.layout(cfg, inputs.passages, inputs.corpus_shards, "cuda", 4)
    assert [sum(p.stop - p.start for p in s) for s in shards] == [100] * 4  # one per GPU
    assert need == 100 * faiss_shard.bytes_per_row(8, cfg)  # host memory: the float32 copy and the ids
    small = SearchConfig(device="cuda", gpu_shard_mb=16 * 60 / 2**20)  # 60 rows of 8 float16
    corpus = (inputs.passages, inputs.corpus_shards)
    assert max(sum(p.stop - p.start for p in s) for s in placement.layout(small, *corpus, "cuda", 1)[0]) <= 60
    assert len(placement.layout(SearchConfig(shard_mb=0.001), *corpus)[0]) > 10  # the CPU is sized by shard_mb


def test_search_device_cuda_without_a_gpu_is_one_line(ray_session, tiny_bert, demo_data, tmp_path):
    from negprep.runner import run_job

    job = parse_job({"input": str(demo_data), "output": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                     "model": str(tiny_bert), "search": {"device": "cuda"}})
    with pytest.raises(ConfigError, match=r"^search.device: cuda, but the Ray cluster offers no GPU") as e:
        run_job(job)
    assert "\n" not in str(e.value)


_JOB_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import pyarrow.parquet as pq
    import ray

    from negprep.config import parse_job
    from negprep.runner import run_job

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, object_store_memory=256 << 20, log_to_driver=False)
    job = json.loads(sys.argv[1])
    out = {}
    for name, search in json.loads(sys.argv[2]).items():
        m = run_job(parse_job(job | {"search": search}), overwrite=True, redo="search")
        cands = []
        for f in sorted(Path(job["work_dir"], "search").glob("*/*.parquet")):
            cands += pq.read_table(f).to_pylist()
        rows = pq.read_table(Path(job["output"], "data")).to_pylist()
        out[name] = {"stats": m["stages"]["search"], "candidates": cands, "rows": rows}
    print("RESULT " + json.dumps(out, sort_keys=True, default=str))
""")


def test_job_on_logical_gpus_gives_the_cpu_candidates(tiny_bert, demo_data, tmp_path):
    """A whole job on a local Ray with two logical GPUs: `search.device: cuda` (the corpus spread
    over both, an index shard actor on each) writes the candidates and rows of `cpu`."""
    job = {"input": str(demo_data), "output": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
           "model": str(tiny_bert), "num_negatives": 3, "range_max": 12, "sampling": "random",
           "embed": {"batch_size": 16, "device": "cpu"}, "ray": {"num_cpus": 2}}
    runs = {"cpu": {"device": "cpu"}, "cuda": {"device": "cuda", "query_batch": 8}}
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": ray_tmp,
            "NEGPREP_CUDA_ON_CPU": "1", "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")}
    try:
        r = subprocess.run([sys.executable, "-c", _JOB_SCRIPT, json.dumps(job), json.dumps(runs)],
                           capture_output=True, text=True, env=env, timeout=300)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    cpu, gpu = out["cpu"], out["cuda"]
    assert cpu["stats"]["device"] == "cpu" and "gpus_per_index_shard" not in cpu["stats"]
    assert cpu["stats"]["index_shards"] == 1
    assert gpu["stats"]["device"] == "cuda" and gpu["stats"]["gpus_per_index_shard"] == 1.0
    # 2 CPUs, 2 GPUs, 2 index shards: each actor asks 1 CPU for its rescoring, and both still run
    assert (gpu["stats"]["cpus_per_index_shard"], gpu["stats"]["threads_per_index_shard"]) == (1.0, 1)
    assert (gpu["stats"]["index_shards"], gpu["stats"]["groups"]) == (2, 1)  # one shard per GPU, both at once
    assert len(cpu["candidates"]) > 20 and len(cpu["rows"]) > 50
    assert gpu["candidates"] == cpu["candidates"]
    assert gpu["rows"] == cpu["rows"]
