"""Texts to token ids, as the encoders and the CPU tasks that tokenise for a GPU make them: one
tokenizer per process, texts in chunks, a shard's rows in pieces (`piece_bounds`). Imports numpy
and, lazily, tokenizers or transformers: a CPU task starts tokenising at once."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

PIECE_ROWS = 2048  # most rows per tokenising task on CUDA (first 256, 512, 1024: the GPU starts at once)
TOKENIZE_CHUNK = 512  # texts per tokenizer call

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
