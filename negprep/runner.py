"""Runs a job's stages in order on Ray, skips what is already finished, writes the manifest.

Each stage's results live in the work directory under a key derived from everything they depend
on (inputs, model, settings), so a rerun reuses finished shards and a changed setting recomputes
exactly the stages that depend on it. The output is published last: data files, rejected input
rows (rejected/input.parquet), manifest.json, the dataset card README.md and report.html, then
`_SUCCESS`.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager
from importlib import metadata

import numpy as np

from negprep import mining, storage
from negprep.config import Job
from negprep.errors import ConfigError, NegprepError
from negprep.models import check_compile_settings, encoder_specs, resolve_model
from negprep.paths import Folder, stage_key
from negprep.report import histograms, merge_distributions, publish_docs
from negprep.stages.batch import run_batches
from negprep.stages.cluster import run_cluster
from negprep.stages.embed import EmbedPart, run_embed
from negprep.stages.guide import run_guide
from negprep.stages.mine import mine_shard
from negprep.stages.read import fingerprints, input_files, publish_rejected, read_key, run_read
from negprep.stages.search import run_search, search_settings

log = logging.getLogger(__name__)

STAGES = ("read", "embed", "search", "mine")  # the order they run in; `redo` / --from name one
INCOMPLETE = "_INCOMPLETE"  # in an output while a run writes it; `_SUCCESS` replaces it at the end
VERSIONED = ("negprep", "ray", "pyarrow", "polars", "faiss-cpu", "transformers", "torch", "onnxruntime", "numpy",
             "fsspec", "s3fs")


def start_ray(job: Job) -> None:
    """Attach to RAY_ADDRESS (or ray.address) if given, else start a local Ray sized for this machine."""
    import ray

    if ray.is_initialized():
        return
    address = job.ray.address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "NEGPREP_CACHE") if k in os.environ}}
    # workers (maybe on other machines) need the driver's AWS endpoint and region; the keys go in
    # the pickled Folders instead (storage.with_env_credentials): Ray logs the runtime_env
    env["env_vars"] |= storage.ray_env()
    if address:
        # under `ray job submit --runtime-env-json` the job's env vars would clash with these same
        # keys (a ValueError); merge them instead, ours (the driver's own values) winning
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(
            num_cpus=job.ray.num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=job.ray.object_store_mb << 20,
            runtime_env=env,
            log_to_driver=False,
        )


@contextmanager
def _timed(timings: dict, stage: str):
    t0 = time.perf_counter()
    log.info("stage %s: started", stage)
    yield
    timings[stage] = round(time.perf_counter() - t0, 3)
    log.info("stage %s: done in %.1f s", stage, timings[stage])


def _get(refs):
    """ray.get; a negprep error raised inside a task arrives wrapped in RayTaskError with its
    traceback: re-raise the original, so the CLI still prints one line and exits 2."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, NegprepError):
            raise e.cause from None
        raise


def _gather(futures: list, desc: str) -> list:
    """ray.get with a progress bar, results in submission order."""
    import ray
    from tqdm import tqdm

    pending = list(futures)
    with tqdm(total=len(futures), desc=desc, unit="shard", leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            _get(done)  # raise the first failure at once
            bar.update(len(done))
    return _get(futures)


def prepare_output(out: Folder, overwrite: bool) -> None:
    """Refuse an existing output unless overwriting; an overwrite removes `_SUCCESS` first, so no
    reader takes a half-replaced folder for a dataset."""
    if has_files(out):
        if not overwrite and not unfinished(out):
            raise ConfigError(f"{out.url}: output exists; pass --overwrite to replace it")
        # object stores have no rename: the marker goes first, then the manifest, then the data
        out.rm("_SUCCESS")
        out.rm("manifest.json")
        out.rm("", recursive=True)
    # a run in progress: if it is killed, the rerun replaces this output without --overwrite
    out.write_bytes(INCOMPLETE, b"")


def has_files(out: Folder) -> bool:
    """Whether `out` holds anything but a write probe left by an interrupted pre-flight check."""
    return any(not n.startswith(".negprep-write-check") for n in out.ls())


def unfinished(out: Folder) -> bool:
    """An output a killed negprep run left behind (no `_SUCCESS`): safe to replace."""
    return out.exists(INCOMPLETE) and not out.exists("_SUCCESS")


def export_models(job: Job, resolved: str, work: Folder) -> float | None:
    """Export the models that run on onnxruntime (the embedding model, a bi-encoder guide) into the
    work directory, unless a previous run did (negprep.export); the seconds it took, None when no
    model runs on onnxruntime."""
    from negprep.export import ensure_exported

    configs = [(resolved, job.embed)]
    if job.guide and job.guide.type == "biencoder":
        configs.append((resolve_model(job.guide.model), job.guide))
    seconds = None
    for model, cfg in configs:
        if cfg.runtime == "onnxruntime":
            spec = encoder_specs(model, cfg, work)[0]
            t0 = time.perf_counter()
            made = ensure_exported(spec, spec.export)
            took = time.perf_counter() - t0
            if made:
                log.info("exported %s (%s) for onnxruntime in %.1f s", model, cfg.dtype, took)
            seconds = (seconds or 0.0) + took
    return None if seconds is None else round(seconds, 3)


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_job(job: Job, overwrite: bool = False, redo: str | None = None) -> dict:
    """Run a validated job end to end; returns the manifest written next to the output.

    Finished work in the work directory is reused; `redo` names the first stage (of STAGES) to
    recompute regardless, and every later one is recomputed too.
    """
    import ray

    again = set(STAGES[STAGES.index(redo) :]) if redo else set()

    t_start = time.perf_counter()
    so = job.storage
    storage.remember_secrets(job.model_dump(mode="json"))  # masked in every message and log line from now on
    out, work = Folder(job.output, so), Folder(job.work, so)
    files = input_files(job)
    fps = fingerprints(files, so)  # missing inputs fail here, before Ray starts
    # so do an unreachable endpoint, a missing bucket or no write permission (inside Ray they arrive wrapped)
    checks = [("output", out), ("work_dir", work)] + ([("rejected", Folder(job.rejected, so))] if job.rejected else [])
    for role, folder in checks:
        storage.check_writable(folder, role)
    if has_files(out) and not overwrite and not unfinished(out):
        raise ConfigError(f"{job.output}: output exists; pass --overwrite to replace it")
    resolved = resolve_model(job.model)
    check_compile_settings(job)
    timings: dict[str, float] = {}
    # before Ray: the export's torch process is gone when actors start
    if (seconds := export_models(job, resolved, work)) is not None:
        timings["export"] = seconds
    start_ray(job)
    cpus = cluster_cpus()

    with _timed(timings, "read"):
        rdir = work.sub("input", read_key(job, fps))
        if rdir.exists("_SUCCESS") and "read" not in again:
            read = rdir.read_json("stats.json")
        else:
            rdir.rm("_SUCCESS")
            # max_calls=1: the worker exits afterwards, with whatever memory parsing the inputs took
            task = ray.remote(num_cpus=1, max_retries=job.ray.retries, max_calls=1)(run_read)
            read = _get(task.remote(job, rdir, files, so))
            rdir.write_bytes("_SUCCESS", b"")

    with _timed(timings, "embed"):
        e = job.embed
        pspec, qspec = encoder_specs(resolved, e, work)
        pdir, qdir = work.sub("embeddings", pspec.key()), work.sub("embeddings", qspec.key())
        parts = [EmbedPart("corpus", pspec, rdir.sub("corpus"), read["corpus_shards"], pdir),
                 EmbedPart("queries", qspec, rdir.sub("queries"), read["query_shards"], qdir)]
        embed_stats = run_embed(parts, cpus, e, "embed" in again, job.ray.retries)

    corpus_emb = [f"{s['digest']}.parquet" for s in read["corpus_shards"]]
    with _timed(timings, "search"):
        sdir = work.sub(
            "search",
            stage_key(
                pspec.key(),
                qspec.key(),
                corpus_emb,
                read["query_shards"],
                rdir.url,
                job.range_max,
                search_settings(job.search),
            ),
        )
        search_stats = run_search(
            job.search,
            (pdir, read["corpus_shards"]),
            (qdir, read["query_shards"]),
            (rdir, "qrels.parquet"),
            sdir,
            job.range_max,
            retries=job.ray.retries,
            force="search" in again,
        )

    gdir, guide_stats = None, None
    if job.guide:
        with _timed(timings, "guide"):
            gdir, guide_stats = run_guide(job, cpus, work, rdir, read, sdir)

    cdir, cluster_stats = None, None
    if job.clusters or job.batch_size:
        with _timed(timings, "cluster"):
            cdir, cluster_stats = run_cluster(job, work, qdir, qspec.key(), read["query_shards"], read["queries"])

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
        margin_bins=job.margin_bins,
        guide_relative_margin=job.guide.relative_margin if job.guide else None,
        guide_absolute_margin=job.guide.absolute_margin if job.guide else None,
        guide_max_score=job.guide.max_score if job.guide else None,
    )
    with _timed(timings, "mine"):
        prepare_output(out, overwrite)
        data = out.sub("data")
        audit = Folder(job.rejected, so) if job.rejected else None
        if audit:
            audit.rm("", recursive=True)
        n = len(read["query_shards"])
        # with batch_size the mined files are staged, then rewritten in batch order by the batch step
        staged = work.sub("unbatched", stage_key(job.output)) if job.batch_size else None
        if staged:
            staged.rm("", recursive=True)
        task = ray.remote(mine_shard).options(num_cpus=1, max_retries=job.ray.retries)
        futures = [
            task.remote(
                (sdir, s["name"]),
                (rdir.sub("queries"), s["name"]),
                (rdir.sub("corpus"), [c["name"] for c in read["corpus_shards"]]),
                (staged or data, f"train-{i:05d}-of-{n:05d}.parquet"),
                rules,
                job.format,
                (gdir, s["name"]) if gdir else None,
                (audit, f"part-{i:05d}.parquet") if audit else None,
                clusters=(cdir, s["name"]) if cdir else None,
            )
            for i, s in enumerate(read["query_shards"])
        ]
        results = _gather(futures, "mine")

    batch_stats = None
    if staged:
        with _timed(timings, "batch"):
            batch_stats = run_batches(
                staged, data, (rdir.sub("corpus"), [c["name"] for c in read["corpus_shards"]]),
                (rdir.sub("queries"), [s["name"] for s in read["query_shards"]]), job.format, job.num_negatives,
                job.batch_size, job.seed, job.partial_batches,
            )

    rejected_input = publish_rejected(rdir, out, read)
    counts: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            if k != "seconds":
                counts[k] = counts.get(k, 0) + v
    if batch_stats:
        counts["rows_dropped_partial_batches"] = batch_stats["rows_dropped"]
        counts["rows"] = batch_stats["rows_batched"]
    samples = {k: np.concatenate([r["sample"][k] for r in results]) for k in (results[0]["sample"] if results else {})}
    timings["total"] = round(time.perf_counter() - t_start, 3)
    manifest = {
        "negprep_version": _version("negprep"),
        "created_unix": int(time.time()),
        "output": job.output,
        "format": job.format,
        "data_files": sorted(f"data/{n}" for n in data.ls(".parquet")),
        "rows": counts.get("rows", 0),
        "config": job.model_dump(mode="json") | {"storage": storage.redact_options(so)},
        "model": {
            "resolved": resolved,
            "fingerprint": pspec.fingerprint,
            "pooling": pspec.pooling,
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
        # the report is rebuilt from these: fixed-bin histograms of the samples, exact count distributions
        "histograms": histograms(samples, merge_distributions([r.get("distributions") for r in results])),
        "rejected_input_file": rejected_input,
        "stages": {"embed": embed_stats, "search": search_stats, "guide": guide_stats},
        "rejected": job.rejected,
        "clusters": cluster_stats,
        "batches": batch_stats,
        "timings_s": timings,
        "versions": {p: _version(p) for p in VERSIONED} | {"python": platform.python_version()},
    }
    manifest = storage.redact_obj(manifest)  # credentials in URLs, the job's secret values
    out.write_json("manifest.json", manifest)
    publish_docs(out, manifest)
    out.write_bytes("_SUCCESS", b"")
    out.rm(INCOMPLETE)
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
