"""Text shards -> embedding files, on a pool of Ray actors (the embed stage's and a bi-encoder guide's).

Each actor loads the model once and embeds whole shards: it reads the shard's texts from storage
itself, embeds each distinct text once in batches of similar length, and writes
`<encoder key>/<shard digest>.parquet`. The file name is a content address (model, pooling,
prompt, max_length, dtype and the shard's ids and texts), so a rerun, or another job over the same
texts, finds the file and skips the shard.

Passages and queries go through one pool (one model load, one set of processes): they differ only
in their prompt. A shard is a coarse unit, so Ray Data's streaming machinery (and its helper
actors' memory) buys nothing here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from negprep.config import EmbedConfig
from negprep.embeddings import embedding_table
from negprep.execution import Executor, Resources
from negprep.models import Encoder, make_encoder
from negprep.paths import File, Folder
from negprep.results import Encoded
from negprep.shards import Shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedPart:
    """Text shards in `texts` to embed into `encoded` (its spec and cache folder); `name` labels its stats."""

    name: str
    texts: Folder
    shards: tuple[Shard, ...]
    encoded: Encoded


class ShardEmbedder:
    """Ray actor: one model per actor, one shard per call."""

    def __init__(self, spec, threads: int, batch_size: int, batch_tokens: int | None):
        self.encoder = make_encoder(spec, threads=threads)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens

    def embed(self, src: File, dst: File, prompt: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        rows = embed_shard(self.encoder, src, dst, self.batch_size, self.batch_tokens, prompt)
        return rows, time.perf_counter() - t0


def embed_shard(encoder: Encoder, src: File, dst: File, batch_size: int, batch_tokens: int | None = None,
                prompt: str | None = None) -> int:
    """Embed the texts of Parquet shard `src` (id, text) into `dst` (id, embedding)."""
    table = src.read_parquet(columns=["id", "text"])
    uniq, inverse = np.unique(np.array(table.column("text").to_pylist(), dtype=object), return_inverse=True)
    vecs = encoder.encode(list(uniq), batch_size=batch_size, batch_tokens=batch_tokens, prompt=prompt)[inverse]
    dst.write_parquet(embedding_table(table.column("id"), vecs))
    return table.num_rows


def actor_layout(cpus: int, shard_work: list[int], actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, torch threads each) for shards of the given work estimates.

    As many actors as the work keeps busy: total work / the largest shard, at most one per CPU.
    The spare cores become threads, so a one-shard corpus (plus its small query shard) runs as
    one actor using the whole machine instead of two actors with one idle for most of the run.
    """
    busy = sum(shard_work) // max(1, max(shard_work, default=1))
    n = actors or max(1, min(len(shard_work), cpus // (threads or 1), busy))
    return n, threads or max(1, cpus // n)


def embedder(threads: int) -> Resources:
    """What one embedding actor asks for: a CPU per torch thread."""
    return Resources(cpus=threads)


def embed_parts(ex: Executor, cpus: int, parts: list[EmbedPart], cfg: EmbedConfig, force: bool = False) -> dict:
    """Embed every shard of `parts` whose embedding file is not there yet (every shard with `force`);
    returns counts and timings per part.

    The parts must share one model (their specs differ only in the prompt). `cfg` is the job's
    EmbedConfig (or its guide's): batch size, actors and threads.
    """
    model = {replace(p.encoded.spec, prompt="") for p in parts}
    assert len(model) == 1, "one embedding pool serves one model"
    stats = {p.name: {"shards": len(p.shards), "shards_reused": 0, "rows_embedded": 0, "seconds": 0.0}
             for p in parts}
    todo = []
    for p in parts:
        done = set() if force else set(p.encoded.folder.ls(".parquet"))
        for s in p.shards:
            if s.embedding in done:
                stats[p.name]["shards_reused"] += 1
            else:
                todo.append((p, s))
    if not todo:
        return stats
    # the most work first, so the last actor is not left with the longest shard
    todo.sort(key=lambda ps: -ps[1].work)
    actors, threads = actor_layout(cpus, [s.work for _, s in todo], cfg.actors, cfg.threads_per_actor)
    t0 = time.perf_counter()
    def call(actor, item: tuple[EmbedPart, Shard]):
        part, shard = item
        return actor.embed.remote(part.texts.file(shard.name), part.encoded.file(shard), part.encoded.spec.prompt)

    args = (model.pop(), threads, cfg.batch_size, cfg.batch_tokens)
    results = ex.map_actors(ShardEmbedder, args, actors, embedder(threads), call, todo, desc="embed")
    for (p, _), (rows, secs) in zip(todo, results, strict=True):
        stats[p.name]["rows_embedded"] += int(rows)
        stats[p.name]["seconds"] = round(stats[p.name]["seconds"] + secs, 3)
    log.info("embedded %d shards in %.1f s on %d actors x %d threads", len(todo), time.perf_counter() - t0,
             actors, threads)
    return stats


def ensure_exports(encoded: list[Encoded], force: bool = False) -> float | None:
    """Export the model of each onnxruntime encoder into its export folder unless a previous run
    did (negprep.export; a child process, so no torch stays in the driver); the seconds it took,
    None when no model runs on onnxruntime."""
    from negprep.export import ensure_exported

    seconds = None
    for spec in {e.spec.export.url: e.spec for e in encoded if e.spec.runtime == "onnxruntime"}.values():
        t0 = time.perf_counter()
        if force:
            spec.export.rm("_SUCCESS")
        if ensure_exported(spec, spec.export):
            log.info("exported %s (%s) for onnxruntime in %.1f s", spec.model_dir, spec.dtype, time.perf_counter() - t0)
        seconds = (seconds or 0.0) + time.perf_counter() - t0
    return None if seconds is None else round(seconds, 3)
