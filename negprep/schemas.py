"""Data contracts: schemas/*.yaml loaded as Arrow schemas, and checks on read and write."""

from __future__ import annotations

import functools
from pathlib import Path

import pyarrow as pa
import yaml

from negprep.errors import InputError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

_TYPES = {
    "string": pa.string(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "binary16": pa.binary(16),  # a 128-bit hash
    "list<string>": pa.list_(pa.string()),
    "list<float32>": pa.list_(pa.float32()),
    "list<int32>": pa.list_(pa.int32()),
    # a passage of a grouped export (Tevatron's layout)
    "list<passage>": pa.list_(pa.struct([("docid", pa.string()), ("text", pa.string()), ("score", pa.float32())])),
}


@functools.cache
def spec(name: str) -> dict:
    """The YAML contract `schemas/<name>.yaml` as a dict."""
    with open(SCHEMA_DIR / f"{name}.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def schema(name: str, n: int | None = None, groups: tuple[str, ...] = ()) -> pa.Schema:
    """Arrow schema of contract `name`.

    Pattern fields (`negative_{i}`) are expanded for i = 1..n. Fields with a `group` (for example
    `group: guide`, present only when the job has a guide model) are included when their group is
    in `groups`.
    """
    fields = []
    for f in spec(name)["fields"]:
        if f.get("group") and f["group"] not in groups:
            continue
        typ = _TYPES[f["type"]]
        if "{i}" in f["name"]:
            if n is None:
                raise ValueError(f"schema {name} has pattern fields: pass n")
            fields += [pa.field(f["name"].format(i=i), typ) for i in range(1, n + 1)]
        else:
            fields.append(pa.field(f["name"], typ))
    return pa.schema(fields)


def conform(
    table: pa.Table, name: str, n: int | None = None, where: str = "", groups: tuple[str, ...] = ()
) -> pa.Table:
    """Return `table` with exactly the columns of contract `name`, in order, cast to its types.

    Raises InputError naming the missing column or the failed cast: writers call this so that no
    file leaves negprep unless it matches its contract.
    """
    target = schema(name, n, groups)
    missing = [f.name for f in target if f.name not in table.column_names]
    if missing:
        raise InputError(f"{where or name}: missing column(s) {', '.join(missing)} for schema {name}")
    cols = []
    for f in target:
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InputError(f"{where or name}: column {f.name} is {col.type}, expected {f.type}: {e}") from None
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=target)
