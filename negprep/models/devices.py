"""Which device a stage's model or index runs on: `embed.device`, `guide.device`, `search.device`.

`auto` (the default) is CUDA when the Ray cluster offers GPUs (a local Ray: when this machine has
one) and the CPU otherwise, and `dtype: auto` the fastest precision within tolerance there;
`cuda` with no GPU in the cluster is one line and exit 2 before any work starts. Imports nothing
but the standard library, so the GPU code (negprep.models.encoders, negprep.index.gpu_knn) stays importable
where Ray, faiss and polars are not installed.

`NEGPREP_CUDA_ON_CPU=1` is a test switch: code that was given CUDA runs its CUDA path (batching,
pinned copies, half-precision search) on CPU tensors, so CI, which has no GPU, runs the GPU code,
and Ray's scheduling is tested with logical GPUs (`ray start --num-gpus 1`).
"""

from __future__ import annotations

import os

from negprep.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
CUDA_ON_CPU = "NEGPREP_CUDA_ON_CPU"


def resolve_device(setting: str, gpus: float, key: str) -> str:
    """`cpu` or `cuda` for a device setting, given the GPUs the Ray cluster offers; `key` names the
    setting in the error."""
    if setting == "cpu":
        return "cpu"
    if setting == "cuda" and gpus <= 0:
        raise ConfigError(f"{key}: cuda, but the Ray cluster offers no GPU (use auto or cpu, or add GPU nodes)")
    return "cuda" if gpus > 0 else "cpu"


def wants_cuda(job) -> bool:
    """Whether any of the job's device settings (`embed`, `search`, `guide`) names cuda."""
    return "cuda" in (job.embed.device, job.search.device, job.guide.device if job.guide else "")


def job_devices(job, gpus: float) -> dict[str, str]:
    """The resolved device of the job's encoder (`embed`), guide and search; ConfigError for `cuda`
    without a GPU. An onnxruntime encoder and an ivf/hnsw index run on the CPU under `auto`."""
    def one(cfg, key: str, cpu_only: bool) -> str:
        return "cpu" if cpu_only and cfg.device == "auto" else resolve_device(cfg.device, gpus, key)

    out = {"embed": one(job.embed, "embed.device", job.embed.runtime == "onnxruntime"),
           "search": one(job.search, "search.device", job.search.index != "flat")}
    if job.guide is not None:
        g = job.guide
        out["guide"] = one(g, "guide.device", g.type == "biencoder" and g.runtime == "onnxruntime")
    for key, cfg in (("embed", job.embed), ("guide", job.guide)):
        if out.get(key) == "cuda":
            resolve_dtype(cfg.dtype, "cuda", cfg.runtime, f"{key}.dtype")
    return out


def resolve_dtype(dtype: str, device: str, runtime: str = "torch", key: str = "embed.dtype") -> str:
    """`auto` precision: the fastest one within tolerance (cosine to float32 >= 0.999, recall@10
    within half a point) on this device: bfloat16 on CUDA, and on a CPU that multiplies bfloat16
    natively (AVX-512 BF16 or AMX: benchmarks/embed_throughput.py, cosine >= 0.9999, 1.7x the
    float32 rate); float32 elsewhere and on onnxruntime. int8 is faster still but outside the
    tolerance (cosine down to 0.995), so only a job that names it gets it, and only on the CPU
    (ConfigError on CUDA, `key` naming the setting: its integer GEMM is a CPU kernel)."""
    if dtype == "int8" and device == "cuda":
        raise ConfigError(f"{key}: int8 runs on the CPU, but the device resolved to cuda (set the device to cpu, "
                          "or the dtype to auto, bfloat16 or float32)")
    if dtype != "auto":
        return dtype
    if runtime != "torch":
        return "float32"
    return "bfloat16" if device == "cuda" or cpu_multiplies_bfloat16() else "float32"


def cpu_multiplies_bfloat16() -> bool:
    """Whether this machine's CPU has native bfloat16 matrix instructions (Linux: /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_on_cpu() -> bool:
    """The test switch: run CUDA code paths on CPU tensors."""
    return os.environ.get(CUDA_ON_CPU, "") not in ("", "0")


def torch_device(device: str):
    """The torch device a resolved `device` runs on (the GPU Ray assigned this process is cuda:0,
    since Ray sets CUDA_VISIBLE_DEVICES to it)."""
    import torch

    if device == "cuda" and not cuda_on_cpu():
        return torch.device("cuda", 0)
    return torch.device("cpu")
