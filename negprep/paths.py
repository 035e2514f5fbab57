"""One fsspec-backed folder for inputs, the work directory and the output: local or s3://.

Everything negprep stores goes through `Folder`, so object storage needs no code of its own.
Writes are atomic per file (local: temp file + rename; object stores: one PUT), and a stage's
shard is finished exactly when its file exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from negprep.errors import ConfigError
from negprep.storage import explain, fs_options, redact, with_env_credentials


class Folder:
    """A directory addressed by URL (`/data/x`, `s3://bucket/x`), with storage options for fsspec."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or "/"
        self.storage_options = dict(storage_options or {})
        # the job's friendly options, translated per protocol (local paths take none)
        self.fs, self.root = url_to_fs(self.url, **fs_options(self.url, self.storage_options))
        self.local = "file" in _protocols(self.fs)

    def __repr__(self) -> str:
        return f"Folder({redact(self.url)!r})"

    def __reduce__(self):  # pickles by URL: workers rebuild their own client, with the driver's credentials
        return (Folder, (self.url, with_env_credentials(self.url, self.storage_options)))

    def sub(self, *parts: str) -> Folder:
        return Folder("/".join([self.url, *parts]), self.storage_options)

    def path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def uri(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self.path(name))

    def ls(self, suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly in this folder, sorted; [] if it does not exist."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return [n for n in names if n.endswith(suffix)]

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self.path(name), mode)

    def write_bytes(self, name: str, data: bytes) -> None:
        target = self.path(name)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_parquet(self, name: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(name, buf.getvalue())

    def read_parquet(self, name: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        return pq.read_table(self.path(name), columns=columns, filters=filters, filesystem=self.fs)

    def lookup(self, names: list[str], ids: set[str], column: str, key: str = "id") -> dict:
        """`key` -> `column` for the given ids across Parquet files `names`, with a pushed-down filter."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        if not ids:
            return {}
        ds = pads.dataset([self.path(n) for n in names], format="parquet", filesystem=self.fs)
        t = ds.to_table(columns=[key, column], filter=pc.field(key).isin(pa.array(sorted(ids), pa.string())))
        return dict(zip(t.column(key).to_pylist(), t.column(column).to_pylist(), strict=True))

    def rm(self, name: str = "", recursive: bool = False) -> None:
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=recursive)

    def file(self, name: str) -> File:
        return File(self, name)

    def files(self, names: list[str] | tuple[str, ...]) -> Files:
        return Files(self, tuple(names))

    def check_writable(self, role: str) -> None:
        """Fail with a one-line ConfigError unless this folder can be written (`role` names it).

        Object stores: one empty probe object is written and deleted, which catches an unreachable
        endpoint, a missing bucket, missing credentials and missing write permission before any work.
        Local paths: the nearest existing ancestor must be a writable directory.
        """
        if self.local:
            p = os.path.abspath(self.root)
            while not os.path.exists(p):
                p = os.path.dirname(p)
            if not os.path.isdir(p) or not os.access(p, os.W_OK):
                raise ConfigError(f"{self.url}: {role} is not writable ({p} is not a writable directory)")
            return
        probe = f".negprep-write-check-{uuid.uuid4().hex[:12]}"
        try:
            self.write_bytes(probe, b"")
            self.fs.rm(self.path(probe))
        except Exception as e:  # noqa: BLE001 - any storage failure becomes one line; others re-raise
            msg = explain(e, self.url)
            if msg is None:
                raise
            raise ConfigError(f"{role}: {msg}") from None


@dataclass(frozen=True)
class File:
    """One file of a folder: how stages name a shard file to each other."""

    folder: Folder
    name: str

    @property
    def uri(self) -> str:
        return self.folder.uri(self.name)

    def exists(self) -> bool:
        return self.folder.exists(self.name)

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        return self.folder.read_parquet(self.name, columns=columns)

    def write_parquet(self, table: pa.Table) -> None:
        self.folder.write_parquet(self.name, table)


@dataclass(frozen=True)
class Files:
    """Several files of one folder, such as the corpus's text shards."""

    folder: Folder
    names: tuple[str, ...]

    def __iter__(self):
        return (File(self.folder, n) for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, ids: set[str], column: str, key: str = "id") -> dict:
        """`key` -> `column` for the given ids across these Parquet files."""
        return self.folder.lookup(list(self.names), ids, column, key)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def locate(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Folder, str]:
    """(folder, file name) of a file URL; a bare name is in the current directory."""
    head, sep, name = url.rstrip("/").rpartition("/")
    return Folder(head if sep else ".", storage_options), name


def stage_key(*parts: Any) -> str:
    """A short stable hash of everything a stage's results depend on: the name of its work folder."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
