"""Shared by the benchmarks: a generated corpus of any size, the tiny offline model, a timed CLI run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SYL = ["val", "mor", "ess", "tan", "bri", "lo", "quen", "dar", "ith", "sel", "kor", "ani"]
_WORDS = [
    *("town", "river", "hills", "coast", "valley", "marshes", "plateau", "founded", "people", "live"),
    *("economy", "rests", "glassworks", "mills", "shipyards", "mines", "dairies", "makers", "breweries"),
    *("potteries", "visitors", "come", "local", "bread", "cheese", "trout", "honey"),
]
NOTE = (
    "2 shared cores: other jobs ran on this machine at the same time, so absolute timings are noisy "
    "(compare orders of magnitude, not percent)."
)


def _name(i: int) -> str:
    """A unique pronounceable name per integer (base-12 syllables)."""
    parts = []
    while True:
        parts.append(_SYL[i % 12])
        i //= 12
        if i == 0:
            break
    return "".join(parts).capitalize()


def write_corpus(root: Path, passages: int, queries: int = 2000, seed: int = 0) -> Path:
    """A BEIR directory with `passages` short generated passages and `queries` queries, one positive each.

    Streams to disk, so the generator itself stays small at any size."""
    rng = random.Random(seed)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(passages):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 24)))
            f.write(json.dumps({"_id": f"d{i}", "title": _name(i), "text": f"{_name(i)} {words}."}) + "\n")
    step = max(1, passages // queries)
    with open(root / "queries.jsonl", "w", encoding="utf-8") as fq, open(root / "qrels" / "train.tsv", "w") as fr:
        fr.write("query-id\tcorpus-id\tscore\n")
        for j in range(min(queries, passages)):
            words = " ".join(rng.choice(_WORDS) for _ in range(6))
            fq.write(json.dumps({"_id": f"q{j}", "text": f"{_name(j * step)} {words}?"}) + "\n")
            fr.write(f"q{j}\td{j * step}\t1\n")
    return root


def tiny_model(path: Path) -> Path:
    """The tests' 2-layer, 32-wide BERT (built offline in a second)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_bert

    return path if (path / "config.json").exists() else build_tiny_bert(path)


_WRAPPER = """
import resource, sys
from negprep.cli import main
rc = main(sys.argv[1:])
print("DRIVER_PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


def run_cli(job: dict, workdir: Path, env: dict | None = None) -> dict:
    """Run `negprep run` on `job` in a fresh process with its own local Ray; returns the driver's
    peak RSS, the largest RSS any of its descendants (Ray workers) reached, wall time and the manifest."""
    import psutil
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("RAY_ADDRESS")}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRAPPER, "run", str(path), "--overwrite", "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker_peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal worker_peak
        me = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                for c in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        worker_peak = max(worker_peak, c.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.5)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"negprep failed ({proc.returncode}):\n{err[-3000:]}")
    peak_kb = int(next(line.split()[1] for line in out.splitlines() if line.startswith("DRIVER_PEAK_KB")))
    manifest = json.loads((Path(job["output"]) / "manifest.json").read_text())
    return {
        "driver_peak_mb": round(peak_kb / 1024, 1),
        "largest_worker_rss_mb": round(worker_peak / 2**20, 1),
        "wall_s": round(wall, 1),
        "manifest": manifest,
    }


def machine() -> dict:
    """What the figures were measured on: CPU, cores, memory and the versions that matter."""
    import platform
    from importlib.metadata import version

    import psutil

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f" {f}" in flags]
    pkgs = ("negprep", "torch", "onnxruntime", "transformers", "sentence-transformers", "ray", "faiss-cpu", "pyarrow",
            "polars")
    return {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "versions": {p: _version(version, p) for p in pkgs},
    }


def _version(version, pkg: str) -> str | None:
    try:
        return version(pkg)
    except Exception:
        return None


def tree_memory(pid: int, by_process: dict | None = None) -> tuple[int, int]:
    """(PSS, RSS) in bytes summed over a process and all its descendants; `by_process` (when given)
    receives each process's PSS under its name.

    PSS splits shared pages (the torch libraries every Ray worker maps, the object store) among
    the processes that share them, so the sum is what the tree really occupies; summed RSS counts
    shared pages once per process and overstates a many-process tool like Ray."""
    import psutil

    pss = rss = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            m = p.memory_full_info()
            pss += getattr(m, "pss", m.rss)
            rss += m.rss
            if by_process is not None:
                by_process[f"{p.pid} {_process_name(p)}"] = getattr(m, "pss", m.rss)
    return pss, rss


def _process_name(p) -> str:
    """A short name: Ray's process title (`ray::ShardEmbedder`), else the program or script."""
    cmd = p.cmdline()
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    script = next((c for c in cmd[1:] if not c.startswith("-")), None) if "python" in Path(cmd[0]).name else None
    return Path(script or cmd[0]).name


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 1.0) -> dict:
    """Run `cmd`, sampling its whole process tree's memory; wall seconds, peak PSS and RSS (MiB),
    each process's PSS (MiB) at the peak sample, return code and combined output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_pss = peak_rss = 0
    at_peak: dict = {}
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak_pss, peak_rss, at_peak
        while not stop.is_set():
            procs: dict = {}
            pss, rss = tree_memory(proc.pid, procs)
            if pss > peak_pss:
                at_peak = procs
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(interval)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    return {
        "seconds": round(seconds, 1),
        "peak_pss_mb": round(peak_pss / 2**20),
        "peak_rss_mb": round(peak_rss / 2**20),
        "peak_pss_by_process_mb": {k: round(v / 2**20) for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])},
        "returncode": proc.returncode,
        "output": out,
    }
