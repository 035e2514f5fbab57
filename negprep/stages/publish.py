"""Publish stage: the rest of the output next to the data, in an order readers can trust.

The rejected input rows (`rejected/input.parquet`, when there are any), `manifest.json`, the
dataset card `README.md` and `report.html`, then `_SUCCESS`: a reader that sees `_SUCCESS` sees a
whole dataset.
"""

from __future__ import annotations

import time

from negprep.output.manifest import build_manifest
from negprep.output.report import publish_docs
from negprep.output.writer import finish_output
from negprep.paths import Folder
from negprep.results import ReadResult
from negprep.stages.base import Run, Stage


def publish_rejected(read: ReadResult, out: Folder) -> str | None:
    """Copy the rejected input rows next to the output when there are any; returns the path
    relative to the output. Under on_bad_input: strict there never are."""
    if not read.rows_rejected:
        return None
    name = "rejected/input.parquet"
    out.write_bytes(name, read.folder.read_bytes(read.rejected.name))
    return name


class Publish(Stage):
    name = "publish"

    def run(self, run: Run, force: bool) -> None:
        rejected = publish_rejected(run.read, run.out)
        run.timings["total"] = round(time.perf_counter() - run.started, 3)
        run.manifest = build_manifest(run, rejected)
        run.out.write_json("manifest.json", run.manifest)
        publish_docs(run.out, run.manifest)
        finish_output(run.out)
