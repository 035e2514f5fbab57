"""`negprep run|validate|report`: the command line.

Exit codes: 0 done, 2 bad input or config (one line on stderr), anything else a failure (traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from negprep import storage
from negprep.errors import NegprepError


def _parser() -> argparse.ArgumentParser:
    from negprep.stages import NAMES

    p = argparse.ArgumentParser(prog="negprep", description="Mine hard negatives into Parquet training data.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file")
    run.add_argument("job", help="job YAML file")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--output", help="override the job's output path")
    run.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    redo = run.add_mutually_exclusive_group()
    redo.add_argument("--force", action="store_true", help="recompute every stage, ignoring finished work")
    redo.add_argument("--from", dest="redo", choices=NAMES, help="recompute this stage and the later ones")
    val = sub.add_parser("validate", help="check a job file and read its inputs against schemas/, without Ray")
    val.add_argument("job")
    rep = sub.add_parser("report", help="rebuild OUTPUT/report.html from OUTPUT/manifest.json")
    rep.add_argument("output", help="a negprep output folder (local path or URL)")
    rep.add_argument("--card", action="store_true", help="rebuild the dataset card README.md too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    storage.install_log_redaction()
    try:
        if args.command == "report":
            from negprep.output.report import rebuild

            for url in rebuild(args.output, card=args.card):
                print(url)
            return 0
        from negprep.config import load_job

        overrides = {"output": args.output} if getattr(args, "output", None) else None
        job = load_job(args.job, overrides)
        storage.remember_secrets(job.model_dump(mode="json"))
        if args.command == "validate":
            from negprep.input.checks import check_inputs
            from negprep.output.summary import format_check
            from negprep.runner import check_job

            check_job(job)  # what a run checks before Ray starts: model names, compilers, inputs
            print(format_check(args.job, job, check_inputs(job)))
            return 0
        from negprep.output.summary import format_summary
        from negprep.runner import run_job
        from negprep.stages import NAMES

        manifest = run_job(job, overwrite=args.overwrite, redo=NAMES[0] if args.force else args.redo)
        print(format_summary(manifest))
        return 0
    except NegprepError as e:
        print(f"negprep: error: {storage.redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except Exception:  # noqa: BLE001 - a failure still shows its traceback, with secrets masked
        print(storage.redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


if __name__ == "__main__":
    sys.exit(main())
