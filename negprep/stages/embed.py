"""Embed stage: the corpus and query shards -> embedding files, on a pool of Ray actors.

The mining model embeds every text shard of the read stage (negprep.models.pool) into
`embeddings/<encoder key>/<shard digest>.parquet`: content-addressed, so a rerun, or another job
over the same texts with the same model and settings, reuses them. With `embed.runtime:
onnxruntime` the model is first exported to ONNX once into `models/<key>/` (negprep.models.onnx).
On CUDA (`embed.device`) the actors hold GPUs and CPU tasks tokenise for them.
"""

from __future__ import annotations

from negprep.config import Job
from negprep.execution import Resources
from negprep.models.encoders import encoder_specs
from negprep.models.pool import TOKENIZER, EmbedPart, actor_pool, embed_parts, ensure_exports
from negprep.models.resolve import check_compiler, resolve_model
from negprep.results import Embedded, Encoded
from negprep.stages.base import Run, Stage


def encoders(run: Run, model: str, cfg, device: str) -> tuple[Encoded, Encoded]:
    """(passage, query) encoders of `model` under an EmbedConfig-like `cfg` on a resolved `device`,
    with their cache folders."""
    pspec, qspec = encoder_specs(resolve_model(model), cfg, run.work, device)
    return (Encoded(pspec, run.work.sub("embeddings", pspec.key())),
            Encoded(qspec, run.work.sub("embeddings", qspec.key())))


class Embed(Stage):
    name = "embed"

    def check(self, job: Job) -> None:
        resolve_model(job.model)  # a misspelt model is one line now, not a traceback in an actor
        if job.embed.compile:
            check_compiler("embed.compile")

    def resources(self, run: Run) -> dict[str, Resources]:
        # sized on every shard, done or not, so a resumed run asks for what the first one did
        device = run.devices.get("embed", "cpu")
        work = [s.work for s in (*run.read.corpus_shards, *run.read.query_shards)]
        pool = {"embedder": actor_pool(work, run.job.embed, device, run.cpus, run.gpus)}
        return pool | ({"tokenizer": TOKENIZER} if device == "cuda" else {})

    def run(self, run: Run, force: bool) -> None:
        passages, queries = encoders(run, run.job.model, run.job.embed, run.devices.get("embed", "cpu"))
        if (seconds := ensure_exports([passages], force)) is not None:
            run.timings["export"] = seconds
        parts = [EmbedPart("corpus", run.read.corpus.folder, run.read.corpus_shards, passages),
                 EmbedPart("queries", run.read.query_texts.folder, run.read.query_shards, queries)]
        stats = embed_parts(run.ex, run.cpus, parts, run.job.embed, self.resources(run)["embedder"], force)
        run.embed = Embedded(passages, queries, stats)
