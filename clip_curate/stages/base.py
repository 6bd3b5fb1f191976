"""What every stage shares: the registry the composition reads, and the base a row stage builds on.

A stage module declares its config (a frozen dataclass of ``opt()`` fields), its pure core and its Beam
transform, then registers itself with one call::

    register(Stage("caption", CaptionConfig, build=lambda cfg, ctx: CaptionFilter(cfg), position=10))

``clip_curate.pipeline.build_pipeline`` runs the registered stages in ``position`` order and names none
of them. Every stage transform maps rows to ``(kept, rejected)``.

A stage that judges one row at a time subclasses :class:`RowFilter` (the DoFn) and wraps it in
:class:`RowStage` (the PTransform): the base owns the ``<stage>_in/_out/_<reason>`` counters, the
``<stage>_msecs`` busy-time distribution and the tagging of rejected rows.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import apache_beam as beam

from clip_curate import records
from clip_curate.fields import ConfigError


@dataclass(frozen=True)
class StageContext:
    """Run facts a stage's ``build`` may read besides its own config."""

    configs: Any                        # CurateConfig.stages: every stage's config, by stage name
    estimated_rows: int = 100_000       # rows this run reads (planning estimate)
    prior_shards: tuple[tuple[str, str], ...] = ()   # (sub, path) of an earlier output's shards (--resume, passes)
    embed_model: Optional[str] = None   # key of the model that makes this run's embeddings (None: no model)
    enabled: tuple[str, ...] = ()       # the stages that run, in order
    output: Optional[str] = None        # the run's output directory (a stage may write OUT/_stage_stats/<name>.json)


#: Capabilities a stage or a reader provides and a stage needs (see :attr:`Stage.provides`).
RAW_IMAGE = "raw_image"   # the downloaded image bytes (``image_bytes``), or a pool row's stored image
IMAGE = "image"           # the decoded, validated, resized image (``image``, ``width``, ``sha256``, ``phash``...)


@dataclass(frozen=True)
class Addon:
    """An extra step a stage contributes right after another stage (e.g. a cheap caption check that runs
    before any download). ``build(config, ctx)`` returns a ``rows -> (kept, rejected)`` transform or None."""

    after: str
    label: str
    build: Callable[[Any, StageContext], Optional[beam.PTransform]]


@dataclass(frozen=True)
class Stage:
    """One registered stage.

    ``build(config, ctx)`` returns the stage's ``rows -> (kept, rejected)`` transform, or None when its
    config leaves it nothing to do. ``provides``/``needs`` are capabilities (:data:`RAW_IMAGE`,
    :data:`IMAGE`): a stage whose ``provides`` the reader already supplies is skipped (a pool's rows hold
    their image: no download), and an ``auto`` stage is added when an enabled stage needs what it provides
    and its own needs are met by the reader. ``check(config)`` runs environment checks (files, models)
    before any work; ``check_passes(config, run_config)`` raises ConfigError when the stage cannot run in
    ``--chunk-rows`` passes; ``check_direct(config, run_config, running_mode, workers)`` raises ConfigError
    when the stage cannot run in that DirectRunner mode. ``decides_with_output``: rows this stage (and those after it) rejected in an
    earlier output take part in its decisions (dedup across runs)."""

    name: str
    config: type
    build: Callable[[Any, StageContext], Optional[beam.PTransform]]
    position: int
    provides: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()
    auto: bool = False
    check: Optional[Callable[[Any], None]] = None
    check_passes: Optional[Callable[[Any, Any], None]] = None
    check_direct: Optional[Callable[[Any, Any, str, int], None]] = None
    addons: tuple[Addon, ...] = ()
    title: str = ""


_REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the registry (its module calls this once, at import)."""
    if stage.name in _REGISTRY and _REGISTRY[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is registered twice")
    if stage.name not in records.REASONS:
        raise ValueError(f"stage {stage.name!r} has no rejection reasons in clip_curate.records.REASONS")
    _REGISTRY[stage.name] = stage
    return stage


def registered() -> tuple[Stage, ...]:
    """Every registered stage in pipeline order (importing ``clip_curate.stages`` registers the built-in ones)."""
    return tuple(sorted(_REGISTRY.values(), key=lambda s: s.position))


def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in registered())


def get(name: str) -> Stage:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; choose from {','.join(stage_names())}") from None


def names_from(name: str) -> tuple[str, ...]:
    """``name`` and every stage after it, in pipeline order."""
    order = stage_names()
    return order[order.index(name):]


def plan_stages(enabled: Iterable[str], supplied: frozenset[str]) -> tuple[tuple[str, ...], frozenset[str], list[str]]:
    """Resolve which stages run for a reader that supplies the capabilities ``supplied``.

    Returns ``(enabled, skipped, added)``: the enabled stage names in order (auto stages added), the names
    skipped because the reader already provides what they make, and the names that were added."""
    chosen = set(enabled)
    added: list[str] = []
    available = set(supplied)
    for stage in registered():
        if stage.name not in chosen:
            continue
        for need in sorted(stage.needs - available):
            provider = next((s for s in registered() if s.auto and need in s.provides
                             and s.position < stage.position and s.needs <= supplied), None)
            if provider is not None and provider.name not in chosen:
                chosen.add(provider.name)
                added.append(provider.name)
        available |= stage.provides
    order = tuple(s.name for s in registered() if s.name in chosen)
    skipped = frozenset(s.name for s in registered()
                        if s.name in chosen and s.provides and s.provides <= supplied)
    return order, skipped, added


# ---------------------------------------------------------------------------------------------
# The row stage base

@dataclass
class Verdict:
    """What a :class:`RowFilter` decided for one row: the row to pass on (possibly with new fields), and
    a rejection reason (None = kept) with its detail."""

    row: dict[str, Any]
    reason: Optional[str] = None
    detail: Any = ""


class RowFilter(beam.DoFn):
    """Base DoFn of a stage that judges rows one at a time.

    Subclasses set ``stage`` and implement :meth:`judge` (and optionally :meth:`load` for heavy
    resources, run once per DoFn instance on the worker). The base counts ``<stage>_in``,
    ``<stage>_out`` and ``<stage>_<reason>``, records per-row busy time in ``<stage>_msecs`` and emits
    rejected rows on the ``records.REJECTED_TAG`` output.
    """

    stage: str = ""

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = config
        if self.stage not in records.REASONS:
            raise ValueError(f"{type(self).__name__}.stage must name a stage of records.REASONS")

    def load(self) -> None:
        """Build heavy resources (models, detectors); runs once per worker DoFn instance."""

    def judge(self, row: dict[str, Any]) -> Verdict:  # pragma: no cover - abstract
        raise NotImplementedError

    def counter(self, name: str):
        """An extra counter ``<stage>_<name>`` in the project's metrics namespace."""
        return beam.metrics.Metrics.counter(records.METRICS_NAMESPACE, f"{self.stage}_{name}")

    def setup(self):
        ns = records.METRICS_NAMESPACE
        self._in = beam.metrics.Metrics.counter(ns, f"{self.stage}_in")
        self._out = beam.metrics.Metrics.counter(ns, f"{self.stage}_out")
        self._msecs = beam.metrics.Metrics.distribution(ns, f"{self.stage}_msecs")
        self._reasons = {r: beam.metrics.Metrics.counter(ns, f"{self.stage}_{r}") for r in records.REASONS[self.stage]}
        self._carry_ms = 0.0
        self.load()

    def process(self, row, *side) -> Iterator[Any]:
        self._in.inc()
        t0 = time.perf_counter()
        verdict = self.judge(row, *side)
        self.busy((time.perf_counter() - t0) * 1000)
        yield from self.emit(verdict)

    def busy(self, msecs: float) -> None:
        """Record one row's busy time in ``<stage>_msecs``. The distribution holds whole milliseconds; the
        fractions are carried to the next row, so the sum stays exact for rows of a few milliseconds."""
        self._carry_ms += msecs
        whole = int(self._carry_ms)
        self._carry_ms -= whole
        self._msecs.update(whole)

    def emit(self, verdict: Verdict) -> Iterator[Any]:
        """Count and route one verdict (for subclasses that override ``process``, e.g. batched ones)."""
        if verdict.reason is None:
            self._out.inc()
            yield verdict.row
        else:
            self._reasons[verdict.reason].inc()
            yield beam.pvalue.TaggedOutput(records.REJECTED_TAG,
                                           records.reject(verdict.row, self.stage, verdict.reason, verdict.detail))


class RowStage(beam.PTransform):
    """``rows -> (kept, rejected)`` through one :class:`RowFilter` (with optional side inputs)."""

    def __init__(self, fn: RowFilter, *side_inputs: Any, label: str | None = None):
        super().__init__()
        self._fn = fn
        self._side = side_inputs
        self._label = label or fn.stage.capitalize()

    def expand(self, rows):
        out = rows | self._label >> beam.ParDo(self._fn, *self._side).with_outputs(records.REJECTED_TAG,
                                                                                   main="kept")
        return out.kept, out[records.REJECTED_TAG]



class CounterSumFn(beam.CombineFn):
    """Counts summed over a PCollection: each element is a Counter, a mapping of counts or an iterable of keys
    (each counted once). The output is a plain dict; memory is bounded by the distinct keys, never by rows."""

    def create_accumulator(self):
        return Counter()

    def add_input(self, acc, element):
        acc.update(element)
        return acc

    def merge_accumulators(self, accs):
        it = iter(accs)
        out = next(it, Counter())
        for a in it:
            out.update(a)
        return out

    def extract_output(self, acc):
        return dict(acc)
