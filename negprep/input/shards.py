"""Text shards: the unit of parallel work, caching and resume.

The read stage cuts the corpus and the queries into Parquet shards (schemas/corpus.yaml,
schemas/queries.yaml); a bi-encoder guide writes its own passage shards the same way. A shard is
described by a `Shard`: its name, rows, characters (the embedding work) and a digest of its
(id, text) rows, which names its embedding file, so embeddings are content-addressed.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc

from negprep.paths import Folder
from negprep.schemas import conform


@dataclass(frozen=True)
class Shard:
    """One text shard as the stages see it."""

    name: str
    rows: int
    chars: int
    digest: str

    @property
    def embedding(self) -> str:
        """The name of its embedding file in an encoder's cache folder."""
        return f"{self.digest}.parquet"

    @property
    def work(self) -> int:
        """Its embedding cost estimate: characters."""
        return self.chars

    @classmethod
    def of(cls, name: str, table: pa.Table) -> Shard:
        chars = int(pc.sum(pc.utf8_length(table.column("text"))).as_py() or 0)
        return cls(name, table.num_rows, chars, shard_digest(table))

    @classmethod
    def from_dict(cls, d: dict) -> Shard:
        # shards described before `chars` was recorded count their rows as their work
        return cls(d["name"], int(d["rows"]), int(d.get("chars", d["rows"])), d["digest"])

    def to_dict(self) -> dict:
        return asdict(self)


def text_key(text: str) -> int:
    """64-bit key of a text after case folding and whitespace collapsing: equal keys are duplicates."""
    norm = " ".join(text.casefold().split())
    return int.from_bytes(hashlib.blake2b(norm.encode(), digest_size=8).digest(), "little", signed=True)


def shard_digest(table: pa.Table) -> str:
    """Content hash of a shard's (id, text) rows: the embedding cache key of the shard.

    Hashes the values, not Arrow buffers: a slice shares its parent's buffers, so a buffer hash
    would change with rows outside the shard (and could equal another slice's).
    """
    h = hashlib.sha256()
    for col in ("id", "text"):
        for v in table.column(col).to_pylist():
            b = (v or "").encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()[:24]


def write_shards(folder: Folder, table: pa.Table, rows: int, contract: str | None = None) -> list[Shard]:
    """Cut `table` into shards of `rows` rows named 00000.parquet, ... (cast to `contract`)."""
    shards = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows)):
        part = table.slice(start, rows)
        part = (conform(part, contract) if contract else part).combine_chunks()
        if part.num_rows == 0:
            continue
        name = f"{i:05d}.parquet"
        folder.write_parquet(name, part)
        shards.append(Shard.of(name, part))
    return shards
