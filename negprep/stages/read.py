"""Read stage: inputs (BEIR directory, separate tables, or a pairs table) -> normalised shards.

One Ray task reads and checks every input (negprep.checks), so passage text never passes through
the driver. It writes under `input/<key>/`: `corpus/NNNNN.parquet` and `queries/NNNNN.parquet`
shards (negprep.shards; contracts in schemas/), `qrels.parquet` (positives of the split),
`rejected.parquet` (every input row not used, with its reason, line and a message;
schemas/rejected_input.yaml) and `stats.json` (per input: rows read = used + unused + rejected by
reason, and the shards), then `_SUCCESS`. The key covers the inputs' sizes and stamps and the read
settings.
"""

from __future__ import annotations

import polars as pl

from negprep.checks import normalise
from negprep.config import Job
from negprep.execution import Resources
from negprep.inputs import fingerprints, input_files
from negprep.paths import Folder, stage_key
from negprep.results import ReadResult
from negprep.schemas import conform
from negprep.shards import text_key, write_shards
from negprep.stages.base import Run, Stage
from negprep.storage import redact
from negprep.tables import load_table

FORMAT = 4  # bump when the normalised tables change shape, so old work directories are not reused


def read_key(job: Job, fps: dict[str, dict]) -> str:
    """What the normalised tables depend on: the input files (size, stamp) and the read settings."""
    spec = job.input if isinstance(job.input, str) else job.input.model_dump()
    files = {r: (f["size"], f["stamp"]) for r, f in fps.items()}
    return stage_key(FORMAT, spec, job.split, job.read.model_dump(), job.on_bad_input, files)


def read_inputs(job: Job, out: Folder, files: dict[str, str]) -> dict:
    """Read and normalise every input, write shards under `out`; returns the stats written (Ray task)."""
    tables = {role: load_table(url, job.storage) for role, url in files.items()}
    res = normalise(job, tables)
    corpus = res["corpus"].with_columns(pl.col("text").map_elements(text_key, return_dtype=pl.Int64).alias("text_key"))
    corpus_shards = write_shards(out.sub("corpus"), corpus.to_arrow(), job.read.shard_rows, "corpus")
    query_shards = write_shards(out.sub("queries"), res["queries"].to_arrow(), job.read.query_shard_rows, "queries")
    out.write_parquet("qrels.parquet", conform(res["qrels"].to_arrow(), "qrels"))
    out.write_parquet("exclusions.parquet", conform(res["exclusions"].to_arrow(), "exclusions"))
    out.write_parquet("rejected.parquet", conform(res["rejected"].to_arrow(), "rejected_input"))
    result = ReadResult(
        out, tuple(corpus_shards), tuple(query_shards), res["corpus"].height, res["queries"].height,
        res["qrels"].height, res["rejected"].height,
        {r: {**res["stats"][r], "path": redact(files[r]), "sha256": tables[r].sha256} for r in files},
        res["exclusions"].height,
    )
    out.write_json("stats.json", result.stats())
    return result.stats()


class Read(Stage):
    name = "read"

    def check(self, job: Job) -> None:
        fingerprints(input_files(job), job.storage)  # missing, unreadable or unknown-format inputs

    def resources(self, run: Run) -> dict[str, Resources]:
        # the worker exits after the task, with whatever memory parsing the inputs took
        return {"reader": Resources(cpus=1, one_call=True)}

    def run(self, run: Run, force: bool) -> None:
        job = run.job
        files = input_files(job)
        folder = run.work.sub("input", read_key(job, fingerprints(files, job.storage)))
        if force or not folder.exists("_SUCCESS"):
            folder.rm("_SUCCESS")
            run.ex.call(read_inputs, job, folder, files, res=self.resources(run)["reader"])
            folder.write_bytes("_SUCCESS", b"")
        run.read = ReadResult.load(folder)
