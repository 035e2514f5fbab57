"""The output folder's life: refused if it holds a dataset (unless overwriting), marked
`_INCOMPLETE` while a run writes it, and finished by `_SUCCESS`.

A reader that sees `_SUCCESS` sees a whole dataset; a folder with `_INCOMPLETE` and no `_SUCCESS`
is what a killed run left, and the next run replaces it without --overwrite.
"""

from __future__ import annotations

from negprep.errors import ConfigError
from negprep.paths import Folder

INCOMPLETE = "_INCOMPLETE"  # in an output while a run writes it; `_SUCCESS` replaces it at the end


def has_files(out: Folder) -> bool:
    """Whether `out` holds anything but a write probe left by an interrupted pre-flight check."""
    return any(not n.startswith(".negprep-write-check") for n in out.ls())


def unfinished(out: Folder) -> bool:
    """An output a killed negprep run left behind (no `_SUCCESS`): safe to replace."""
    return out.exists(INCOMPLETE) and not out.exists("_SUCCESS")


def check_output(out: Folder, overwrite: bool) -> None:
    """Refuse an output that holds a finished dataset unless overwriting."""
    if has_files(out) and not overwrite and not unfinished(out):
        raise ConfigError(f"{out.url}: output exists; pass --overwrite to replace it")


def prepare_output(out: Folder, overwrite: bool) -> None:
    """Empty the output before the first file of a run goes in; an overwrite removes `_SUCCESS`
    first, so no reader takes a half-replaced folder for a dataset."""
    check_output(out, overwrite)
    if has_files(out):
        # object stores have no rename: the marker goes first, then the manifest, then the data
        out.rm("_SUCCESS")
        out.rm("manifest.json")
        out.rm("", recursive=True)
    # a run in progress: if it is killed, the rerun replaces this output without --overwrite
    out.write_bytes(INCOMPLETE, b"")


def finish_output(out: Folder) -> None:
    """The last write of a run: `_SUCCESS` in, `_INCOMPLETE` out."""
    out.write_bytes("_SUCCESS", b"")
    out.rm(INCOMPLETE)
