"""The typed values the stages hand to each other (and to the manifest) through a `Run`.

Each is small: folders, shard descriptions and counts. Text and vectors stay in files that the
stages' Ray tasks read and write themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from negprep.input.shards import Shard
from negprep.models.encoders import EncoderSpec
from negprep.output.distributions import merge_distributions
from negprep.paths import File, Files, Folder


@dataclass(frozen=True)
class ReadResult:
    """The read stage's normalised inputs under `input/<key>/` (its stats.json)."""

    folder: Folder
    corpus_shards: tuple[Shard, ...]
    query_shards: tuple[Shard, ...]
    passages: int
    queries: int
    positives: int
    rows_rejected: int
    inputs: dict
    exclusions_count: int = 0  # (query, passage) pairs removed from a query's candidates: its twins' positives

    @classmethod
    def load(cls, folder: Folder) -> ReadResult:
        s = folder.read_json("stats.json")
        corpus, queries = (tuple(map(Shard.from_dict, s[k])) for k in ("corpus_shards", "query_shards"))
        return cls(folder, corpus, queries, s["passages"], s["queries"], s["positives"],
                   s.get("rows_rejected", s.get("rejected_rows")),  # a work directory of negprep <= 0.1 (old key)
                   s["inputs"], s.get("exclusions", 0))

    def stats(self) -> dict:
        """What stats.json holds."""
        return {"inputs": self.inputs, "corpus_shards": [s.to_dict() for s in self.corpus_shards],
                "query_shards": [s.to_dict() for s in self.query_shards], "passages": self.passages,
                "queries": self.queries, "positives": self.positives, "rows_rejected": self.rows_rejected,
                "exclusions": self.exclusions_count}

    @property
    def corpus(self) -> Files:
        """The corpus's text shards (id, text, text_key)."""
        return self.folder.sub("corpus").files([s.name for s in self.corpus_shards])

    @property
    def query_texts(self) -> Files:
        return self.folder.sub("queries").files([s.name for s in self.query_shards])

    @property
    def qrels(self) -> File:
        return self.folder.file("qrels.parquet")

    @property
    def exclusions(self) -> File | None:
        """Positives of same-text twin queries (query_id, doc_id), when the read stage wrote them."""
        f = self.folder.file("exclusions.parquet")
        return f if f.exists() else None

    @property
    def rejected(self) -> File:
        """The rejected input rows (schemas/rejected_input.yaml)."""
        return self.folder.file("rejected.parquet")


@dataclass(frozen=True)
class Encoded:
    """One encoder's embeddings: files named by shard digest in its cache folder."""

    spec: EncoderSpec
    folder: Folder

    def file(self, shard: Shard) -> File:
        return self.folder.file(shard.embedding)

    def files(self, shards: tuple[Shard, ...] | list[Shard]) -> Files:
        return self.folder.files([s.embedding for s in shards])


@dataclass(frozen=True)
class Embedded:
    """The embed stage's result: the corpus and the queries under the mining model."""

    passages: Encoded
    queries: Encoded
    stats: dict


@dataclass(frozen=True)
class StageOutput:
    """A stage whose result is one file per query shard, named like the shard, in `folder`."""

    folder: Folder
    stats: dict

    def file(self, shard: Shard) -> File:
        return self.folder.file(shard.name)


@dataclass
class MineResult:
    """Counts, bounded score samples and exact count distributions of mined query shards; the
    driver sums the shards' into one."""

    counts: dict[str, int] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    distributions: dict[str, list[int]] = field(default_factory=dict)
    grouped: dict[str, int] = field(default_factory=dict)  # the grouped exports' counts (negprep.output.formats)

    @classmethod
    def merge(cls, parts: list[MineResult]) -> MineResult:
        counts, grouped = _sum([p.counts for p in parts]), _sum([p.grouped for p in parts])
        keys = parts[0].samples if parts else {}
        samples = {k: np.concatenate([p.samples[k] for p in parts]) for k in keys}
        return cls(counts, samples, merge_distributions([p.distributions for p in parts]), grouped)


def _sum(parts: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            if k != "seconds":
                out[k] = out.get(k, 0) + v
    return out
