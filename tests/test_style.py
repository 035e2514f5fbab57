"""The code's shape, checked where CI runs: ruff clean (with mccabe complexity at most 15), and
functions and modules within the sizes a reader can hold (60 and 400 lines)."""

from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import ROOT

FUNCTION_LINES, MODULE_LINES = 60, 400


def test_ruff_is_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "negprep", "tests", "benchmarks"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_functions_and_modules_stay_small():
    over = set()
    for path in sorted((ROOT / "negprep").rglob("*.py")):
        name = str(path.relative_to(ROOT))
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MODULE_LINES:
            over.add(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and \
                    node.end_lineno - node.lineno + 1 > FUNCTION_LINES:
                over.add(f"{name}:{node.name}")
    assert not over, f"over {FUNCTION_LINES} lines (a function) or {MODULE_LINES} (a module): {sorted(over)}"
