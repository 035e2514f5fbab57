"""Running transformers encoders: tokenising, batching by width, pooling, on the CPU or CUDA (and
onnxruntime). Finding a model by its name is `negprep.models.resolve`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from negprep.errors import ConfigError
from negprep.models.devices import resolve_dtype, torch_device
from negprep.models.resolve import detect_pooling, model_fingerprint
from negprep.models.tokens import text_tokenizer, token_arrays
from negprep.models.width_batches import PAD_STEP, Staging, WidthBatches, release_free_memory

if TYPE_CHECKING:  # the GPU machine has no fsspec-backed Folder to import: only the type is named here
    from negprep.paths import Folder

log = logging.getLogger(__name__)

GPU_BATCH_TOKENS = 65_536  # padded tokens per forward pass on a GPU, unless the job sets batch_tokens
GPU_BATCH_SIZE = 4_096  # texts per forward pass on a GPU, unless the job sets batch_size
# the GPU path's batching (texts grouped by width in the order they arrive, see Encoder.encode_pieces):
# part of a cuda encoder's cache key, so vectors batched another way are never mixed with these
GPU_BATCHING = 2


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
        self._staging = Staging(torch, self.device) if self.gpu else None
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
        batches = WidthBatches(self, batch_size, batch_tokens, len(lengths))
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
        batches = WidthBatches(self, batch_size, batch_tokens, rows)
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
