"""Run a Python script or module as on the GPU test machine, where pydantic, ray, faiss, polars and
datasets are not installed: importing any of them raises ModuleNotFoundError, and
`importlib.util.find_spec` finds none of them, so libraries that probe for them see them absent.

    python tests/gpu_machine.py benchmarks/gpu.py --smoke
    python tests/gpu_machine.py -m pytest tests/test_cuda.py
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

MISSING = ("pydantic", "ray", "faiss", "polars", "datasets")


class Missing(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: the packages of MISSING (and their submodules) cannot be imported."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU test machine)", name=name)
        return None


def block() -> None:
    sys.meta_path.insert(0, Missing())
    for name in MISSING:
        sys.modules[name] = None  # find_spec(name) is None, and `import name` fails: absent, as there


if __name__ == "__main__":
    block()
    args = sys.argv[1:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
