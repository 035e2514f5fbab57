"""Embed stage: text shards -> embedding shards, on a pool of Ray actors.

Each actor loads the model once and embeds whole shards: it reads the shard's texts from storage
itself, embeds each distinct text once in batches of similar length, and writes
`embeddings/<encoder key>/<shard digest>.parquet`. The file name is a content address (model,
pooling, prompt, max_length, dtype and the shard's ids and texts), so a rerun, or another job over
the same texts, finds the file and skips the shard.

Passages and queries go through one pool (one model load, one set of processes): they differ only
in their prompt. The pool is plain Ray actors driven by `ray.util.ActorPool`; a shard is a
coarse unit, so Ray Data's streaming machinery (and its helper actors' memory) buys nothing here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from negprep.models import Encoder, EncoderSpec, make_encoder
from negprep.paths import Folder
from negprep.schemas import conform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedPart:
    """Text shards (`texts`/shard names) to embed with `spec` into `cache` (one for passages, one for queries)."""

    name: str
    spec: EncoderSpec
    texts: Folder
    shards: list[dict]
    cache: Folder


class ShardEmbedder:
    """Ray actor: one model per actor, one shard per call."""

    def __init__(self, spec: EncoderSpec, threads: int, batch_size: int, batch_tokens: int | None):
        self.encoder = make_encoder(spec, threads=threads)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens

    def embed(self, texts: Folder, src: str, cache: Folder, dst: str, prompt: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        rows = embed_shard(self.encoder, texts, src, cache, dst, self.batch_size, self.batch_tokens, prompt)
        return rows, time.perf_counter() - t0


def embed_shard(encoder: Encoder, texts: Folder, src: str, cache: Folder, dst: str, batch_size: int,
                batch_tokens: int | None = None, prompt: str | None = None) -> int:
    """Embed the texts of Parquet shard `texts/src` (id, text) into `cache/dst` (id, embedding)."""
    table = texts.read_parquet(src, columns=["id", "text"])
    uniq, inverse = np.unique(np.array(table.column("text").to_pylist(), dtype=object), return_inverse=True)
    vecs = encoder.encode(list(uniq), batch_size=batch_size, batch_tokens=batch_tokens, prompt=prompt)[inverse]
    dim = vecs.shape[1]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)
    out = pa.table({"id": table.column("id"), "embedding": emb.cast(pa.list_(pa.float32()))})
    cache.write_parquet(dst, conform(out, "embeddings"))
    return table.num_rows


def run_embed(parts: list[EmbedPart], cpus: int, cfg, force: bool = False, retries: int = 3) -> dict:
    """Embed every shard of `parts` whose embedding file is not cached yet (every shard with `force`);
    returns counts and timings per part.

    The parts must share one model (their specs differ only in the prompt). `cfg` is the job's
    EmbedConfig (or a guide's): batch size, actors and threads. A dead actor is restarted and its
    shard retried up to `retries` times.
    """
    from tqdm import tqdm

    model = {replace(p.spec, prompt="") for p in parts}
    assert len(model) == 1, "one embedding pool serves one model"
    stats = {p.name: {"shards": len(p.shards), "shards_reused": 0, "rows_embedded": 0, "seconds": 0.0}
             for p in parts}
    todo = []
    for p in parts:
        done = set() if force else set(p.cache.ls(".parquet"))
        for s in p.shards:
            if f"{s['digest']}.parquet" in done:
                stats[p.name]["shards_reused"] += 1
            else:
                todo.append((p, s))
    if not todo:
        return stats
    # the most work first, so the last actor is not left with the longest shard
    todo.sort(key=lambda ps: -work(ps[1]))
    actors, threads = actor_layout(cpus, [work(s) for _, s in todo], cfg.actors, cfg.threads_per_actor)
    t0 = time.perf_counter()
    calls = map_on_actors(
        ShardEmbedder, (model.pop(), threads, cfg.batch_size, cfg.batch_tokens), actors, threads, retries,
        lambda a, ps: a.embed.remote(ps[0].texts, ps[1]["name"], ps[0].cache, f"{ps[1]['digest']}.parquet",
                                     ps[0].spec.prompt),
        todo,
    )
    for (p, _), (rows, secs) in tqdm(zip(todo, calls, strict=True), total=len(todo), desc="embed", unit="shard",
                                     leave=False):
        stats[p.name]["rows_embedded"] += int(rows)
        stats[p.name]["seconds"] = round(stats[p.name]["seconds"] + secs, 3)
    log.info("embedded %d shards in %.1f s on %d actors x %d threads", len(todo), time.perf_counter() - t0,
             actors, threads)
    return stats


def map_on_actors(cls, args: tuple, actors: int, threads: int, retries: int, call, items: list):
    """Results of `call(actor, item)` for every item, in order, on `actors` new actors of `cls(*args)`.

    Each actor reserves `threads` CPUs; a dead actor is restarted and its call retried up to
    `retries` times. The actors are killed when the last result is in, so their memory (a model)
    is back before the next stage starts.
    """
    import ray
    from ray.util import ActorPool

    remote = ray.remote(cls).options(num_cpus=threads, max_restarts=retries, max_task_retries=retries)
    pool = [remote.remote(*args) for _ in range(actors)]
    try:
        yield from ActorPool(pool).map(call, items)
    finally:
        for a in pool:
            ray.kill(a)


def work(shard: dict) -> int:
    """A shard's embedding cost estimate: its characters (rows for shards described before `chars`)."""
    return int(shard.get("chars", shard["rows"]))


def actor_layout(cpus: int, shard_work: list[int], actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, torch threads each) for shards of the given work estimates.

    As many actors as the work keeps busy: total work / the largest shard, at most one per CPU.
    The spare cores become threads, so a one-shard corpus (plus its small query shard) runs as
    one actor using the whole machine instead of two actors with one idle for most of the run.
    """
    busy = sum(shard_work) // max(1, max(shard_work, default=1))
    n = actors or max(1, min(len(shard_work), cpus // (threads or 1), busy))
    return n, threads or max(1, cpus // n)


def table_vectors(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """Ids and the (rows, dim) float32 matrix of an embeddings table (schemas/embeddings.yaml)."""
    ids = table.column("id").to_pylist()
    col = table.column("embedding").combine_chunks()
    if len(col) == 0:
        return ids, np.zeros((0, 0), dtype=np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, flat.reshape(len(col), -1)


def load_embeddings(folder: Folder, name: str) -> tuple[list[str], np.ndarray]:
    """Ids and the (n, dim) float32 matrix of one embedding shard."""
    return table_vectors(folder.read_parquet(name))
