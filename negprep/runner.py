"""Runs a job: the checks of every stage before Ray starts, then the stages in order on Ray.

Each stage's results live in the work directory under a key derived from everything they depend
on (inputs, model, settings), so a rerun reuses finished shards and a changed setting recomputes
exactly the stages that depend on it. `redo` (`--from STAGE`; `--force` is the first stage)
recomputes that stage and every later one, caches included.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager

from negprep import execution, storage
from negprep.config import Job
from negprep.execution import Executor
from negprep.models import devices
from negprep.output.writer import check_output
from negprep.paths import Folder
from negprep.stages import NAMES, STAGES, Run, Stage

log = logging.getLogger(__name__)


def stages_of(job: Job) -> list[Stage]:
    """The stages this job runs, in order."""
    return [s for s in STAGES if s.enabled(job)]


def check_job(job: Job) -> None:
    """Every check that can fail before Ray starts (`negprep validate` runs the same)."""
    for stage in stages_of(job):
        stage.check(job)


def run_job(job: Job, overwrite: bool = False, redo: str | None = None) -> dict:
    """Run a validated job end to end; returns the manifest written next to the output."""
    storage.remember_secrets(job.model_dump(mode="json"))  # masked in every message and log line from now on
    check_job(job)
    out, work = Folder(job.output, job.storage), Folder(job.work, job.storage)
    # an unreachable endpoint, a missing bucket or no write permission: one line before any work
    out.check_writable("output")
    work.check_writable("work_dir")
    if job.dropped:
        Folder(job.dropped, job.storage).check_writable("dropped")
    check_output(out, overwrite)
    execution.start_ray(job.ray.address, job.ray.num_cpus, job.ray.object_store_mb)
    gpus = execution.cluster_gpus()
    if devices.wants_cuda(job) and gpus <= 0 and (job.ray.address or os.environ.get("RAY_ADDRESS")):
        gpus = execution.wait_for_gpus(job.ray.gpu_wait_s)  # an autoscaler starts GPU nodes from zero
    # `cuda` with no GPU in the cluster: one line before any stage works
    run = Run(job, work, out, Executor(job.ray.retries), overwrite, cpus=execution.cluster_cpus(), gpus=gpus,
              devices=devices.job_devices(job, gpus))
    forced = set(NAMES[NAMES.index(redo):]) if redo else set()
    for stage in stages_of(job):
        with _timed(run, stage):
            stage.run(run, force=stage.name in forced)
    return run.manifest


@contextmanager
def _timed(run: Run, stage: Stage):
    t0 = time.perf_counter()
    if log.isEnabledFor(logging.INFO):
        asks = ", ".join(f"{k}: {v}" for k, v in stage.resources(run).items())
        log.info("stage %s: started%s", stage.name, f" ({asks})" if asks else "")
    yield
    run.timings[stage.name] = round(time.perf_counter() - t0, 3)
    log.info("stage %s: done in %.1f s", stage.name, run.timings[stage.name])
