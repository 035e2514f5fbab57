"""Which files a job reads, and a cheap identity of each (size and stamp), taken before Ray starts.

A missing input, a directory where a file should be, an unknown table format or an unreachable
store is one line here, before anything expensive runs.
"""

from __future__ import annotations

from negprep.config import Job, PairsInput, TablesInput
from negprep.errors import InputError
from negprep.input.tables import table_format
from negprep.paths import locate
from negprep.storage import explain


def input_files(job: Job) -> dict[str, str]:
    """The files a job reads, by role (URL strings)."""
    spec = job.input
    if isinstance(spec, TablesInput):
        return {"corpus": spec.corpus, "queries": spec.queries, "qrels": spec.qrels}
    if isinstance(spec, PairsInput):
        return {"pairs": spec.pairs}
    base = spec.rstrip("/")
    return {
        "corpus": f"{base}/corpus.jsonl",
        "queries": f"{base}/queries.jsonl",
        "qrels": f"{base}/qrels/{job.split}.tsv",
    }


def fingerprints(files: dict[str, str], storage_options: dict | None = None) -> dict[str, dict]:
    """Cheap identity of each input (size and modification time or ETag); checks they exist and
    have a known table format, so these mistakes stop the job before Ray starts."""
    out = {}
    for role, url in files.items():
        table_format(url)
        folder, name = locate(url, storage_options)
        try:
            info = folder.fs.info(folder.path(name))
        except FileNotFoundError:
            raise InputError(f"{url}: {role} file not found") from None
        except PermissionError as e:
            raise InputError(f"{url}: cannot read {role} file: {e}") from None
        except Exception as e:  # noqa: BLE001 - a storage failure (endpoint, credentials) becomes one line
            if (msg := explain(e, url)) is None:
                raise
            raise InputError(f"{role}: {msg}") from None
        if info.get("type") == "directory":
            raise InputError(f"{url}: {role} is a directory, expected a file")
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
        out[role] = {"path": url, "size": int(info.get("size") or 0), "stamp": str(stamp)}
    return out
