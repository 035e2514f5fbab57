"""Embed stage: text shards -> embedding shards, on a Ray Data pool of actors.

Each actor loads the model once (`__init__`) and embeds whole shards: it reads the shard's texts
from storage itself, sorts them by length so batches carry little padding, embeds each distinct
text once, and writes `embeddings/<encoder key>/<shard digest>.parquet`. The file name is a
content address (model, pooling, prompt, max_length and the shard's ids and texts), so a rerun, or
another job over the same texts, finds the file and skips the shard.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from negprep.models import Encoder, EncoderSpec
from negprep.paths import Folder
from negprep.schemas import conform

log = logging.getLogger(__name__)


class ShardEmbedder:
    """Ray Data actor: one model per actor, one shard per call."""

    def __init__(self, spec: EncoderSpec, threads: int, batch_size: int, texts: Folder, cache: Folder):
        self.encoder = Encoder(spec, threads=threads)
        self.batch_size = batch_size
        self.texts, self.cache = texts, cache

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, secs = [], []
        for src, dst in zip(batch["src"], batch["dst"], strict=True):
            t0 = time.perf_counter()
            rows.append(embed_shard(self.encoder, self.texts, str(src), self.cache, str(dst), self.batch_size))
            secs.append(time.perf_counter() - t0)
        return {"dst": batch["dst"], "rows": np.array(rows), "seconds": np.array(secs)}


def embed_shard(encoder: Encoder, texts: Folder, src: str, cache: Folder, dst: str, batch_size: int) -> int:
    """Embed the texts of Parquet shard `texts/src` (id, text) into `cache/dst` (id, embedding)."""
    table = texts.read_parquet(src, columns=["id", "text"])
    texts = table.column("text").to_pylist()
    uniq, inverse = np.unique(np.array(texts, dtype=object), return_inverse=True)
    vecs = encoder.encode(list(uniq), batch_size=batch_size)[inverse]
    dim = vecs.shape[1]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim)
    out = pa.table({"id": table.column("id"), "embedding": emb.cast(pa.list_(pa.float32()))})
    cache.write_parquet(dst, conform(out, "embeddings"))
    return table.num_rows


def run_embed(
    spec: EncoderSpec,
    texts: Folder,
    shards: list[dict],
    cache: Folder,
    cpus: int,
    cfg,
    force: bool = False,
    retries: int = 3,
) -> dict:
    """Embed every shard whose embedding file is not in `cache` yet (every shard with `force`);
    returns counts and timings.

    `cfg` is the job's EmbedConfig (or a guide's): batch size, actors and threads. A dead actor is
    restarted and its shard retried up to `retries` times.
    """
    import ray

    done = set() if force else set(cache.ls(".parquet"))
    todo = [s for s in shards if f"{s['digest']}.parquet" not in done]
    stats = {"shards": len(shards), "shards_reused": len(shards) - len(todo), "rows_embedded": 0, "seconds": 0.0}
    if not todo:
        return stats
    actors, threads = actor_layout(cpus, len(todo), cfg.actors, cfg.threads_per_actor)
    batch_size = cfg.batch_size
    # largest shards first so the last actor is not left with the longest one
    todo.sort(key=lambda s: -s["rows"])
    items = [{"src": s["name"], "dst": f"{s['digest']}.parquet"} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={
            "spec": spec,
            "threads": threads,
            "batch_size": batch_size,
            "texts": texts,
            "cache": cache,
        },
        batch_size=1,
        num_cpus=threads,
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))),
        # bounded, unlike Ray Data's default (forever): a shard that kills its worker every time fails the job
        max_restarts=retries,
        max_task_retries=retries,
    )
    t0 = time.perf_counter()
    results = ds.take_all()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["rows_embedded"] = int(sum(r["rows"] for r in results))
    return stats


def actor_layout(cpus: int, shards: int, actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, torch threads each): one actor per shard up to the CPUs, the CPUs shared among them.

    With fewer shards than CPUs the spare cores become threads, so a one-shard corpus still uses
    the whole machine.
    """
    n = actors or max(1, min(shards, cpus // (threads or 1)))
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
