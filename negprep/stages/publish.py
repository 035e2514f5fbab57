"""Publish stage: the rest of the output next to the data, in an order readers can trust.

The rejected input rows (`rejected/input.parquet`, when there are any), `manifest.json`, the
dataset card `README.md` and `report.html`, then `_SUCCESS`: a reader that sees `_SUCCESS` sees a
whole dataset.
"""

from __future__ import annotations

import time

from negprep.output.manifest import build_manifest
from negprep.output.writer import Writer
from negprep.results import ReadResult
from negprep.stages.base import Run, Stage


def publish_rejected(read: ReadResult, writer: Writer) -> str | None:
    """Copy the rejected input rows next to the output when there are any; returns the path
    relative to the output. Under on_bad_input: strict there never are."""
    if not read.rows_rejected:
        return None
    return writer.write_rejected(read.folder.read_bytes(read.rejected.name))


class Publish(Stage):
    name = "publish"

    def run(self, run: Run, force: bool) -> None:
        rejected = publish_rejected(run.read, run.writer)
        run.timings["total"] = round(time.perf_counter() - run.started, 3)
        run.manifest = build_manifest(run, rejected)
        run.writer.publish(run.manifest)
