"""The GPU code runs where only the GPU test machine's packages are: torch, transformers,
tokenizers, numpy, pyarrow (pydantic, ray, faiss, polars and datasets blocked by
tests/gpu_machine.py). The device check's smoke run and the real-CUDA test file must not need them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = [sys.executable, str(ROOT / "tests" / "gpu_machine.py")]


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*BLOCKED, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_blocker_hides_the_packages_the_gpu_machine_lacks():
    r = _run(["-m", "negprep.cli", "--help"])
    assert r.returncode != 0 and "pydantic" in r.stderr  # the CLI needs the config: it cannot load there


def test_device_check_smoke_runs_without_ray_faiss_polars_pydantic(tmp_path):
    # the cuda_tests section is a pytest run of tests/test_cuda.py: collected below, skipped here for time
    r = _run(["benchmarks/gpu.py", "--smoke", "--out", str(tmp_path), "--skip", "cuda_tests"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # each section wrote its JSON as it ended
    for section in ("machine", "encoders", "cosine", "search", "job", "gpu"):
        assert (tmp_path / f"{section}.json").exists(), section
    got = json.loads((tmp_path / "gpu.json").read_text())
    assert got["machine"]["smoke"] and got["cosine"]["float32"]["ok"]
    check = got["search"]["exact_check"]
    assert check["identical_top_k"] == check["queries"]
    assert got["encoders"]["MiniLM-L6"]["negprep"]["device"].startswith("cpu (cuda code path")
    assert "not installed" in got["job"]["skipped"]  # the whole job needs ray: skipped, not failed


def test_cuda_test_file_collects_without_them():
    r = _run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "3 tests collected" in r.stdout
    # and a file that needs the config does not: the check above could fail
    bad = _run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_devices.py"])
    assert bad.returncode != 0 and "pydantic" in bad.stdout + bad.stderr
