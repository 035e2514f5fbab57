"""Batch step: the mined rows of all query shards -> data files in training-batch order.

A global step after mine (TAS-Balanced). The mine tasks write their files to a staging folder in
the work directory; then one Ray task reads only the id and cluster columns of every staged file,
looks up a key of each text (the corpus's `text_key`, a hash of the normalised query text), and
composes the batch plan (`negprep.batches.compose`): integers only, handed to the next tasks
through the object store. One Ray task per output file then takes its rows from the staged files,
adds `batch_id` and writes `data/train-*.parquet`; each output file holds whole batches, in order.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from negprep import batches
from negprep.paths import Folder
from negprep.schemas import conform, spec
from negprep.stages.read import text_key


def passage_id_columns(fmt: str, n: int) -> list[str]:
    """The passage id columns of an output row: the positive, then the negative(s)."""
    return ["positive_id", "negative_id"] if fmt == "triplet" else ["positive_id"] + [
        f"negative_{i}_id" for i in range(1, n + 1)
    ]


def row_keys(
    staged: tuple[Folder, list[str]],
    corpus: tuple[Folder, list[str]],
    queries: tuple[Folder, list[str]],
    id_columns: list[str],
) -> dict[str, np.ndarray]:
    """Per staged row, in file order: file, row in file, cluster, query key and passage keys (n, m)."""
    tables = [staged[0].read_parquet(name, columns=["query_id", "cluster_id", *id_columns]) for name in staged[1]]
    t = pa.concat_tables(tables)
    pids = {d for c in id_columns for d in pc.unique(t.column(c)).to_pylist()}
    pkey = corpus[0].lookup(corpus[1], pids, "text_key")
    qtext = queries[0].lookup(queries[1], set(pc.unique(t.column("query_id")).to_pylist()), "text")
    qkey = {q: text_key(s) for q, s in qtext.items()}
    texts = np.array([[pkey[d] for d in t.column(c).to_pylist()] for c in id_columns], dtype=np.int64)
    return {
        "file": np.repeat(np.arange(len(tables), dtype=np.int32), [x.num_rows for x in tables]),
        "row": np.concatenate([np.arange(x.num_rows, dtype=np.int64) for x in tables]),
        "cluster": np.asarray(t.column("cluster_id").to_numpy(zero_copy_only=False), dtype=np.int64),
        "query": np.array([qkey[q] for q in t.column("query_id").to_pylist()], dtype=np.int64),
        "texts": texts.T.reshape(t.num_rows, len(id_columns)),
    }


def compose_plan(
    staged: tuple[Folder, list[str]],
    corpus: tuple[Folder, list[str]],
    queries: tuple[Folder, list[str]],
    id_columns: list[str],
    batch_size: int,
    seed: int,
    partial: str,
    files: int,
) -> tuple[dict, dict[str, np.ndarray]]:
    """(stats, plan): the batch plan of all staged rows, cut into at most `files` output files."""
    t0 = time.perf_counter()
    k = row_keys(staged, corpus, queries, id_columns)
    plan = batches.compose(k["cluster"], k["query"], k["texts"], batch_size, seed, partial)
    sizes = np.bincount(plan.batch_id, minlength=len(plan.mixed))
    cuts = batches.split_files(sizes, max(1, min(files, len(sizes))))
    stats = {
        **plan.counts,
        "batch_size": batch_size,
        "partial_batches": partial,
        "files": len(cuts) - 1,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out = {"file": k["file"][plan.order], "row": k["row"][plan.order], "batch_id": plan.batch_id, "cuts": cuts}
    return stats, out


def _groups(table: pa.Table, fmt: str) -> tuple[str, ...]:
    """The optional field groups of contract `fmt` that `table` carries (guide scores, clusters, ...)."""
    have = set(table.column_names)
    found = []
    for f in spec(fmt)["fields"]:
        g = f.get("group")
        if g and g not in found and (f["name"] in have or ("{i}" in f["name"] and f["name"].format(i=1) in have)):
            found.append(g)
    return tuple(found)


def write_part(
    staged: tuple[Folder, list[str]],
    plan: dict[str, np.ndarray],
    part: int,
    dst: tuple[Folder, str],
    fmt: str,
    n: int,
) -> int:
    """Write output file `part` of the plan: its rows taken from the staged files, plus batch_id."""
    a, b = int(plan["cuts"][part]), int(plan["cuts"][part + 1])
    src, rows = plan["file"][a:b], plan["row"][a:b]
    pieces, where = [], []
    for f in np.unique(src):
        mask = src == f
        pieces.append(staged[0].read_parquet(staged[1][f]).take(pa.array(rows[mask])))
        where.append(np.flatnonzero(mask))
    if pieces:
        table = pa.concat_tables(pieces).take(pa.array(np.argsort(np.concatenate(where), kind="stable")))
    else:
        table = staged[0].read_parquet(staged[1][0]).slice(0, 0)
    table = table.append_column("batch_id", pa.array(plan["batch_id"][a:b], pa.int32()))
    groups = tuple(g for g in _groups(table, fmt) if g != "batches") + ("batches",)
    dst[0].write_parquet(dst[1], conform(table, fmt, n=n, where=dst[0].uri(dst[1]), groups=groups))
    return table.num_rows


def run_batches(
    staged: Folder,
    data: Folder,
    corpus: tuple[Folder, list[str]],
    queries: tuple[Folder, list[str]],
    fmt: str,
    n: int,
    batch_size: int,
    seed: int,
    partial: str,
) -> dict:
    """Compose batches over every staged file, write the output data files, remove the staging folder.

    Returns the batch stats for the manifest (rows, batches, rows merged or dropped, ...).
    """
    import ray

    names = staged.ls(".parquet")
    if not names:
        raise RuntimeError(f"{staged.url}: no mined files to compose batches from")
    compose = ray.remote(compose_plan).options(num_cpus=1, num_returns=2, max_retries=2)
    stats_ref, plan_ref = compose.remote(
        (staged, names), corpus, queries, passage_id_columns(fmt, n), batch_size, seed, partial, len(names)
    )
    stats = ray.get(stats_ref)
    parts = stats["files"]
    task = ray.remote(write_part).options(num_cpus=1, max_retries=3)
    written = ray.get(
        [task.remote((staged, names), plan_ref, i, (data, f"train-{i:05d}-of-{parts:05d}.parquet"), fmt, n)
         for i in range(parts)]
    )
    if sum(written) != stats["rows_batched"]:
        raise RuntimeError(f"batch step wrote {sum(written)} rows, planned {stats['rows_batched']}")
    staged.rm("", recursive=True)
    return stats
