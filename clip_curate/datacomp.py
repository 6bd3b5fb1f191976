"""DataComp uid lists: the curated uids as the DataComp resharder reads them.

DataComp's baselines hand its resharder (``resharder.py --subset-file``) a ``.npy`` file of the kept
uids: a sorted numpy array of dtype ``[("u0", "<u8"), ("u1", "<u8")]``, each uid's 32 hex digits split
into its high and low 64 bits. clip-curate uids are 32 hex digits too (sha256(url, caption)[:16 bytes],
or the input's own ``uid`` column, which DataComp pools carry), so the round trip is exact.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from clip_curate.fields import ConfigError

UID_DTYPE = np.dtype([("u0", "<u8"), ("u1", "<u8")])


def uids_to_array(uids: Iterable[str]) -> np.ndarray:
    """Sorted ``(u8, u8)`` pairs of 32-hex-digit uids (duplicates kept once). ConfigError names a bad uid."""
    pairs = set()
    for uid in uids:
        text = str(uid).strip().lower()
        if len(text) != 32:
            raise ConfigError(f"--format datacomp-uids: uid {uid!r} is not 32 hex digits (DataComp's uid form)")
        try:
            pairs.add((int(text[:16], 16), int(text[16:], 16)))
        except ValueError:
            raise ConfigError(f"--format datacomp-uids: uid {uid!r} is not 32 hex digits (DataComp's uid form)") from None
    return np.array(sorted(pairs), dtype=UID_DTYPE)


def array_to_uids(array: np.ndarray) -> list[str]:
    """The 32-hex-digit uids of a DataComp uid array (the inverse of :func:`uids_to_array`)."""
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(array["u0"], array["u1"])]


def write_uids(uids: Iterable[str], path: str) -> int:
    """Write the sorted uid array to ``path`` (any fsspec path); returns how many uids."""
    import fsspec

    array = uids_to_array(uids)
    with fsspec.open(path, "wb") as f:
        np.save(f, array)
    return len(array)


def curated_uids(input_path: str) -> list[str]:
    """The uids of a clip-curate output's curated shards (``OUT`` or ``OUT/curated``)."""
    import fsspec
    import pyarrow.parquet as pq

    fs, root = fsspec.core.url_to_fs(input_path.rstrip("/"))
    if fs.isdir(root + "/curated"):
        root += "/curated"
    files = sorted(p for p in fs.glob(root + "/*.parquet") if not p.rsplit("/", 1)[-1].startswith(("_", ".")))
    if not files:
        raise ConfigError(f"--input {input_path!r}: no curated Parquet shards there (a clip-curate output?)")
    uids: list[str] = []
    for path in files:
        with fs.open(path, "rb") as f:
            uids.extend(pq.read_table(f, columns=["uid"]).column("uid").to_pylist())
    return uids
