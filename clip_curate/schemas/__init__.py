"""Record schemas declared in ``schemas/*.json`` turned into pyarrow schemas.

The JSON files are the one source of truth: the reader, the writers, the tests and the README use them.
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, Iterable

import pyarrow as pa

_TYPES = {
    "string": pa.string(), "binary": pa.binary(), "bool": pa.bool_(),
    "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64(),
    "list<float32>": pa.list_(pa.float32()),
    "list<string>": pa.list_(pa.string()),
}


@functools.lru_cache(maxsize=None)
def load_declaration(name: str) -> dict:
    """The parsed ``schemas/<name>.json`` (shipped as package data ``clip_curate.schemas``)."""
    text = resources.files("clip_curate.schemas").joinpath(f"{name}.json").read_text("utf-8")
    return json.loads(text)


def arrow_schema(name: str, extra_fields: Iterable[pa.Field] = (), drop: Iterable[str] = ()) -> pa.Schema:
    """pyarrow schema for a declared row schema plus carried-through input columns."""
    dropped = set(drop)
    fields = [
        pa.field(f["name"], _TYPES[f["type"]], nullable=f.get("nullable", True))
        for f in load_declaration(name)["fields"] if f["name"] not in dropped
    ]
    names = {f.name for f in fields}
    fields.extend(f for f in extra_fields if f.name not in names)
    return pa.schema(fields)


def field_names(name: str) -> list[str]:
    return [f["name"] for f in load_declaration(name)["fields"]]


def curated_schema(extra_fields: Iterable[pa.Field] = (), store_embeddings: bool = True) -> pa.Schema:
    drop = () if store_embeddings else ("image_embedding", "text_embedding")
    return arrow_schema("curated_row", extra_fields, drop)


def rejected_schema(extra_fields: Iterable[pa.Field] = (), store_embeddings: bool = True) -> pa.Schema:
    drop = () if store_embeddings else ("image_embedding", "text_embedding")
    return arrow_schema("rejected_row", extra_fields, drop)


def project(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """Keep exactly the schema's fields (missing ones as None), converting numpy scalars/arrays."""
    out = {}
    for name in schema.names:
        value = row.get(name)
        if value is not None and hasattr(value, "tolist"):
            value = value.tolist()
        out[name] = value
    return out
