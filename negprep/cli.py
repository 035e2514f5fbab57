"""`negprep run|validate`: the command line. Exit codes: 0 done, 2 bad input or config, 1 failure."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from negprep.errors import NegprepError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="negprep", description="Mine hard negatives into Parquet training data.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job file")
    run.add_argument("job", help="job YAML file")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output")
    run.add_argument("--output", help="override the job's output path")
    run.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    val = sub.add_parser("validate", help="check a job file and its inputs exist, without running")
    val.add_argument("job")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        from negprep.config import load_job

        overrides = {"output": args.output} if getattr(args, "output", None) else None
        job = load_job(args.job, overrides)
        if args.command == "validate":
            from negprep.stages.read import fingerprints, input_files

            fingerprints(input_files(job), job.storage)
            print(f"{args.job}: ok")
            return 0
        from negprep.runner import run_job
        from negprep.summary import format_summary

        manifest = run_job(job, overwrite=args.overwrite)
        print(format_summary(manifest))
        return 0
    except NegprepError as e:
        print(f"negprep: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
