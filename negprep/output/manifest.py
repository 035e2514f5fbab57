"""manifest.json: what a run made, from what, with which settings, and every count.

Built on the driver from the stages' typed results (negprep.results); the summary, the dataset
card and the report are rebuilt from it alone.
"""

from __future__ import annotations

import platform
import time
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np

from negprep import storage
from negprep.output.distributions import histograms

if TYPE_CHECKING:
    from negprep.stages.base import Run

VERSIONED = ("negprep", "ray", "pyarrow", "polars", "faiss-cpu", "transformers", "torch", "onnxruntime", "numpy",
             "fsspec", "s3fs")


#: keys an earlier negprep wrote, by manifest section, and what they are called now
RENAMED = {
    "counts": {"rejected_input_rows": "rows_rejected", "rows_dropped_partial_batches": "rows_left_out_partial_batches",
               "rows_dropped_batch_guard": "rows_left_out_batch_guard"},
    "batches": {"rows_dropped": "rows_left_out", "rows_dropped_by_guard": "rows_left_out_by_guard"},
}


def upgrade(manifest: dict) -> dict:
    """`manifest` with today's key names, so `negprep report` reads an older output's manifest."""
    out = dict(manifest)
    for section, names in RENAMED.items():
        if isinstance(out.get(section), dict):
            out[section] = {names.get(k, k): v for k, v in out[section].items()}
    return out


def build_manifest(run: Run, rejected_input_file: str | None) -> dict:
    """The manifest of a run whose stages have all finished (secrets masked)."""
    job, read, mine, batch = run.job, run.read, run.mine, run.batch
    pspec, qspec = run.embed.passages.spec, run.embed.queries.spec
    counts = dict(mine.counts)
    if batch:
        # the batch guard's share of the rows left out apart: the two add up to batches.rows_left_out
        guard = batch.get("rows_left_out_by_guard", 0)
        counts["rows_left_out_partial_batches"] = batch["rows_left_out"] - guard
        counts["rows_left_out_batch_guard"] = guard
        counts["rows"] = batch["rows_batched"]
    manifest = {
        "negprep_version": version("negprep"),
        "created_unix": int(time.time()),
        "output": job.output,
        "format": job.format,
        "data_files": sorted(f"data/{n}" for n in run.out.sub("data").ls(".parquet")),
        "rows": counts.get("rows", 0),
        "config": job.model_dump(mode="json") | {"storage": storage.redact_options(job.storage)},
        "model": {
            "resolved": pspec.model_dir,
            "fingerprint": pspec.fingerprint,
            "pooling": pspec.pooling,
            "device": pspec.device,
            "dtype": pspec.dtype,
            "runtime": pspec.runtime,
            # what ran it: the GPU's model, or cpu (from the actors; absent when every shard was cached)
            "hardware": sorted({p["device"] for p in run.embed.stats.values() if p.get("device")}),
            "passage_key": pspec.key(),
            "query_key": qspec.key(),
        },
        "inputs": read.inputs,
        "counts": {
            "passages": read.passages,
            "queries": read.queries,
            "positives": read.positives,
            "rows_rejected": read.rows_rejected,
            "exclusions": read.exclusions_count,
            **counts,
        },
        "scores": {k: quantiles(v) for k, v in mine.samples.items()},
        # the report is rebuilt from these: fixed-bin histograms of the samples, exact count distributions
        "histograms": histograms(mine.samples, mine.distributions),
        "rejected_input_file": rejected_input_file,
        "stages": {"embed": run.embed.stats, "search": run.search.stats,
                   "guide": run.guide.stats if run.guide else None},
        "dropped": job.dropped,
        "teacher": teacher(job),
        "exports": {name: {"path": name, "files": sorted(f"{name}/{f}" for f in run.out.sub(name).ls()),
                           **mine.grouped} for name in job.exports},
        "clusters": run.cluster.stats if run.cluster else None,
        "batches": batch,
        "timings_s": run.timings,
        "versions": {p: version(p) for p in VERSIONED} | {"python": platform.python_version()},
    }
    return storage.redact_obj(manifest)  # credentials in URLs, the job's secret values


def teacher(job) -> dict:
    """Whose scores the `scores` column and the grouped exports hold: the guide's, else the mining model's."""
    if job.guide:
        return {"role": "guide", "model": job.guide.model, "type": job.guide.type}
    return {"role": "mining", "model": job.model, "type": "biencoder"}


def quantiles(x: np.ndarray) -> dict[str, float] | None:
    if len(x) == 0:
        return None
    q = np.quantile(np.asarray(x, dtype=np.float64), [0, 0.05, 0.25, 0.5, 0.75, 0.95, 1])
    return dict(zip(("min", "p05", "p25", "p50", "p75", "p95", "max"), (round(float(v), 4) for v in q), strict=True))


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None
