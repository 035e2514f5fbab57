"""Text shards -> embedding files, on a pool of Ray actors (the embed stage's and a bi-encoder guide's).

Each actor loads the model once and embeds whole shards: it reads the shard's texts from storage
itself, embeds each distinct text once in batches of similar length, and writes
`<encoder key>/<shard digest>.parquet`. The file name is a content address (model, pooling,
prompt, max_length, dtype and the shard's ids and texts), so a rerun, or another job over the same
texts, finds the file and skips the shard.

Passages and queries go through one pool (one model load, one set of processes): they differ only
in their prompt. On the CPU an actor tokenises its shard itself. On CUDA the actors ask Ray for
GPUs (`embed.gpus_per_actor`) and no CPU, so they land on GPU nodes, and CPU tasks tokenise each
shard in pieces of 256 to 2,048 rows (`models.piece_bounds`, `Executor.stream`):
tokenising is the slower half for a small model, so two pieces per CPU of the cluster are in
flight, and an actor embeds a shard's first piece while the rest are still being tokenised
(`Encoder.encode_pieces`).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from negprep.config import EmbedConfig
from negprep.errors import NegprepError
from negprep.execution import Executor, Resources, assigned_gpus, each, node_id
from negprep.input.shards import Shard
from negprep.models.devices import cuda_on_cpu
from negprep.models.encoders import GPU_BATCH_SIZE, GPU_BATCH_TOKENS, Encoder, EncoderSpec, make_encoder
from negprep.models.reuse import assemble, missing_shard, plan_reuse, text_hashes
from negprep.models.tokens import piece_bounds, text_tokenizer, tokenize_piece
from negprep.models.vectors import embedding_table
from negprep.paths import File, Folder
from negprep.results import Encoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedPart:
    """Text shards in `texts` to embed into `encoded` (its spec and cache folder); `name` labels its stats."""

    name: str
    texts: Folder
    shards: tuple[Shard, ...]
    encoded: Encoded



def batching(cfg: EmbedConfig, device: str) -> tuple[int, int | None]:
    """(batch_size, batch_tokens) of an encoder on `device`: the job's, or a GPU's defaults."""
    if device != "cuda":
        return cfg.batch_size, cfg.batch_tokens
    given = cfg.model_fields_set
    return (cfg.batch_size if "batch_size" in given else GPU_BATCH_SIZE,
            cfg.batch_tokens if "batch_tokens" in given else GPU_BATCH_TOKENS)


class ShardEmbedder:
    """Ray actor: one model per actor, one shard per call."""

    def __init__(self, spec: EncoderSpec, threads: int, batch_size: int, batch_tokens: int | None):
        if spec.device == "cuda" and not cuda_on_cpu() and not assigned_gpus():
            raise NegprepError("an embedding actor on cuda got no GPU from Ray")
        self.encoder = make_encoder(spec, threads=threads)
        self.batch_size, self.batch_tokens = batch_size, batch_tokens

    def embed(self, src: File, dst: File, prompt: str) -> dict:
        t0 = time.perf_counter()
        rows = embed_shard(self.encoder, src, dst, self.batch_size, self.batch_tokens, prompt)
        return self._done(rows, t0)

    def embed_pieces(self, src: File, dst: File, rows: int, pieces: list) -> dict:
        """Embed shard `src` (`rows` rows) into `dst` from the futures of its tokenised pieces
        (`tokenize_rows`, in row order), each taken as soon as it is ready."""
        t0 = time.perf_counter()
        vecs = self.encoder.encode_pieces(each(pieces), rows, self.batch_size, self.batch_tokens)
        table = src.read_parquet(columns=["id", "text"])
        dst.write_parquet(embedding_table(table.column("id"), vecs, text_hashes(table.column("text").to_pylist())))
        return self._done(rows, t0)

    def _done(self, rows: int, t0: float) -> dict:
        return {"rows": rows, "seconds": time.perf_counter() - t0, "device": self.encoder.device_name,
                "node": node_id()}


def tokenize_rows(spec: EncoderSpec, src: File, start: int, stop: int, prompt: str) -> dict:
    """Rows [start, stop) of text shard `src`, tokenised for `Encoder.encode_pieces` (a CPU task
    feeding GPU actors; the tokenizer loads from tokenizer.json in milliseconds, once per worker)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the task holds one CPU: the tokenizer's threads would crowd it
    texts = src.read_parquet(columns=["text"]).column("text").slice(start, stop - start).to_pylist()
    return tokenize_piece(text_tokenizer(spec.model_dir, spec.max_length, spec.trust_remote_code),
                          [prompt + t for t in texts])


def embed_shard(encoder: Encoder, src: File, dst: File, batch_size: int, batch_tokens: int | None = None,
                prompt: str | None = None) -> int:
    """Embed the texts of Parquet shard `src` (id, text) into `dst` (id, embedding)."""
    table = src.read_parquet(columns=["id", "text"])
    uniq, inverse = np.unique(np.array(table.column("text").to_pylist(), dtype=object), return_inverse=True)
    vecs = encoder.encode(list(uniq), batch_size=batch_size, batch_tokens=batch_tokens, prompt=prompt)[inverse]
    dst.write_parquet(embedding_table(table.column("id"), vecs, text_hashes(table.column("text").to_pylist())))
    return table.num_rows


# a CPU task tokenising one piece of a shard for a CUDA actor
TOKENIZER = Resources(cpus=1)


def actor_layout(cpus: int, shard_work: list[int], actors: int | None, threads: int | None) -> tuple[int, int]:
    """(actors, torch threads each) for shards of the given work estimates.

    As many actors as the work keeps busy: total work / the largest shard, at most one per CPU.
    The spare cores become threads, so a one-shard corpus (plus its small query shard) runs as
    one actor using the whole machine instead of two actors with one idle for most of the run.
    """
    busy = sum(shard_work) // max(1, max(shard_work, default=1))
    n = actors or max(1, min(len(shard_work), cpus // (threads or 1), busy))
    return n, threads or max(1, cpus // n)


def cuda_actors(gpus: float, gpus_per_actor: float, work_items: int, wanted: int | None = None) -> int:
    """How many GPU actors a pool starts (embedders, cross-encoders): no more than the cluster's
    GPUs hold at `gpus_per_actor` each (one more would wait for a GPU forever), nor than there is
    work for, nor than the job asks for (`actors`); at least one."""
    return max(1, min(wanted or work_items, work_items, int(gpus / gpus_per_actor)))


def embedder(threads: int, gpus: float = 0.0) -> Resources:
    """What one model actor asks for: a CPU per torch thread; on CUDA its GPUs and no CPU: its
    host work (padding batches, queueing copies) is small next to the tokenising tasks', which get
    every CPU of the node."""
    return Resources(cpus=0, gpus=gpus) if gpus else Resources(cpus=threads)


def actor_pool(work: list[int], cfg: EmbedConfig, device: str, cpus: int, gpus: float) -> Resources:
    """The one place where a cluster's CPUs and GPUs become a pool of model actors (the embed
    stage's, a guide's): how many actors, and what each asks Ray for, for items of the given work
    estimates under an EmbedConfig-like `cfg` (`actors`, `threads_per_actor`, `gpus_per_actor`).
    A stage declares this as its resources and hands the same value to the pool that runs."""
    if device == "cuda":
        return replace(embedder(1, cfg.gpus_per_actor),
                       actors=cuda_actors(gpus, cfg.gpus_per_actor, len(work), cfg.actors))
    n, threads = actor_layout(cpus, work, cfg.actors, cfg.threads_per_actor)
    return replace(embedder(threads), actors=n)


def threads_of(pool: Resources) -> int:
    """Torch threads of one actor of `pool`: its CPUs (a CUDA actor asks for none and runs one)."""
    return max(1, int(pool.cpus))


def _todo(parts: list[EmbedPart], force: bool) -> tuple[dict, list[tuple[EmbedPart, Shard]]]:
    """(stats per part with the shards reused, the (part, shard) pairs to embed: the most work first,
    so the last actor is not left with the longest shard)."""
    stats = {p.name: {"shards": len(p.shards), "shards_reused": 0, "rows_embedded": 0, "rows_reused": 0,
                      "seconds": 0.0} for p in parts}
    todo = []
    for p in parts:
        done = set() if force else set(p.encoded.folder.ls(".parquet"))
        for s in p.shards:
            if s.embedding in done:
                stats[p.name]["shards_reused"] += 1
            else:
                todo.append((p, s))
    return stats, sorted(todo, key=lambda ps: -ps[1].work)


def embed_parts(ex: Executor, cpus: int, parts: list[EmbedPart], cfg: EmbedConfig, pool: Resources,
                force: bool = False) -> dict:
    """Embed every shard of `parts` whose embedding file is not there yet (every shard with `force`)
    on the actors of `pool` (`actor_pool`, as the stage declared it; no more actors than shards to
    do); returns counts, timings and the device per part.

    The parts must share one model (their specs differ only in the prompt, and their device).
    `cfg` is the job's EmbedConfig (or its guide's), for the batch size; `cpus` the cluster's, for
    how many tokenising pieces are in flight on CUDA.
    """
    model = {replace(p.encoded.spec, prompt="") for p in parts}
    assert len(model) == 1, "one embedding pool serves one model"
    stats, todo = _todo(parts, force)
    if not todo:
        return stats
    todo, assembly = (todo, []) if force else _reuse(ex, todo)
    if todo:
        _embed(ex, cpus, model.pop(), todo, cfg, pool, stats)
    if assembly:
        calls = [(p.texts.file(s.name), p.encoded.file(s), p.encoded.folder, plan, new) for p, s, plan, new in assembly]
        for (p, *_), reused in zip(assembly, ex.map(assemble, calls, REUSE, desc="embed: reuse"), strict=True):
            stats[p.name]["rows_reused"] += reused
        for p in {p.name: p for p, *_ in assembly}.values():
            _scratch(p).rm("", recursive=True)
    return stats


# a task that reads embedding files' hashes or vectors for reuse: one CPU, whatever memory they take
REUSE = Resources(cpus=1, one_call=True)


def _scratch(part: EmbedPart) -> Folder:
    """Where a part's texts to embed and their vectors wait between `plan_reuse` and `assemble`."""
    return part.encoded.folder.sub("reuse")


def _reuse(ex: Executor, todo: list[tuple[EmbedPart, Shard]]) -> tuple[list, list]:
    """(the (part, shard) pairs the actors embed, the shards to assemble): a shard whose texts some
    embedding file of its encoder already holds is embedded only for the rest (`plan_reuse`), as a
    text shard of its own, then assembled; one with none of them is embedded whole."""
    parts: dict[str, tuple[EmbedPart, list[Shard], list[str]]] = {}
    for p, s in todo:
        parts.setdefault(p.name, (p, [], sorted(p.encoded.folder.ls(".parquet"))))[1].append(s)
    asked = [(p, shards) for p, shards, donors in parts.values() if donors]
    calls = [(p.encoded.folder, parts[p.name][2], p.texts, shards, _scratch(p)) for p, shards in asked]
    done = ex.map(plan_reuse, calls, REUSE, desc="embed: plan reuse") if calls else []
    plans = dict(zip([p.name for p, _ in asked], done, strict=True))
    out, assembly = [], []
    for p, shards, _ in parts.values():
        for s, plan in zip(shards, plans.get(p.name, [{"found": {}}] * len(shards)), strict=True):
            if not plan["found"]:
                out.append((p, s))
                continue
            new = None
            if plan["missing"]:
                scratch = _scratch(p)
                rest = EmbedPart(p.name, scratch.sub("texts"), (), Encoded(p.encoded.spec, scratch.sub("vectors")))
                out.append((rest, missing_shard(s, plan)))
                new = rest.encoded.file(out[-1][1])
            assembly.append((p, s, plan, new))
    return sorted(out, key=lambda ps: -ps[1].work), assembly


def _embed(ex: Executor, cpus: int, spec: EncoderSpec, todo: list[tuple[EmbedPart, Shard]], cfg: EmbedConfig,
           pool: Resources, stats: dict) -> None:
    """Embed the text shards `todo` on the actors of `pool`; their counts and times into `stats`."""
    batch_size, batch_tokens = batching(cfg, spec.device)
    t0 = time.perf_counter()
    actors, threads = min(pool.actors, len(todo)), threads_of(pool)
    if spec.device == "cuda":

        def pieces(item: tuple[EmbedPart, Shard]) -> list[tuple]:
            part, shard = item
            src = part.texts.file(shard.name)
            return [(part.encoded.spec, src, a, b, part.encoded.spec.prompt) for a, b in piece_bounds(shard.rows)]

        def feed(actor, item: tuple[EmbedPart, Shard], futures: list):
            part, shard = item
            return actor.embed_pieces.remote(part.texts.file(shard.name), part.encoded.file(shard), shard.rows,
                                             futures)

        # tokenising is sized by the cluster's CPUs: two pieces per CPU in flight keeps them all busy
        results = ex.stream(tokenize_rows, TOKENIZER, ShardEmbedder, (spec, threads, batch_size, batch_tokens),
                            actors, pool, pieces, feed, todo, ahead=2 * cpus,
                            desc="embed")
    else:
        def call(actor, item: tuple[EmbedPart, Shard]):
            part, shard = item
            return actor.embed.remote(part.texts.file(shard.name), part.encoded.file(shard), part.encoded.spec.prompt)

        results = ex.map_actors(ShardEmbedder, (spec, threads, batch_size, batch_tokens), actors, pool, call, todo,
                                desc="embed")
    for (p, _), r in zip(todo, results, strict=True):
        s = stats[p.name]
        s["rows_embedded"] += int(r["rows"])
        s["seconds"] = round(s["seconds"] + r["seconds"], 3)
        s["device"] = r["device"]
        s["nodes"] = sorted({*s.get("nodes", []), r["node"]})
    log.info("embedded %d shards in %.1f s on %d actors x %d threads (%s)", len(todo), time.perf_counter() - t0,
             actors, threads, spec.device)


def ensure_exports(encoded: list[Encoded], force: bool = False) -> float | None:
    """Export the model of each onnxruntime encoder into its export folder unless a previous run
    did (negprep.models.onnx; a child process, so no torch stays in the driver); the seconds it took,
    None when no model runs on onnxruntime."""
    from negprep.models.onnx import ensure_exported

    seconds = None
    for spec in {e.spec.export.url: e.spec for e in encoded if e.spec.runtime == "onnxruntime"}.values():
        t0 = time.perf_counter()
        if force:
            spec.export.rm("_SUCCESS")
        if ensure_exported(spec, spec.export):
            log.info("exported %s (%s) for onnxruntime in %.1f s", spec.model_dir, spec.dtype, time.perf_counter() - t0)
        seconds = (seconds or 0.0) + time.perf_counter() - t0
    return None if seconds is None else round(seconds, 3)
