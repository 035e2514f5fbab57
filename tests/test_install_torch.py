"""scripts/install-torch.py picks the torch build for the machine: runs of --dry-run with a fake nvidia-smi."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-torch.py"
BUILDS = ROOT / "scripts" / "torch-builds.txt"
# torch 2.13.0 builds checked to exist on PyTorch's index (Linux x86_64, CPython 3.10-3.13)
CHECKED = {
    "2.13.0+cpu": "https://download.pytorch.org/whl/cpu",
    "2.13.0+cu126": "https://download.pytorch.org/whl/cu126",
    "2.13.0+cu130": "https://download.pytorch.org/whl/cu130",
}

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the listed builds are for Linux x86_64; elsewhere the script uses pip's index")


def _builds() -> dict[str, str]:
    rows = [line.split("#", 1)[0].split() for line in BUILDS.read_text().splitlines()]
    return {row[0]: row[1] for row in rows if row}


def _pip(*args: str) -> str:
    return shlex.join([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args])


def _run(tmp_path: Path, driver: str | None = None, caps: str | None = "8.6", smi_exit: int = 0,
         cpu_index: str = "reachable", args: tuple[str, ...] = ("-c", "constraints.txt")):
    """The script's dry run with PATH holding only a fake nvidia-smi (driver None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if driver is not None or smi_exit:  # two GPUs; an old driver's nvidia-smi has no compute_cap field
        caps_answer = f"echo {caps}; echo {caps}" if caps else "echo 'Field \"compute_cap\" is not valid' >&2; exit 2"
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n"
                        + (f"echo 'NVIDIA-SMI has failed' >&2; exit {smi_exit}\n" if smi_exit else "")
                        + 'case "$*" in\n'
                        + f'  "--query-gpu=driver_version --format=csv,noheader") echo {driver}; echo {driver} ;;\n'
                        + f'  "--query-gpu=compute_cap --format=csv,noheader") {caps_answer} ;;\n'
                        + "  *) exit 3 ;;\nesac\n")
        fake.chmod(0o755)
    env = {"PATH": str(bin_dir), "NEGPREP_TORCH_CPU_INDEX": cpu_index}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def _commands(r) -> list[str]:
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for line in lines:  # every build named is one of the list's, from its own index
        words = shlex.split(line)
        build = next((w.removeprefix("torch==") for w in words if w.startswith("torch==")), None)
        if build and "+" in build:
            assert build in _builds(), build
            if "--index-url" in words:
                assert words[words.index("--index-url") + 1] == _builds()[build]
    return lines


def _from_torch_index(build: str, constraint: tuple[str, ...] = ("-c", "constraints.txt"), quiet=()) -> list[str]:
    # torch alone from PyTorch's index, then its dependencies from pip's own index under our constraints
    return [_pip(*quiet, "--no-deps", "--index-url", CHECKED[build], f"torch=={build}"),
            _pip(*quiet, *constraint, f"torch=={build}")]


def test_no_gpu_cpu_index_reachable(tmp_path):
    assert _commands(_run(tmp_path)) == _from_torch_index("2.13.0+cpu")


def test_no_gpu_cpu_index_out_of_reach_uses_pips_own_index(tmp_path):
    r = _run(tmp_path, cpu_index="unreachable")
    assert _commands(r) == [_pip("-c", "constraints.txt", "torch==2.13.0")]
    assert "out of reach" in r.stderr


def test_failing_nvidia_smi_means_no_gpu(tmp_path):
    r = _run(tmp_path, smi_exit=1)
    assert _commands(r) == _from_torch_index("2.13.0+cpu")
    assert "nvidia-smi failed (exit status 1: NVIDIA-SMI has failed)" in r.stderr


def test_driver_575_gets_cuda_12_6(tmp_path):
    r = _run(tmp_path, driver="575.57.08")
    assert _commands(r) == _from_torch_index("2.13.0+cu126")
    assert "NVIDIA driver 575.57.08 with GPUs of compute capability 8.6: torch 2.13.0+cu126" in r.stderr


def test_driver_580_gets_cuda_13(tmp_path):
    assert _commands(_run(tmp_path, driver="580.65.06")) == _from_torch_index("2.13.0+cu130")
    # quiet, no constraints, and a driver whose nvidia-smi cannot report compute_cap: decided by the driver
    r = _run(tmp_path, driver="590.44.01", caps=None, args=("--quiet",))
    assert _commands(r) == _from_torch_index("2.13.0+cu130", (), quiet=("--quiet",))


def test_oldest_driver_for_cuda_12(tmp_path):
    assert _commands(_run(tmp_path, driver="525.60.13")) == _from_torch_index("2.13.0+cu126")
    r = _run(tmp_path, driver="525.60.11")
    assert r.returncode == 2 and r.stdout == ""


@pytest.mark.parametrize("driver", ["470.256.02", "520.61.05"])
def test_too_old_driver_is_one_line_and_exit_2(tmp_path, driver):
    r = _run(tmp_path, driver=driver)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and f"NVIDIA driver {driver}" in r.stderr and "update the driver" in r.stderr


def test_gpus_the_cuda_13_build_has_no_kernels_for(tmp_path):
    # Volta on a CUDA 13 driver: cu130 dropped sm_70, cu126 still has it
    assert _commands(_run(tmp_path, driver="580.95.05", caps="7.0")) == _from_torch_index("2.13.0+cu126")
    # Blackwell on a CUDA 12 driver: cu126 has no Blackwell kernels
    r = _run(tmp_path, driver="575.57.08", caps="10.0")
    assert r.returncode == 2 and r.stdout == "" and "compute capability 10.0" in r.stderr
    assert "update the driver" in r.stderr
    r = _run(tmp_path, driver="580.95.05", caps="3.7")  # Kepler: no build at all
    assert r.returncode == 2 and "no build has kernels for these GPUs" in r.stderr


def test_cpu_flag_ignores_the_gpu(tmp_path):
    r = _run(tmp_path, driver="580.65.06", args=("--cpu",))
    assert _commands(r) == _from_torch_index("2.13.0+cpu", ())
    r = _run(tmp_path, driver="580.65.06", cpu_index="unreachable", args=("--cpu",))
    assert _commands(r) == [_pip("torch==2.13.0")]


def test_bad_probe_override_is_refused(tmp_path):
    r = _run(tmp_path, cpu_index="maybe")
    assert r.returncode == 2 and "NEGPREP_TORCH_CPU_INDEX" in r.stderr


def test_the_list_holds_the_checked_builds_at_the_pinned_version():
    assert _builds() == CHECKED
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)
    for build in CHECKED:
        # constraints.txt's torch==2.13.0 admits every build (PEP 440 ignores the local label), so a later
        # `pip install -c constraints.txt -e .` keeps the torch installed first
        assert SpecifierSet(f"=={pins['torch']}").contains(build), build


def test_makefile_and_cluster_install_torch_with_the_script():
    makefile = (ROOT / "Makefile").read_text()
    cluster = (ROOT / "ray_cluster.yaml").read_text()
    assert "scripts/install-torch.py" in makefile and "~/negprep/scripts/install-torch.py" in cluster
    for text in (makefile, cluster):  # the indexes are named in torch-builds.txt alone
        assert "download.pytorch.org" not in text and "torch==" not in text
