"""The cross-encoder guide's model: (query, passage) pairs -> relevance probabilities.

Imports torch, transformers and tokenizers only (no Ray), like the bi-encoder in `encoders`: the
guide stage runs it in actors, a GPU machine's device check can run it bare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from negprep.models.devices import torch_device
from negprep.models.encoders import load_model, prepared_masks_pass


class CrossEncoder:
    """A sequence-classification model scoring (query, passage) pairs; sigmoid of a single logit,
    or the probability of the last class for a multi-class head.

    On the CPU it tokenises its pairs itself (`score`). On CUDA it runs in `dtype` (auto: bfloat16)
    with SDPA where the model supports it, on pairs a CPU task tokenised (`pair_tokens`,
    `score_tokens`), and copies the scores back once per query shard."""

    def __init__(self, model_dir: str, max_length: int, threads: int, trust_remote_code: bool = False,
                 device: str = "cpu", dtype: str = "auto"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.gpu = device == "cuda"
        self.device = torch_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        kw = {"trust_remote_code": trust_remote_code}
        weights = torch.bfloat16 if cross_encoder_dtype(dtype, device) == "bfloat16" else torch.float32
        self.model = load_model(AutoModelForSequenceClassification, model_dir, weights, kw,
                                sdpa=self.gpu).eval().to(self.device)
        self.max_length = max_length
        self.pad_id = self.tokenizer.pad_token_id or 0
        self._mask_4d = self.gpu and prepared_masks_pass(self.model)

    def _probability(self, logits):
        logits = logits.float()
        return self.torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else logits.softmax(-1)[:, -1]

    def score(self, queries: list[str], passages: list[str], batch_size: int = 32) -> np.ndarray:
        torch = self.torch
        out = np.empty(len(queries), dtype=np.float32)
        order = np.argsort([len(q) + len(p) for q, p in zip(queries, passages, strict=True)], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer([queries[i] for i in idx], [passages[i] for i in idx], truncation=True,
                                     max_length=self.max_length, padding=True, return_tensors="pt")
                out[idx] = self._probability(self.model(**enc.to(self.device)).logits).cpu().numpy()
        return out

    def score_tokens(self, tokens: dict, batch_size: int, batch_tokens: int | None = None) -> np.ndarray:
        """Scores of pairs tokenised by `pair_tokens` (`flat` ids, `types` token type ids, `starts`,
        `lengths`), shortest first in batches of at most `batch_size` pairs and `batch_tokens`
        padded tokens; the scores stay on the device until the last batch."""
        torch = self.torch
        lengths = tokens["lengths"]
        n = len(lengths)
        order = np.argsort(lengths, kind="stable")
        out = torch.empty(n, dtype=torch.float32, device=self.device)
        start = 0
        with torch.inference_mode():
            while start < n:
                rows = min(batch_size, n - start)
                width = -(-int(lengths[order[start + rows - 1]]) // 8) * 8
                if batch_tokens and rows * width > batch_tokens:
                    rows = max(1, batch_tokens // width)
                    width = -(-int(lengths[order[start + rows - 1]]) // 8) * 8
                idx = order[start : start + rows]
                ids = np.full((rows, width), self.pad_id, dtype=np.int64)
                types = np.zeros((rows, width), dtype=np.int64)
                mask = np.zeros((rows, width), dtype=np.int64)
                for r, i in enumerate(idx):
                    a, m = int(tokens["starts"][i]), int(lengths[i])
                    ids[r, :m], types[r, :m], mask[r, :m] = tokens["flat"][a : a + m], tokens["types"][a : a + m], 1
                batch = {k: _to_device(torch, v, self.device) for k, v in
                         (("input_ids", ids), ("token_type_ids", types), ("attention_mask", mask))}
                if self._mask_4d:  # a prepared mask: transformers 5 does not check it on the host
                    batch["attention_mask"] = batch["attention_mask"].bool()[:, None, None, :]
                out[start : start + rows] = self._probability(self.model(**batch).logits)
                start += rows
        scores = np.empty(n, dtype=np.float32)
        scores[order] = out.cpu().numpy()
        return scores


def _to_device(torch, array: np.ndarray, device):
    """A numpy batch on `device`: from pinned memory without waiting on CUDA."""
    t = torch.from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def cross_encoder_dtype(dtype: str, device: str) -> str:
    """A cross-encoder's precision: bfloat16 when named, and under auto on CUDA; else float32."""
    return "bfloat16" if dtype == "bfloat16" or (dtype == "auto" and device == "cuda") else "float32"


_PAIR_TOKENIZERS: dict = {}  # per worker process: (model, max_length, remote code) -> tokenizer


def pair_tokenizer(model_dir: str, max_length: int, trust_remote_code: bool = False):
    """`tokenize(pairs)` -> (ids, token type ids) per (query, passage) pair, truncated longest
    first to `max_length`, from the model's tokenizer.json (the `tokenizers` library: no
    transformers import in a CPU task) or, without one, transformers' AutoTokenizer."""
    key = (model_dir, max_length, trust_remote_code)
    if key not in _PAIR_TOKENIZERS:
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file() and not trust_remote_code:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            tok.no_padding()
            tok.enable_truncation(max_length)

            def tokenize(pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
                return [(e.ids, e.type_ids) for e in tok.encode_batch(pairs)]
        else:
            from transformers import AutoTokenizer

            auto = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

            def tokenize(pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
                enc = auto([q for q, _ in pairs], [p for _, p in pairs], truncation=True, max_length=max_length,
                           padding=False, return_attention_mask=False, return_token_type_ids=True)
                return list(zip(enc["input_ids"], enc["token_type_ids"], strict=True))
        _PAIR_TOKENIZERS[key] = tokenize
    return _PAIR_TOKENIZERS[key]


def tokenize_pairs(model_dir: str, max_length: int, trust_remote_code: bool, pairs: list[tuple[str, str]]) -> dict:
    """(query, passage) pairs as token arrays for `CrossEncoder.score_tokens`: ids and token type
    ids end to end (`flat`, `types`), each pair's `starts` and `lengths`."""
    import itertools

    enc = pair_tokenizer(model_dir, max_length, trust_remote_code)(pairs)
    lengths = np.fromiter((len(ids) for ids, _ in enc), dtype=np.int64, count=len(enc))
    starts = np.zeros(len(enc), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    total = int(lengths.sum())
    flat = np.fromiter(itertools.chain.from_iterable(ids for ids, _ in enc), dtype=np.int32, count=total)
    types = np.fromiter(itertools.chain.from_iterable(t for _, t in enc), dtype=np.int8, count=total)
    return {"flat": flat, "types": types, "starts": starts, "lengths": lengths}
