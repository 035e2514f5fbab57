#!/usr/bin/env python3
"""Install the torch build that fits this machine into the Python running this script.

    PYTHON scripts/install-torch.py [--dry-run] [--cpu] [--quiet] [-c CONSTRAINTS]

Run it with the interpreter to install into (a fresh venv's python: only the standard library is
used). It picks one of the builds in torch-builds.txt beside it:

- `nvidia-smi --query-gpu=driver_version --format=csv,noheader` names a driver: the first CUDA build
  whose driver minimum it meets and whose GPU architectures cover every GPU's compute capability
  (cu130 for drivers >= 580, cu126 for older ones, cu126 also for pre-Turing GPUs), from PyTorch's
  index for that build. A driver too old for all of them is a one-line error and exit status 2.
- no nvidia-smi, or it fails or lists no GPU (or --cpu): the CPU build from PyTorch's CPU index if
  that answers within a few seconds, else torch==<version> from pip's configured index (there a
  machine's pip configuration may supply a CPU wheel; PyPI's Linux x86_64 wheel is the CUDA build).

--dry-run prints the pip commands, one a line, and runs nothing. -c adds a constraints file to the
command that installs torch's dependencies (never to the one that reads PyTorch's index).

Environment (for tests; PATH decides which nvidia-smi runs):
  NEGPREP_TORCH_CPU_INDEX=reachable|unreachable   skip the probe of PyTorch's CPU index
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import NoReturn

BUILDS = Path(__file__).resolve().parent / "torch-builds.txt"
PROBE_TIMEOUT_S = 5.0


def fail(message: str) -> NoReturn:
    print(f"install-torch: {message}", file=sys.stderr)
    sys.exit(2)


def note(message: str) -> None:
    print(f"install-torch: {message}", file=sys.stderr)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def read_builds() -> list[dict]:
    """torch-builds.txt: `build index [driver>=V] [gpu>=A[,<B]] [cpu]` a line."""
    builds = []
    for number, line in enumerate(BUILDS.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2:
            fail(f"{BUILDS}:{number}: a build and its index, then conditions")
        build = {"version": words[0], "index": words[1], "cpu": False, "driver": None, "gpu": (None, None)}
        for word in words[2:]:
            if word == "cpu":
                build["cpu"] = True
            elif m := re.fullmatch(r"driver>=([\d.]+)", word):
                build["driver"] = m[1]
            elif m := re.fullmatch(r"gpu>=([\d.]+)(?:,<([\d.]+))?", word):
                build["gpu"] = (m[1], m[2])
            else:
                fail(f"{BUILDS}:{number}: cannot read {word!r}")
        builds.append(build)
    return builds


def nvidia_smi(field: str, say_why: bool = False) -> list[str] | None:
    """One value a GPU, or None where nvidia-smi is missing, fails or lists no GPU."""
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        why = str(e)
    else:
        values = [line.strip() for line in r.stdout.splitlines() if line.strip()]
        if r.returncode == 0 and values:
            return values
        why = f"exit status {r.returncode}" + (f": {r.stderr.strip().splitlines()[-1]}" if r.stderr.strip() else "")
    if say_why:
        note(f"nvidia-smi failed ({why}): no GPU")
    return None


def compute_capabilities() -> list[tuple[int, ...]] | None:
    """Every GPU's compute capability, or None where this driver's nvidia-smi cannot tell."""
    values = nvidia_smi("compute_cap")
    if not values or not all(re.fullmatch(r"\d{1,2}\.\d{1,2}", v) for v in values):
        return None
    return [version_tuple(v) for v in values]


def fits(build: dict, driver: tuple[int, ...], caps: list[tuple[int, ...]] | None) -> bool:
    if build["driver"] is None or driver < version_tuple(build["driver"]):
        return False
    low, high = build["gpu"]
    return caps is None or all((low is None or c >= version_tuple(low)) and (high is None or c < version_tuple(high))
                               for c in caps)


def cuda_build(builds: list[dict], driver_text: str) -> dict:
    if not re.fullmatch(r"\d+(\.\d+)*", driver_text):
        fail(f"cannot read the NVIDIA driver version from nvidia-smi: {driver_text!r}")
    driver = version_tuple(driver_text)
    caps = compute_capabilities()
    for build in builds:
        if fits(build, driver, caps):
            note(f"NVIDIA driver {driver_text}{describe(caps)}: torch {build['version']} from {build['index']}")
            return build
    needs = "; ".join(f"{b['version']} needs driver>={b['driver']}"
                      + (f", gpu>={b['gpu'][0]}" if b["gpu"][0] else "") + (f",<{b['gpu'][1]}" if b["gpu"][1] else "")
                      for b in builds if b["driver"])
    newer_driver = any(fits(b, (10**6,), caps) for b in builds)
    fail(f"no torch {builds[0]['version'].split('+')[0]} CUDA build runs on NVIDIA driver {driver_text}{describe(caps)}"
         f" ({needs}): {'update the driver' if newer_driver else 'no build has kernels for these GPUs'}")


def describe(caps: list[tuple[int, ...]] | None) -> str:
    if not caps:
        return ""
    return f" with GPUs of compute capability {', '.join(sorted({'.'.join(map(str, c)) for c in caps}))}"


def cpu_index_reachable(index: str) -> bool:
    override = os.environ.get("NEGPREP_TORCH_CPU_INDEX", "")
    if override in ("reachable", "unreachable"):
        return override == "reachable"
    if override:
        fail(f"NEGPREP_TORCH_CPU_INDEX is {override!r}: reachable or unreachable")
    answer = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(f"{index}/torch/", timeout=PROBE_TIMEOUT_S) as r:
                answer.append(r.status == 200)
        except Exception:  # noqa: BLE001 - any failure (DNS, proxy, TLS, HTTP error) means: not reachable
            answer.append(False)

    # a thread, so that a slow DNS lookup (which urlopen's timeout does not bound) cannot stall the install
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1)
    return bool(answer and answer[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, one a line; run nothing")
    parser.add_argument("--cpu", action="store_true", help="the CPU build even where a GPU is found")
    parser.add_argument("-q", "--quiet", action="store_true", help="pass --quiet to pip")
    parser.add_argument("-c", "--constraint", metavar="FILE", help="constraints for torch's dependencies")
    args = parser.parse_args()

    builds = read_builds()
    cpu = next(b for b in builds if b["cpu"])
    public = cpu["version"].split("+")[0]  # torch==2.13.0 from pip's own index
    linux_x86_64 = sys.platform == "linux" and platform.machine() == "x86_64"

    driver = None if args.cpu else nvidia_smi("driver_version", say_why=True)
    if driver and not linux_x86_64:
        note(f"a GPU, but PyTorch's CUDA builds listed are for Linux x86_64: torch=={public} from pip's index")
        build = None
    elif driver:
        build = cuda_build([b for b in builds if b["driver"]], driver[0])
    elif not linux_x86_64:
        build = None
        note(f"torch=={public} from pip's index ({sys.platform} {platform.machine()})")
    elif cpu_index_reachable(cpu["index"]):
        build = cpu
        note(f"{'--cpu' if args.cpu else 'no GPU'}: torch {build['version']} from {build['index']}")
    else:
        build = None
        note(f"{'--cpu' if args.cpu else 'no GPU'}, and {cpu['index']} is out of reach: torch=={public} from pip's"
             " index (a CPU wheel only where pip is set up with one; PyPI's Linux wheel is the CUDA build)")

    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"] + (["--quiet"] if args.quiet else [])
    constraint = ["-c", args.constraint] if args.constraint else []
    if build is None:
        commands = [pip + constraint + [f"torch=={public}"]]
    else:
        # Two steps. First torch alone (--no-deps) from PyTorch's index and nothing else: no other
        # package can come from there, and no constraints apply (with -c, pip would look up our pinned
        # versions of filelock, sympy, ... on PyTorch's index, which holds only some of them). Then
        # the same requirement again from pip's own index: the torch just installed satisfies it, so
        # pip installs only its dependencies (nvidia-*, triton, sympy, ...; all on PyPI) under our
        # constraints, from the index (or mirror) this machine's pip is set up with. Rather than
        # `--index-url <torch index> --extra-index-url https://pypi.org/simple`, which bypasses a
        # configured mirror and lets either index supply any package (whichever has the higher version).
        # constraints.txt's torch==2.13.0 matches 2.13.0+cu130 (PEP 440 ignores the local label), so
        # a later `pip install -c constraints.txt -e .` keeps this build.
        requirement = f"torch=={build['version']}"
        commands = [pip + ["--no-deps", "--index-url", build["index"], requirement], pip + constraint + [requirement]]

    for command in commands:
        if args.dry_run:
            print(shlex.join(command))
            continue
        print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
        code = subprocess.call(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
