"""An encoder's batches by padded width (`WidthBatches`), and the pinned host memory a CUDA encoder
copies them through (`Staging`). Why the widths: see `WidthBatches`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from negprep.models.encoders import Encoder

PAD_STEP = 8  # token widths are rounded up to a multiple of this (see Encoder.encode)


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
# With batch_tokens, wide batches are also held to this many attention scores per head (rows x
# width^2): at width 256, 4 rows instead of 8. As fast (interleaved runs), and onnxruntime's arena,
# which keeps its largest batch's buffers, peaks 50 MB lower on SciFact.
ATTENTION_CELLS = 1 << 18


class WidthBatches:
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


class Staging:
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
