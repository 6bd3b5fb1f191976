"""Shared test fixtures.

- ``run_transform``: run ``Create(rows) | transform`` on the DirectRunner (or another runner, via options) and
  collect its ``(kept, rejected)`` outputs and counters;
- ``jpeg``: JPEG bytes of an image, an array or seeded noise;
- ``served_world``: a synthetic world served on 127.0.0.1, with its URL list written as Parquet;
- ``local_net_flags``: the ``clip-curate run`` flags that let a run download from such a local server.

The fixtures are session-scoped functions, so module-scoped fixtures can use them too. Heavy imports
(Beam, the package) happen on first use: ``tests/test_docs.py`` and ``tests/test_layout.py`` need neither.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

# ---------------------------------------------------------------------------------------------
# run a transform, collect (kept, rejected)


class Ran(NamedTuple):
    kept: list[dict]
    rejected: list[dict]
    counters: dict[str, Any]   # metric name -> committed value: counters summed over steps, distributions' results
    wall: float                # seconds from p.run() to the end of wait_until_finish()


def run_transform(rows, transform, *, options=(), via_file=False, reshuffle=False, all_namespaces=False) -> Ran:
    """Run ``rows | transform`` (a PTransform returning ``(kept, rejected)``) in a real Beam pipeline.

    ``options``: Beam flags (``--direct_num_workers=2``, ``--runner=PortableRunner`` ...). ``via_file``: the rows
    are pickled to a file that the pipeline reads (a big ``Create`` bloats the job graph); ``reshuffle``: a
    ``Reshuffle`` before the transform. Metrics are the package's (``records.METRICS_NAMESPACE``), or every
    namespace's with ``all_namespaces``. Outputs come back through pickle files, so rows keep their types
    (bytes, arrays) and worker processes need not import the test module.
    """
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from clip_curate import records

    def _dump(items, path):  # nested: pickled by value, so worker processes need not import this file
        import pickle as _pickle

        with open(path, "wb") as f:
            _pickle.dump(list(items), f)

    def _load(path):
        import pickle as _pickle

        with open(path, "rb") as f:
            return _pickle.load(f)

    with tempfile.TemporaryDirectory() as tmp:
        p = beam.Pipeline(options=PipelineOptions(list(options)))
        if via_file:
            src = os.path.join(tmp, "rows.pkl")
            _dump(rows, src)
            pcoll = p | beam.Create([src]) | beam.FlatMap(_load)
        else:
            pcoll = p | beam.Create(list(rows))
        if reshuffle:
            pcoll = pcoll | beam.Reshuffle()
        kept, rejected = pcoll | transform
        for name, pc in (("kept", kept), ("rejected", rejected)):
            (pc | f"List{name}" >> beam.combiners.ToList()
             | f"Dump{name}" >> beam.Map(_dump, os.path.join(tmp, f"{name}.pkl")))
        t0 = time.monotonic()
        result = p.run()
        result.wait_until_finish()
        wall = time.monotonic() - t0
        out = {name: _load(os.path.join(tmp, f"{name}.pkl")) for name in ("kept", "rejected")}
    counters: dict[str, Any] = {}
    try:
        wanted = MetricsFilter() if all_namespaces else MetricsFilter().with_namespace(records.METRICS_NAMESPACE)
        query = result.metrics().query(wanted)
        for c in query["counters"]:
            counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed
        for d in query["distributions"]:
            counters[d.key.metric.name] = d.committed
    except Exception:  # noqa: BLE001 - some runners report no metrics
        pass
    return Ran(out["kept"], out["rejected"], counters, wall)


@pytest.fixture(scope="session", name="run_transform")
def run_transform_fixture():
    """:func:`run_transform`: ``run_transform(rows, transform, options=...) -> Ran(kept, rejected, counters, wall)``."""
    return run_transform


# ---------------------------------------------------------------------------------------------
# JPEG bytes


def make_jpeg(source, *, shape=(40, 52), quality=90, max_side=None) -> bytes:
    """JPEG bytes (RGB) of ``source``: a PIL image, a uint8 array, or an int seed for uniform noise of
    ``shape`` (height, width). ``max_side``: shrink to fit a square of that side first (``thumbnail``)."""
    import numpy as np
    from PIL import Image

    if isinstance(source, (int, np.integer)):
        source = np.random.default_rng(source).integers(0, 255, (*shape, 3), dtype=np.uint8)
    img = (source if isinstance(source, Image.Image) else Image.fromarray(source)).convert("RGB")
    if max_side is not None:
        img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def jpeg():
    """:func:`make_jpeg`: ``jpeg(image_or_array_or_seed, shape=(h, w), quality=90, max_side=None) -> bytes``."""
    return make_jpeg


# ---------------------------------------------------------------------------------------------
# a synthetic world served on 127.0.0.1


@dataclasses.dataclass
class ServedWorld:
    world: Any          # clip_curate.synthetic.world.World
    server: Any         # the running clip_curate.synthetic.webserver.WebServer
    table: Any          # pyarrow.Table: the URL list as written to ``urls``
    urls: Path          # <directory>/urls.parquet


@contextlib.contextmanager
def serve_world(directory, n, seed, *, routes=None, delay_s=0.0, include_uid=True, columns=None, faults=(),
                fault_caption="fault {i}", **world_kwargs):
    """Generate ``generate_world(n, seed, **world_kwargs)``, serve it on 127.0.0.1 and write its URL list to
    ``directory/urls.parquet``; yields a :class:`ServedWorld` while the server runs.

    ``routes``: extra routes (``fault_routes()``...), under the world's own. ``delay_s``: every answer with a
    body (status 200) waits that long. ``include_uid``/``columns``: which columns of ``World.to_url_table``
    the URL list keeps. ``faults``: paths appended to the list as ``<path>?i=<i>``, captioned
    ``fault_caption.format(i=i)``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clip_curate.synthetic import world as world_mod
    from clip_curate.synthetic.webserver import WebServer

    world = world_mod.generate_world(n, seed, **world_kwargs)
    own = world_mod.world_routes(world)
    if delay_s:
        own = {path: (dataclasses.replace(r, delay_s=delay_s) if r.status in (0, 200) and r.body else r)
               for path, r in own.items()}
    with WebServer({**(routes or {}), **own}) as srv:
        table = world.to_url_table(srv.base_url, include_uid=include_uid)
        if columns is not None:
            table = table.select(list(columns))
        if faults:
            extra = [{"url": srv.url(f"{path}?i={i}"), "caption": fault_caption.format(i=i)}
                     for i, path in enumerate(faults)]
            table = pa.concat_tables([table, pa.Table.from_pylist(extra, table.schema)])
        urls = Path(directory) / "urls.parquet"
        pq.write_table(table, urls)
        yield ServedWorld(world, srv, table, urls)


@pytest.fixture(scope="session")
def served_world():
    """:func:`serve_world`: ``with served_world(tmp, n, seed, **options) as web: web.urls, web.table ...``."""
    return serve_world


# ---------------------------------------------------------------------------------------------
# flags for runs against a local server


def local_flags(*, respect_robots_txt=False, host_failure_limit=None) -> list[str]:
    """``clip-curate run`` flags for downloading from 127.0.0.0/8 at full speed: private addresses allowed,
    no per-host rate limit, robots.txt ignored (unless ``respect_robots_txt``), and with ``host_failure_limit``
    the per-host circuit breaker's limit (0: never cut a host off)."""
    flags = ["--allow-private-addresses", "--per-host-rps", "0"]
    if not respect_robots_txt:
        flags.append("--no-respect-robots-txt")
    if host_failure_limit is not None:
        flags += ["--host-failure-limit", str(host_failure_limit)]
    return flags


@pytest.fixture(scope="session")
def local_net_flags():
    """:func:`local_flags`: ``local_net_flags(respect_robots_txt=False, host_failure_limit=None) -> [flags]``."""
    return local_flags
