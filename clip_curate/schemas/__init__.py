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
    # Hugging Face ``datasets``' Image feature: image bytes (and a path, null here)
    "image": pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
}

#: ``fixed_size_list<float32>`` fields take their width from the run's model; a variable list when unknown.
FIXED_FLOATS = "fixed_size_list<float32>"
EMBEDDING_FIELDS = ("image_embedding", "text_embedding")


def _arrow_type(type_name: str, width: int | None) -> pa.DataType:
    if type_name == FIXED_FLOATS:
        return pa.list_(pa.float32(), width) if width else pa.list_(pa.float32())
    return _TYPES[type_name]


@functools.lru_cache(maxsize=None)
def load_declaration(name: str) -> dict:
    """The parsed ``schemas/<name>.json`` (shipped as package data ``clip_curate.schemas``)."""
    text = resources.files("clip_curate.schemas").joinpath(f"{name}.json").read_text("utf-8")
    return json.loads(text)


def arrow_schema(name: str, extra_fields: Iterable[pa.Field] = (), drop: Iterable[str] = (),
                 embed_dim: int | None = None) -> pa.Schema:
    """pyarrow schema for a declared row schema plus carried-through input columns, with the ``huggingface``
    metadata ``datasets`` writes (so ``image`` loads as an Image feature). ``embed_dim``: the width of the
    embedding columns (``fixed_size_list<float32>[d]``; a variable list when None)."""
    dropped = set(drop)
    fields = [
        pa.field(f["name"], _arrow_type(f["type"], embed_dim), nullable=f.get("nullable", True))
        for f in load_declaration(name)["fields"] if f["name"] not in dropped
    ]
    names = {f.name for f in fields}
    fields.extend(f for f in extra_fields if f.name not in names)
    return with_hf_features(pa.schema(fields))


def field_names(name: str) -> list[str]:
    return [f["name"] for f in load_declaration(name)["fields"]]


def _schema_for(name: str, extra_fields, store_embeddings: bool, embed_dim: int | None,
                embeddings: bool) -> pa.Schema:
    drop = () if store_embeddings and embeddings else EMBEDDING_FIELDS
    return arrow_schema(name, extra_fields, drop, embed_dim)


def curated_schema(extra_fields: Iterable[pa.Field] = (), store_embeddings: bool = True,
                   embed_dim: int | None = None, embeddings: bool = True) -> pa.Schema:
    """Schema of OUT/curated shards; ``embeddings=False`` (no model) leaves the embedding columns out."""
    return _schema_for("curated_row", extra_fields, store_embeddings, embed_dim, embeddings)


def rejected_schema(extra_fields: Iterable[pa.Field] = (), store_embeddings: bool = True,
                    embed_dim: int | None = None, embeddings: bool = True) -> pa.Schema:
    """Schema of OUT/rejected shards (see :func:`curated_schema`)."""
    return _schema_for("rejected_row", extra_fields, store_embeddings, embed_dim, embeddings)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets features (schema metadata ``huggingface``)

_HF_VALUES = {pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary",
              pa.large_binary(): "large_binary", pa.bool_(): "bool", pa.int8(): "int8", pa.int16(): "int16",
              pa.int32(): "int32", pa.int64(): "int64", pa.uint8(): "uint8", pa.uint16(): "uint16",
              pa.uint32(): "uint32", pa.uint64(): "uint64", pa.float16(): "float16", pa.float32(): "float32",
              pa.float64(): "float64"}


def _hf_feature(t: pa.DataType) -> dict | None:
    """The ``datasets`` feature dict of an arrow type (as ``datasets`` writes it), None when unmapped."""
    if t == _TYPES["image"]:
        return {"_type": "Image"}
    if t in _HF_VALUES:
        return {"dtype": _HF_VALUES[t], "_type": "Value"}
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        inner = _hf_feature(t.value_type)
        if inner is None:
            return None
        out = {"feature": inner, "_type": "Sequence"}
        if pa.types.is_fixed_size_list(t):
            out["length"] = t.list_size
        return out
    return None


def hf_features(schema: pa.Schema) -> dict[str, dict]:
    """``{column: feature}`` of the columns ``datasets`` has a feature for (others it infers itself)."""
    out = {}
    for f in schema:
        feature = _hf_feature(f.type)
        if feature is not None:
            out[f.name] = feature
    return out


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``huggingface`` metadata ``datasets`` writes: ``{"info": {"features": ...}}``."""
    meta = dict(schema.metadata or {})
    meta[b"huggingface"] = json.dumps({"info": {"features": hf_features(schema)}}).encode()
    return schema.with_metadata(meta)


def image_bytes(value: Any) -> bytes | None:
    """The image bytes of a stored ``image`` value: the ``{bytes, path}`` struct (this layout) or plain
    bytes (outputs written before it)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return None if value is None else bytes(value)


def project(row: dict[str, Any], schema: pa.Schema) -> dict[str, Any]:
    """Keep exactly the schema's fields (missing ones as None), converting numpy scalars/arrays; image bytes
    become the ``{bytes, path}`` struct of an ``image`` column of that type."""
    out = {}
    for name in schema.names:
        value = row.get(name)
        if value is not None and hasattr(value, "tolist"):
            value = value.tolist()
        out[name] = value
    if out.get("image") is not None and not isinstance(out["image"], dict) \
            and schema.field("image").type == _TYPES["image"]:
        out["image"] = {"bytes": bytes(out["image"]), "path": None}
    return out
