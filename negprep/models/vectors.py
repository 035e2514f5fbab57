"""Embedding files (schemas/embeddings.yaml): id plus a float32 vector per row.

Written by the embed stage (one file per text shard, named by the shard's digest) and by the
cluster stage (centroids); read by search, guide and cluster.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from negprep.paths import File
from negprep.schemas import conform


def embedding_table(ids: pa.Array | list[str], vecs: np.ndarray, hashes: list[bytes] | None = None) -> pa.Table:
    """An embeddings table of `ids` and the (rows, dim) matrix `vecs`; with `hashes`, the hash of
    each row's exact text (negprep.models.reuse), so later shards can reuse the vector."""
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
    cols = {"id": ids, "embedding": emb.cast(pa.list_(pa.float32()))}
    if hashes:
        cols["text_hash"] = pa.array(hashes, pa.binary(16))
    return conform(pa.table(cols), "embeddings", groups=("texts",) if hashes else ())


def table_vectors(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """Ids and the (rows, dim) float32 matrix of an embeddings table."""
    ids = table.column("id").to_pylist()
    col = table.column("embedding").combine_chunks()
    if len(col) == 0:
        return ids, np.zeros((0, 0), dtype=np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return ids, flat.reshape(len(col), -1)


def load_embeddings(file: File) -> tuple[list[str], np.ndarray]:
    """Ids and the (n, dim) float32 matrix of one embedding file."""
    return table_vectors(file.read_parquet())
