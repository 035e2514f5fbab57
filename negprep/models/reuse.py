"""Embeddings reused per text, wherever it sits.

An embedding file is named by its shard's digest, so a shard whose ids or texts changed at all
(a passage inserted before it shifts every later shard) has no file. Its texts mostly have
vectors already, in the files of the shards they sat in before: every embedding file records a
hash of the exact text of each row (`text_hash`), and the encoder's folder is keyed by everything
that changes a vector (model, dtype, device type, max_length, pooling, prompt), so a text with the
same hash in the same folder has the same vector, bit for bit (the encoder's output does not depend
on the batch a text is in). Before the actors start, one task per part (`plan_reuse`) reads the
hashes of the folder's files and, for each shard to embed, finds the rows some file already holds;
only the other texts go to the actors, as a shard of their own, and `assemble` writes the shard's
file from the found rows and the new ones. The folder is a content-addressed store that any job
with the same encoder shares.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from negprep.input.shards import Shard
from negprep.models.vectors import embedding_table, table_vectors
from negprep.paths import File, Folder


def text_hashes(texts: list[str]) -> list[bytes]:
    """A 128-bit hash of each exact text: the key of its vector in an encoder's folder."""
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]


def _words(hashes: pa.Array | list[bytes]) -> np.ndarray:
    """(n, 2) uint64: each 16-byte hash as two words, without a Python object per hash."""
    arr = pa.array(hashes, pa.binary(16)) if isinstance(hashes, list) else hashes
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    words = np.frombuffer(arr.buffers()[1], dtype="<u8")
    return words[2 * arr.offset : 2 * (arr.offset + len(arr))].reshape(-1, 2)


class _Index:
    """Where each text hash sits in the embedding files `donors` of a folder (first file wins): sorted
    arrays, so 100M hashes take 2.4 GB rather than a dict of Python objects."""

    def __init__(self, folder: Folder, donors: list[str]):
        self.names, words, files, rows = [], [], [], []
        for name in donors:
            try:
                col = folder.read_parquet(name, columns=["text_hash"]).column("text_hash")
            except (KeyError, pa.ArrowInvalid):  # a file written before texts were hashed: not a donor
                continue
            if col.type != pa.binary(16):  # nor one of another hash layout
                continue
            words.append(_words(col))
            files.append(np.full(len(col), len(self.names), dtype=np.int32))
            rows.append(np.arange(len(col), dtype=np.int64))
            self.names.append(name)
        w = np.concatenate(words) if words else np.zeros((0, 2), dtype=np.uint64)
        order = np.lexsort((w[:, 1], w[:, 0]))  # by both words: equal hashes end up together, first file first
        self.words = w[order]
        self.file = np.concatenate(files)[order] if files else np.zeros(0, dtype=np.int32)
        self.row = np.concatenate(rows)[order] if rows else np.zeros(0, dtype=np.int64)

    def find(self, hashes: list[bytes]) -> np.ndarray:
        """For each hash, its position in the sorted arrays, or -1."""
        q = _words(hashes)
        n = len(self.words)
        pos = np.searchsorted(self.words[:, 0], q[:, 0], side="left")
        at = np.minimum(pos, max(n - 1, 0))
        first = (pos < n) & (self.words[at, 0] == q[:, 0]) if n else np.zeros(len(q), dtype=bool)
        hit = np.where(first & (self.words[at, 1] == q[:, 1]) if n else first, pos, -1)
        # the first word equal, the second not: another hash shares the first 64 bits (once in 2^64): walk the run
        for i in np.flatnonzero(first & (hit < 0)):
            j = pos[i]
            while j < n and self.words[j, 0] == q[i, 0]:
                if self.words[j, 1] == q[i, 1]:
                    hit[i] = j
                    break
                j += 1
        return hit


def plan_reuse(folder: Folder, donors: list[str], texts: Folder, pending: list[Shard], scratch: Folder) -> list[dict]:
    """For each shard of `pending` (text shards in `texts`) the rows the embedding files `donors` of
    `folder` already hold, as {donor file: [[its row, the shard's row], ...]}, and the rows to
    embed, written as a text shard of their own into `scratch/texts/` (Ray task)."""
    index = _Index(folder, donors)
    plans = []
    for shard in pending:
        table = texts.read_parquet(shard.name, columns=["id", "text"])
        hit = index.find(text_hashes(table.column("text").to_pylist()))
        found: dict[str, list[list[int]]] = {}
        for row in np.flatnonzero(hit >= 0):
            j = hit[row]
            found.setdefault(index.names[index.file[j]], []).append([int(index.row[j]), int(row)])
        missing = np.flatnonzero(hit < 0).tolist()
        chars = 0
        if missing and found:
            rest = table.take(pa.array(missing, pa.int64()))
            scratch.sub("texts").write_parquet(shard.embedding, rest)
            chars = int(pc.sum(pc.utf8_length(rest.column("text"))).as_py() or 0)
        plans.append({"found": found, "missing": missing, "chars": chars})
    return plans


def missing_shard(shard: Shard, plan: dict) -> Shard:
    """The text shard of `shard`'s rows to embed, as `plan_reuse` wrote it (named like the shard's
    embedding file, in the scratch folder's `texts/`; its embeddings go to `vectors/`)."""
    return Shard(shard.embedding, len(plan["missing"]), plan["chars"], shard.digest)


def assemble(src: File, dst: File, folder: Folder, plan: dict, new: File | None) -> int:
    """Write shard `src`'s embedding file `dst` from the rows other files of `folder` hold
    (`plan["found"]`) and the embeddings `new` of the rest (`plan["missing"]`, in order); returns
    the rows reused (Ray task)."""
    table = src.read_parquet(columns=["id", "text"])
    parts = [(np.array([t for _, t in pairs]), *table_vectors(folder.read_parquet(donor, columns=["id", "embedding"])),
              np.array([d for d, _ in pairs])) for donor, pairs in plan["found"].items()]
    if new is not None:
        parts.append((np.array(plan["missing"]), *table_vectors(new.read_parquet(columns=["id", "embedding"])),
                      np.arange(len(plan["missing"]))))
    dim = parts[0][2].shape[1]
    vecs = np.zeros((table.num_rows, dim), dtype=np.float32)
    filled = np.zeros(table.num_rows, dtype=bool)
    for rows, _, mat, take in parts:
        vecs[rows] = mat[take]
        filled[rows] = True
    if not filled.all():
        raise RuntimeError(f"{dst.uri}: {int((~filled).sum())} rows have no embedding after reuse")
    dst.write_parquet(embedding_table(table.column("id"), vecs, text_hashes(table.column("text").to_pylist())))
    return table.num_rows - len(plan["missing"])
