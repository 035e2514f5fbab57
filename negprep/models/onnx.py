"""Exporting an encoder to ONNX for `embed.runtime: onnxruntime`.

The export (torch's TorchScript-based ONNX exporter, then `quantize_onnx` for int8) runs once per
model and settings, in a child process that the embed stage (or a bi-encoder guide) starts before
its actors: neither the driver nor any Ray worker imports torch for it, and its memory is gone
before the first actor starts. An onnxruntime actor
then holds onnxruntime, the tokenizer and the model (measured on MiniLM int8 in a SciFact job: the
actor peaked at 407 MB, against 789 MB for torch int8).

The export lives in the work folder under `models/<key>/` (model.onnx, tokenizer.json, meta.json,
then `_SUCCESS`), so every node's actors read the same file, as they read every other stage's.
The graph ends at the last hidden states: onnxruntime's reductions take another path for a batch
of one row, so pooling in the graph would make an embedding depend on its batch; the encoder pools
in numpy instead (measured: 195 of 200 texts differed in the last bits embedded alone).
The model is exported with transformers' eager attention: the SDPA path exports a NaN guard
(`IsNaN`, `Where`) over every attention score that took a quarter of onnxruntime's time (measured
on MiniLM int8, 400 SciFact passages: 12.3 -> 8.7 s).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from negprep.errors import NegprepError
from negprep.paths import Folder

FILES = ("model.onnx", "tokenizer.json", "meta.json")
OPSET = 17
VERSION = 2  # bump when the exported graph changes for the same settings


def export_key(spec) -> str:
    """What the exported graph depends on: the weights and the precision."""
    s = json.dumps([spec.fingerprint, spec.dtype, spec.trust_remote_code, OPSET, VERSION])
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def ensure_exported(spec, folder: Folder) -> bool:
    """Export `spec`'s model into `folder` unless it is already there; True when it exported."""
    if folder.exists("_SUCCESS"):
        return False
    with tempfile.TemporaryDirectory(prefix="negprep-export-") as tmp:
        args = [sys.executable, "-m", "negprep.models.onnx", spec.model_dir, spec.dtype, str(spec.trust_remote_code),
                tmp]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(args, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise NegprepError(f"exporting {spec.model_dir} to ONNX ({spec.dtype}) failed: {last}")
        for name in FILES:
            folder.write_bytes(name, Path(tmp, name).read_bytes())
    folder.write_bytes("_SUCCESS", b"")
    return True


def export(model_dir: str, dtype: str, trust_remote_code: bool, out: str) -> None:
    """Write `out`/model.onnx (token ids and mask in, last hidden states out), tokenizer.json
    and meta.json for a transformers encoder. Runs in the child process `ensure_exported` starts."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise NegprepError(f"{model_dir}: onnxruntime needs a fast tokenizer (tokenizer.json); use runtime: torch")
    encoder = AutoModel.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                        attn_implementation="eager").eval()  # see the module's docstring

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, 16, dtype=torch.int64)
    dynamic = {0: "rows", 1: "width"}
    path = Path(out, "model.onnx")
    with torch.inference_mode():
        torch.onnx.export(Hidden(), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "hidden": dynamic})
    if dtype == "int8":
        import onnx

        from negprep.models.quantize import quantize_onnx

        graph = onnx.load(str(path))
        quantize_onnx(graph)
        onnx.save(graph, str(path))
    tokenizer.backend_tokenizer.save(str(Path(out, "tokenizer.json")))
    meta = {"pad_id": tokenizer.pad_token_id or 0, "dim": encoder.config.hidden_size, "dtype": dtype}
    Path(out, "meta.json").write_text(json.dumps(meta))


if __name__ == "__main__":
    m, dt, trust, dst = sys.argv[1:5]
    export(m, dt, trust == "True", dst)
