"""Where the search's index shards go: how big each is (`layout`), and how many run at once with
how many threads and CPUs on the CPU or on the cluster's GPUs (`placement`)."""

from __future__ import annotations

import math

import pyarrow.parquet as pq

from negprep import execution
from negprep.config import SearchConfig
from negprep.execution import Resources
from negprep.index.faiss_shard import RowSpan, bytes_per_row, plan_shards
from negprep.input.shards import Shard
from negprep.paths import File, Folder


def _dim(file: File) -> int:
    with file.folder.open(file.name) as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=1, columns=["embedding"]))
        return len(batch.column(0)[0])


def gpu_slots(gpus: float) -> int:
    """Index shards the cluster's GPUs hold at once: one per whole GPU (at least one)."""
    return max(1, int(gpus))


def layout(cfg: SearchConfig, passages: Folder, corpus_shards: tuple[Shard, ...], device: str = "cpu",
           gpus: float = 0.0) -> tuple[list[tuple[RowSpan, ...]], int]:
    """The index shards of the corpus, and the host memory (bytes) one of them needs.

    On the CPU a shard is at most `search.shard_mb`. On CUDA its float16 vectors are at most
    `search.gpu_shard_mb` of GPU memory, and the corpus is spread over all the cluster's GPUs (one
    shard per GPU when it fits); its host memory is the float32 copy and the ids."""
    files = [(s.embedding, s.rows) for s in corpus_shards if s.rows]
    dim = _dim(passages.file(files[0][0])) if files else 0
    per_row = bytes_per_row(dim, cfg)
    if device == "cuda":
        total = sum(rows for _, rows in files)
        rows = min(int(cfg.gpu_shard_mb * 2**20) // max(1, 2 * dim), math.ceil(total / gpu_slots(gpus)))
    else:
        rows = int(cfg.shard_mb * 2**20) // per_row
    shards = plan_shards(files, max(1, rows))
    return shards, max((sum(p.stop - p.start for p in s) for s in shards), default=0) * per_row


def gpu_shard_cpus(nodes: list[tuple[float, float, float]], need: int, size: int,
                   threads: int = 0) -> tuple[int, float]:
    """On CUDA: (threads, CPUs asked of Ray) of each index shard actor, given the GPU nodes'
    (CPUs, GPUs, memory for tasks) and `size` index shards at once.

    A node holds at most min(its GPUs, its memory / `need`, `size`) of them; Ray picks the node, so
    each actor asks at most the smallest share of a node's CPUs among those shards (whole CPUs
    when it is one or more), and the actors of a group are never left waiting for CPUs. Its
    threads (the exact rescoring's) are `threads` (`search.threads`) when set, else that share, at
    least 1. Nodes without CPUs hold none (`gpu_fit`)."""
    shares = [cpus / min(slots, max(1, size)) for cpus, gpus, mem in nodes
              if cpus > 0 and (slots := min(int(gpus), int(mem // max(need, 1)))) > 0]
    share = min(shares, default=1.0)
    threads = threads or max(1, int(share))
    ask = float(min(threads, int(share))) if share >= 1 else max(math.floor(share * 1e4) / 1e4, 1e-4)
    return threads, ask


def gpu_fit(nodes: list[tuple[float, float, float]], need: int) -> int:
    """Index shard actors the GPU nodes (CPUs, GPUs, memory for tasks) hold at once: one per GPU
    within each node's memory, on nodes with CPUs (the actors ask for some)."""
    return sum(min(int(g), int(mem // max(need, 1))) for c, g, mem in nodes if c > 0)


def placement(cfg: SearchConfig, shards: int, need: int, device: str = "cpu") -> tuple[int, int, float]:
    """(index shards at once, 0 when none fits; threads per index shard; CPUs each asks of Ray).

    On the CPU the shards that fit the nodes' memory run at once, each asking a token CPU, with
    faiss's (and the rescoring's) threads `search.threads`, else the cluster's CPUs divided among
    them (at most a node's). On CUDA one per GPU within the GPU nodes' memory, with the CPUs and
    threads of `gpu_shard_cpus`."""
    if device == "cuda":  # GPU actors land on GPU nodes only: at most one per GPU, and their host memory there
        gnodes = execution.gpu_node_cpus()
        fit = gpu_fit(gnodes, need)
        threads, cpus = gpu_shard_cpus(gnodes, need, min(shards, fit) or 1, cfg.threads)
        return fit and min(shards, fit), threads, cpus
    nodes = execution.nodes()
    fit = sum(int(mem // max(need, 1)) for _, mem in nodes)
    size = min(shards, fit) or 1
    total = sum(c for c, _ in nodes)
    threads = cfg.threads or max(1, min(int(max((c for c, _ in nodes), default=1)), int(total // size)))
    return fit and min(shards, fit), threads, 0.01


def search_resources(need: int, gpus: float = 0.0, cpus: float = 0.01) -> dict[str, Resources]:
    return {
        # memory is reserved by Ray's scheduler, so a shard never lands on a node too small for
        # it; on the CPU a token CPU keeps actors off CPU-less nodes (a head started with
        # --num-cpus=0) and faiss's threads take what the node has. On CUDA each index shard actor
        # holds one GPU (Ray sets CUDA_VISIBLE_DEVICES to it) and the CPUs of its exact rescoring
        # (`gpu_shard_cpus`), so nothing else Ray schedules there competes with them
        "index_shard": Resources(cpus=cpus, gpus=gpus, memory=max(need, 1), spread=True),
        "coordinator": Resources(cpus=0),  # mostly waits on the index shards
        "merge": Resources(cpus=1),
    }
