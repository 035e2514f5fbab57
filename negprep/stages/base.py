"""The stage contract, and the `Run` that carries one job's run through the stages.

Every stage is one object with the same small interface; `negprep.runner` loops over them:

- `name`: what `--from` and the manifest call it;
- `enabled(job)`: whether the job uses it (guide, cluster and batch are optional);
- `check(job)`: what it verifies before Ray starts (model names, compilers, inputs, settings), so a
  mistake is one line and exit 2 with nothing started; `negprep validate` runs the same checks;
- `resources(run)`: what each kind of its Ray work asks the scheduler for (negprep.execution);
- `run(run, force)`: does the work, skipping what a previous run finished (a finished shard is a
  file that exists under a key of everything it depends on) unless `force`, and puts its typed
  result on the `Run` for the stages after it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

from negprep.config import Job
from negprep.execution import Executor, Resources
from negprep.output.writer import Writer
from negprep.paths import Folder
from negprep.results import Embedded, MineResult, ReadResult, StageOutput


@dataclass
class Run:
    """One run of a job: its folders, its executor, and each finished stage's result."""

    job: Job
    work: Folder
    out: Folder
    ex: Executor
    overwrite: bool = False
    cpus: int = 1  # CPUs of the Ray cluster
    gpus: float = 0.0  # GPUs of the Ray cluster
    devices: dict[str, str] = field(default_factory=dict)  # resolved embed, guide and search devices
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    read: ReadResult | None = None
    embed: Embedded | None = None
    search: StageOutput | None = None
    guide: StageOutput | None = None
    cluster: StageOutput | None = None
    writer: Writer | None = None  # the output folder's one writer (the mine stage starts it)
    mine: MineResult | None = None
    batch: dict | None = None
    manifest: dict | None = None


class Stage:
    """Base of every stage; see the module docstring for the contract."""

    name: ClassVar[str]

    def enabled(self, job: Job) -> bool:
        return True

    def check(self, job: Job) -> None:
        """Raise a ConfigError or InputError (one line) for what would fail later inside Ray."""

    def resources(self, run: Run) -> dict[str, Resources]:
        """What each kind of this stage's Ray work asks for, by the name the stage uses for it."""
        return {}

    def run(self, run: Run, force: bool) -> None:
        raise NotImplementedError
