"""Read stage: inputs (BEIR directory, separate tables, or a pairs table) -> normalised shards.

Every input file is cut into pieces (negprep.input.pieces) that Ray tasks read and check at once, each
holding one piece, so worker memory depends on `read.piece_mb`, not on the file. The checks are
negprep.input.checks', applied in steps that see only what they need:

1. `count`: newlines per byte range of a split text file, so every piece knows its first line;
2. `check`: each piece through the per-row checks; a corpus piece writes its ids by bucket
   (a hash of the id), a qrels piece the passage ids it names;
3. `resolve_bucket`: per bucket, duplicate passage ids across all pieces (the first in file order is
   kept, whichever piece finished first) and the status of the ids qrels name;
4. `shards`: the kept passages cut into shards of `read.shard_rows`, in file order, so shards and
   their digests (the embedding cache key) do not depend on how the file was cut;
5. `link`: queries and qrels (duplicates, references, positives), the accounting and strict policy,
   in one task: it holds the queries and qrels, never the corpus.

It writes under `input/<key>/`: `corpus/NNNNN.parquet` and `queries/NNNNN.parquet` shards
(negprep.input.shards; contracts in schemas/), `qrels.parquet` (positives of the split),
`exclusions.parquet`, `rejected.parquet` (every input row not used, with its reason, line and a
message; schemas/rejected_input.yaml) and `stats.json` (per input: rows read = used + unused +
rejected by reason, and the shards), then `_SUCCESS`. Each piece's results are kept under
`pieces/`, so a killed read resumes from its finished pieces. A pairs table is read whole, in one
task. The key covers the inputs' sizes and stamps and the read settings.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from negprep.config import Job, PairsInput
from negprep.execution import Resources
from negprep.input import checks, pieces
from negprep.input.files import fingerprints, input_files
from negprep.input.pieces import Piece
from negprep.input.rows import file_columns, require_columns, require_rows
from negprep.input.shards import Shard, text_key, write_shards
from negprep.input.tables import load_table
from negprep.paths import Folder, stage_key
from negprep.results import ReadResult
from negprep.schemas import conform
from negprep.stages.base import Run, Stage
from negprep.storage import redact

FORMAT = 5  # bump when the normalised tables change shape, so old work directories are not reused
PIECES_PER_BUCKET = 4  # a bucket holds about as many ids as this many corpus pieces have rows


def read_key(job: Job, fps: dict[str, dict]) -> str:
    """What the normalised tables depend on: the input files (size, stamp) and the read settings."""
    spec = job.input if isinstance(job.input, str) else job.input.model_dump()
    files = {r: (f["size"], f["stamp"]) for r, f in fps.items()}
    return stage_key(FORMAT, spec, job.split, job.read.model_dump(), job.on_bad_input, files, pl.__version__)


def read_whole(job: Job, out: Folder, files: dict[str, str]) -> dict:
    """A pairs table: read and normalise it whole, write shards under `out` (Ray task)."""
    tables = {role: load_table(url, job.storage) for role, url in files.items()}
    res = checks.normalise(job, tables)
    corpus = res["corpus"].with_columns(pl.col("text").map_elements(text_key, return_dtype=pl.Int64).alias("text_key"))
    corpus_shards = write_shards(out.sub("corpus"), corpus.to_arrow(), job.read.shard_rows, "corpus")
    inputs = {r: {**res["stats"][r], "path": redact(files[r]), "sha256": tables[r].sha256, "pieces": 1} for r in files}
    return _write(job, out, res, corpus_shards, res["corpus"].height, inputs)


def _write(job: Job, out: Folder, res: dict, corpus_shards: list[Shard], passages: int, inputs: dict) -> dict:
    query_shards = write_shards(out.sub("queries"), res["queries"].to_arrow(), job.read.query_shard_rows, "queries")
    out.write_parquet("qrels.parquet", conform(res["qrels"].to_arrow(), "qrels"))
    out.write_parquet("exclusions.parquet", conform(res["exclusions"].to_arrow(), "exclusions"))
    out.write_parquet("rejected.parquet", conform(res["rejected"].to_arrow(), "rejected_input"))
    result = ReadResult(out, tuple(corpus_shards), tuple(query_shards), passages, res["queries"].height,
                        res["qrels"].height, res["rejected"].height, inputs, res["exclusions"].height)
    out.write_json("stats.json", result.stats())
    return result.stats()


# --- the Ray tasks of a read piece by piece; `folder` is the stage's `input/<key>/`


def check(job: Job, piece: Piece, folder: Folder, buckets: int, columns: dict[str, str] | None = None) -> dict:
    """Read one piece and run its per-row checks; writes `pieces/<name>/` and returns its summary.
    `columns`: the file's columns, when this piece picked others (`negprep.input.rows.file_columns`)."""
    at = folder.sub("pieces", piece.name)
    table = pieces.read(piece, job.storage)
    rows, kept = checks.check_piece(job, piece.role, table, piece_of_several=not piece.whole, columns=columns)
    at.write_parquet("kept.parquet", kept.to_arrow())
    at.write_parquet("rejected.parquet", rows.frame().to_arrow())
    if piece.role in ("corpus", "qrels"):
        _write_buckets(at, "ids.parquet", checks.bucketed_ids(piece.role, rows, kept, buckets))
    elif piece.role == "queries":
        at.write_parquet("ids.parquet", checks.id_lines(rows).to_arrow())
    summary = {"piece": asdict(piece), "rows_read": table.rows_read, "parsed": table.frame.height,
               "kept": kept.height, "sha256": table.sha256, "open_quote_at_end": table.open_quote_at_end,
               "picked": rows.picked, "absent": rows.absent}
    at.write_json("piece.json", summary)  # last: its presence means the piece is finished
    return summary


def _write_buckets(at: Folder, name: str, ids: pl.DataFrame) -> None:
    # one row group per bucket: a bucket's task reads only its own group of every piece
    table = ids.to_arrow()
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as w:
        for part in ids.partition_by("bucket", maintain_order=True):
            w.write_table(part.to_arrow(), row_group_size=max(1, part.height))
        if ids.height == 0:
            w.write_table(table)
    at.write_bytes(name, buf.getvalue())


def _bucket(folder: Folder, names: list[str], b: int) -> pl.DataFrame:
    """Bucket `b` of every piece's ids, with the piece's index."""
    parts = [pl.from_arrow(folder.sub("pieces", n).read_parquet("ids.parquet", filters=[("bucket", "=", b)]))
             .with_columns(pl.lit(i, pl.Int32).alias("piece")) for i, n in enumerate(names)]
    return pl.concat(parts, how="vertical_relaxed")


def resolve_bucket(folder: Folder, corpus: list[str], qrels: list[str], b: int) -> dict[int, int]:
    """Bucket `b` of passage ids across all pieces: writes the duplicate lines (with their piece)
    and the status of the ids qrels name; returns the duplicates per corpus piece."""
    ids = _bucket(folder, corpus, b)
    dups = checks.duplicate_lines(ids)
    at = folder.sub("buckets")
    at.write_parquet(f"duplicates-{b:05d}.parquet", dups.to_arrow())
    at.write_parquet(f"status-{b:05d}.parquet", checks.reference_status(ids, _bucket(folder, qrels, b)).to_arrow())
    return dict(dups.group_by("piece").len().iter_rows())


def _passages(folder: Folder, piece: Piece, j: int, duplicates: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Corpus piece `j`'s passages after duplicates, and the rows it rejected as duplicates."""
    kept = pl.from_arrow(folder.sub("pieces", piece.name).read_parquet("kept.parquet"))
    rows, kept = checks.joined("corpus", piece.url, piece.fmt, [kept], [], 0)
    passages = checks.piece_passages(rows, kept, duplicates.filter(pl.col("piece") == j).drop("piece"))
    return passages, rows.frame()


def shards(job: Job, folder: Folder, corpus: list[Piece], j: int, offsets: list[int], total: int) -> list[dict]:
    """The corpus shards that start in piece `j` (shard s holds the passages s*R .. (s+1)*R-1 of the
    whole corpus, R = read.shard_rows), reading later pieces for its last shard; also writes the
    piece's duplicate rows."""
    size = job.read.shard_rows
    duplicates = pl.concat([pl.from_arrow(t) for t in _read_all(folder.sub("buckets"), "duplicates-")])
    passages, dup_rows = _passages(folder, corpus[j], j, duplicates)
    folder.sub("pieces", corpus[j].name).write_parquet("duplicates.parquet", dup_rows.to_arrow())
    start, end = offsets[j], offsets[j] + passages.height
    out, first = [], -(-start // size)  # the first shard starting at or after `start`
    loaded, nxt = passages, j + 1
    for s in range(first, math.ceil(total / size)):
        lo = s * size
        if lo >= end:
            break
        hi = min(lo + size, total)
        while offsets[j] + loaded.height < hi:  # the shard runs on into the next pieces
            loaded = pl.concat([loaded, _passages(folder, corpus[nxt], nxt, duplicates)[0]])
            nxt += 1
        part = loaded.slice(lo - offsets[j], hi - lo)
        part = part.with_columns(pl.col("text").map_elements(text_key, return_dtype=pl.Int64).alias("text_key"))
        table = conform(part.to_arrow(), "corpus").combine_chunks()
        name = f"{s:05d}.parquet"
        folder.sub("corpus").write_parquet(name, table)
        out.append(Shard.of(name, table).to_dict())
    return out


def _read_all(folder: Folder, prefix: str) -> list[pa.Table]:
    return [folder.read_parquet(n) for n in folder.ls(".parquet") if n.startswith(prefix)]


def link(job: Job, folder: Folder, files: dict[str, str], plan: dict[str, list[Piece]], summaries: dict[str, dict],
         corpus_shards: list[dict], passages: int) -> dict:
    """Queries, qrels, the accounting and the strict policy over every piece; writes the query
    shards, qrels, exclusions, rejected rows and stats.json."""
    rows, kept, ids = {}, {}, None
    for role, ps in plan.items():
        at = [folder.sub("pieces", p.name) for p in ps]
        rejected = [pl.from_arrow(a.read_parquet("rejected.parquet")) for a in at]
        if role == "corpus":
            rejected += [pl.from_arrow(a.read_parquet("duplicates.parquet")) for a in at]
        frames = [pl.from_arrow(a.read_parquet("kept.parquet")) for a in at] if role != "corpus" else []
        read = sum(summaries[p.name]["rows_read"] for p in ps)
        rows[role], kept[role] = checks.joined(role, files[role], ps[0].fmt, frames, rejected, read)
        require_rows(rows[role], sum(summaries[p.name]["parsed"] for p in ps))
        if role == "queries":
            ids = pl.concat([pl.from_arrow(a.read_parquet("ids.parquet")) for a in at], how="diagonal_relaxed")
    status = pl.concat([pl.from_arrow(t) for t in _read_all(folder.sub("buckets"), "status-")])
    res = checks.link_pieces(job, rows["queries"], kept["queries"], ids, rows["qrels"], kept["qrels"], status,
                             rows["corpus"], passages)
    inputs = {}
    for role, ps in plan.items():
        whole = {"sha256": summaries[ps[0].name]["sha256"]} if len(ps) == 1 else {}
        inputs[role] = {**res["stats"][role], "path": redact(files[role]), **whole, "pieces": len(ps)}
    return _write(job, folder, res, [Shard.from_dict(d) for d in corpus_shards], passages, inputs)


class Read(Stage):
    name = "read"

    def check(self, job: Job) -> None:
        fingerprints(input_files(job), job.storage)  # missing, unreadable or unknown-format inputs

    def resources(self, run: Run) -> dict[str, Resources]:
        # a piece task holds one piece; a pairs table is read whole, by a worker that exits afterwards
        return {"piece": Resources(cpus=1), "whole": Resources(cpus=1, one_call=True)}

    def run(self, run: Run, force: bool) -> None:
        job = run.job
        files = input_files(job)
        fps = fingerprints(files, job.storage)
        folder = run.work.sub("input", read_key(job, fps))
        if force or not folder.exists("_SUCCESS"):
            folder.rm("_SUCCESS")
            if force:
                folder.rm("pieces", recursive=True)
            if isinstance(job.input, PairsInput):
                run.ex.call(read_whole, job, folder, files, res=self.resources(run)["whole"])
            else:
                self._read_pieces(run, folder, files, fps)
            folder.write_bytes("_SUCCESS", b"")
        run.read = ReadResult.load(folder)

    def _read_pieces(self, run: Run, folder: Folder, files: dict[str, str], fps: dict[str, dict]) -> None:
        job, res = run.job, self.resources(run)["piece"]
        size = int(job.read.piece_mb * 2**20)
        plan = {role: pieces.plan(role, url, fps[role]["size"], size, job.storage) for role, url in files.items()}
        counted = [p for ps in plan.values() for p in ps if not p.whole and p.fmt != "parquet"]
        if counted:
            lines = run.ex.map(pieces.count_newlines, [(p, job.storage) for p in counted], res, desc="read: lines")
            for role, ps in plan.items():
                if not ps[0].whole and ps[0].fmt != "parquet":
                    mine = [n for p, n in zip(counted, lines, strict=True) if p.role == role]
                    plan[role] = pieces.with_lines(ps, mine)
        buckets = max(1, math.ceil(len(plan["corpus"]) / PIECES_PER_BUCKET))
        summaries = self._check(run, folder, plan, buckets)
        cut = {p.role for ps in plan.values() for p in ps if summaries[p.name]["open_quote_at_end"] and not p.last}
        for role in cut:  # a quoted CSV field holds a newline where the file was cut: read it whole
            plan[role] = [Piece(role, files[role], plan[role][0].fmt)]
        if cut:
            summaries |= self._check(run, folder, {r: plan[r] for r in cut}, buckets)
        for ps in plan.values():  # a column no piece has stops the job, as a whole read does
            require_columns([summaries[p.name].get("absent", []) for p in ps if summaries[p.name]["parsed"]])
        summaries |= self._agree(run, folder, plan, buckets, summaries)
        names = {role: [p.name for p in ps] for role, ps in plan.items()}
        dups = run.ex.map(resolve_bucket, [(folder, names["corpus"], names["qrels"], b) for b in range(buckets)], res,
                          desc="read: duplicates")
        offsets = [0]
        for j, p in enumerate(plan["corpus"]):
            offsets.append(offsets[-1] + summaries[p.name]["kept"] - sum(d.get(j, 0) for d in dups))
        total = offsets[-1]
        out = run.ex.map(shards, [(job, folder, plan["corpus"], j, offsets, total) for j in range(len(plan["corpus"]))],
                         res, desc="read: shards")
        corpus_shards = [s for part in out for s in part]
        run.ex.call(link, job, folder, files, plan, summaries, corpus_shards, total, res=res)

    def _agree(self, run: Run, folder: Folder, plan: dict[str, list[Piece]], buckets: int,
               summaries: dict[str, dict]) -> dict[str, dict]:
        """Pieces that picked other columns than the file's (a JSON lines piece without a key, or with
        only an alias of it) checked again with the file's columns; their new summaries."""
        todo = []
        for ps in plan.values():
            columns, redo = file_columns([summaries[p.name].get("picked", {}) for p in ps])
            todo += [(run.job, ps[i], folder, buckets, columns) for i in redo]
        done = run.ex.map(check, todo, self.resources(run)["piece"], desc="read: pieces again") if todo else []
        return {args[1].name: s for args, s in zip(todo, done, strict=True)}

    def _check(self, run: Run, folder: Folder, plan: dict[str, list[Piece]], buckets: int) -> dict[str, dict]:
        """Every piece through `check`, skipping pieces a previous run finished."""
        todo, summaries = [], {}
        for p in (p for ps in plan.values() for p in ps):
            at = folder.sub("pieces", p.name)
            if at.exists("piece.json") and Piece(**at.read_json("piece.json")["piece"]) == p:
                summaries[p.name] = at.read_json("piece.json")
            else:
                todo.append(p)
        done = run.ex.map(check, [(run.job, p, folder, buckets) for p in todo], self.resources(run)["piece"],
                          desc="read: pieces")
        return summaries | {p.name: s for p, s in zip(todo, done, strict=True)}

