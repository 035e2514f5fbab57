"""Runs a job's stages in order on Ray, skips what is already finished, writes the manifest.

Each stage's results live in the work directory under a key derived from everything they depend
on (inputs, model, settings), so a rerun reuses finished shards and a changed setting recomputes
exactly the stages that depend on it. The output is published last: data files, then
manifest.json, then `_SUCCESS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import numpy as np

from negprep import mining
from negprep.config import Job
from negprep.errors import ConfigError
from negprep.models import EncoderSpec, detect_pooling, model_fingerprint, resolve_model
from negprep.paths import Folder
from negprep.stages.embed import run_embed
from negprep.stages.mine import mine_shard
from negprep.stages.read import fingerprints, input_files, read_key, run_read
from negprep.stages.search import search_shard

log = logging.getLogger(__name__)

VERSIONED = ("negprep", "ray", "pyarrow", "polars", "faiss-cpu", "transformers", "torch", "numpy", "fsspec", "s3fs")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def start_ray(job: Job) -> None:
    """Attach to RAY_ADDRESS (or ray.address) if given, else start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "NEGPREP_CACHE") if k in os.environ}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(
            num_cpus=job.ray.num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=job.ray.object_store_mb << 20,
            runtime_env=env,
            log_to_driver=False,
        )
    ray.data.DataContext.get_current().enable_progress_bars = True


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    log.info("stage %s: started", stage)
    yield
    timings[stage] = round(time.perf_counter() - t0, 3)
    log.info("stage %s: done in %.1f s", stage, timings[stage])


def _gather(futures: list, desc: str) -> list:
    """ray.get with a progress bar, results in submission order."""
    import ray
    from tqdm import tqdm

    pending = list(futures)
    with tqdm(total=len(futures), desc=desc, unit="shard", leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raise the first failure at once
            bar.update(len(done))
    return ray.get(futures)


def prepare_output(out: Folder, overwrite: bool) -> None:
    """Refuse an existing output unless overwriting; an overwrite removes `_SUCCESS` first, so no
    reader takes a half-replaced folder for a dataset."""
    if not out.exists() or not out.ls():
        return
    if not overwrite:
        raise ConfigError(f"{out.url}: output exists; pass --overwrite to replace it")
    out.rm("_SUCCESS")
    out.rm("", recursive=True)


def actor_layout(cpus: int, shards: int, actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, torch threads each): one actor per shard up to the CPUs, the CPUs shared among them.

    With fewer shards than CPUs the spare cores become threads, so a one-shard corpus still uses
    the whole machine.
    """
    n = actors or max(1, min(shards, cpus // (threads or 1)))
    return n, threads or max(1, cpus // n)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_job(job: Job, overwrite: bool = False) -> dict:
    """Run a validated job end to end; returns the manifest written next to the output."""
    import ray

    t_start = time.perf_counter()
    so = job.storage
    out, work = Folder(job.output, so), Folder(job.work, so)
    files = input_files(job)
    fps = fingerprints(files, so)  # missing inputs fail here, before Ray starts
    if out.exists() and out.ls() and not overwrite:
        raise ConfigError(f"{job.output}: output exists; pass --overwrite to replace it")
    resolved = resolve_model(job.model)
    start_ray(job)
    cpus = cluster_cpus()
    timings: dict[str, float] = {}

    with _timed(timings, "read"):
        rdir = work.sub("input", read_key(job, fps))
        if rdir.exists("_SUCCESS"):
            read = rdir.read_json("stats.json")
        else:
            task = ray.remote(run_read).options(num_cpus=1, max_retries=2)
            read = ray.get(task.remote(job, rdir, files, so))
            rdir.write_bytes("_SUCCESS", b"")

    with _timed(timings, "embed"):
        pooling = detect_pooling(resolved) if job.embed.pooling == "auto" else job.embed.pooling
        fp = model_fingerprint(resolved)
        e = job.embed
        pspec = EncoderSpec(resolved, fp, pooling, e.max_length, e.normalize, e.passage_prompt, e.trust_remote_code)
        qspec = EncoderSpec(resolved, fp, pooling, e.max_length, e.normalize, e.query_prompt, e.trust_remote_code)
        pdir, qdir = work.sub("embeddings", pspec.key()), work.sub("embeddings", qspec.key())
        embed_stats = {}
        for kind, spec, src, shards, dst in (
            ("corpus", pspec, rdir.sub("corpus"), read["corpus_shards"], pdir),
            ("queries", qspec, rdir.sub("queries"), read["query_shards"], qdir),
        ):
            actors, threads = actor_layout(cpus, len(shards), e.actors, e.threads_per_actor)
            embed_stats[kind] = run_embed(spec, src, shards, dst, actors, threads, e.batch_size)

    corpus_emb = [f"{s['digest']}.parquet" for s in read["corpus_shards"]]
    with _timed(timings, "search"):
        sdir = work.sub(
            "search",
            _key(
                pspec.key(),
                qspec.key(),
                corpus_emb,
                read["query_shards"],
                rdir.url,
                job.range_max,
                job.search.model_dump(),
            ),
        )
        done = set(sdir.ls(".parquet"))
        todo = [s for s in read["query_shards"] if s["name"] not in done]
        threads = job.search.threads or max(1, cpus // max(1, min(len(todo), cpus)))
        task = ray.remote(search_shard).options(num_cpus=threads, max_retries=3)
        futures = [
            task.remote(
                (qdir, f"{s['digest']}.parquet"),
                (pdir, corpus_emb),
                (rdir, "qrels.parquet"),
                (sdir, s["name"]),
                job.range_max,
                threads,
            )
            for s in todo
        ]
        _gather(futures, "search")
        search_stats = {"query_shards": len(read["query_shards"]), "reused": len(read["query_shards"]) - len(todo)}

    rules = mining.Rules(
        num_negatives=job.num_negatives,
        range_min=job.range_min,
        range_max=job.range_max,
        relative_margin=job.relative_margin,
        absolute_margin=job.absolute_margin,
        max_score=job.max_score,
        min_score=job.min_score,
        sampling=job.sampling,
        seed=job.seed,
    )
    with _timed(timings, "mine"):
        prepare_output(out, overwrite)
        data = out.sub("data")
        n = len(read["query_shards"])
        task = ray.remote(mine_shard).options(num_cpus=1, max_retries=3)
        futures = [
            task.remote(
                (sdir, s["name"]),
                (rdir.sub("queries"), s["name"]),
                (rdir.sub("corpus"), [c["name"] for c in read["corpus_shards"]]),
                (data, f"train-{i:05d}-of-{n:05d}.parquet"),
                rules,
                job.format,
            )
            for i, s in enumerate(read["query_shards"])
        ]
        results = _gather(futures, "mine")

    counts: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            if k != "seconds":
                counts[k] = counts.get(k, 0) + v
    samples = {
        k: np.concatenate([r["sample"][k] for r in results]) if results else np.array([])
        for k in ("positive_scores", "negative_scores", "negative_ranks")
    }
    timings["total"] = round(time.perf_counter() - t_start, 3)
    manifest = {
        "negprep_version": _version("negprep"),
        "created_unix": int(time.time()),
        "output": job.output,
        "format": job.format,
        "data_files": sorted(f"data/{n}" for n in data.ls(".parquet")),
        "rows": counts.get("rows", 0),
        "config": job.model_dump(mode="json", exclude={"storage"}),
        "model": {
            "resolved": resolved,
            "fingerprint": fp,
            "pooling": pooling,
            "passage_key": pspec.key(),
            "query_key": qspec.key(),
        },
        "inputs": read["inputs"],
        "counts": {
            "passages": read["passages"],
            "queries": read["queries"],
            "positives": read["positives"],
            "rejected_input_rows": read["rejected_rows"],
            **counts,
        },
        "scores": {k: quantiles(v) for k, v in samples.items()},
        "stages": {"embed": embed_stats, "search": search_stats},
        "timings_s": timings,
        "versions": {p: _version(p) for p in VERSIONED} | {"python": platform.python_version()},
    }
    out.write_json("manifest.json", manifest)
    out.write_bytes("_SUCCESS", b"")
    return manifest


def quantiles(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    q = np.quantile(np.asarray(x, dtype=np.float64), [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1])
    return dict(zip(("min", "p05", "p25", "p50", "p75", "p95", "max"), (round(float(v), 4) for v in q), strict=True))


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
