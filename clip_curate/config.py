"""The run's configuration: one typed config per stage, the reader, the output and the run itself.

``parse_run_args`` turns ``clip-curate run`` flags and ``--config FILE.yaml`` into a validated
:class:`CurateConfig`. Precedence: stage defaults < YAML config < command-line flags. YAML keys are the
flag names with dashes or underscores (``min-clip-score`` or ``min_clip_score``); a ``beam:`` mapping or
list holds Beam pipeline options. Unknown keys and unknown flags are errors that name the key.

Cross-stage checks live here too: :func:`plan_passes` (``--chunk-rows``), :func:`check_environment`
(files and models every enabled stage needs, before any work) and :func:`resolve_judgments` (which of
the model judgments run, from the model's card: clip_curate.models.cards).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from clip_curate import stages as _stages  # noqa: F401 - registers the built-in stages
from clip_curate.audit.assemble import AuditConfig
from clip_curate.fields import (ConfigError, OneLineParser, add_config_arguments, config_from_namespace, load_yaml_config,
                                opt, validate_beam_args)
from clip_curate.models.cards import Judgment, card_for
from clip_curate.models.clip import ModelConfig, describe_model, has_clip_model, is_random_init, model_warning
from clip_curate.readers.base import ReaderConfig
from clip_curate.readers.curated import recorded_model
from clip_curate.stages.base import registered, stage_names
from clip_curate.stages.clip_score import card_judgment as clip_card_judgment
from clip_curate.stages.safety import card_judgment as safety_card_judgment
from clip_curate.writers import OutputConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """Which stages run and how the run behaves."""

    stages: tuple[str, ...] = opt(("all",), "stages to run: all, none, or a subset of "
                                            + ",".join(stage_names()) + " (read and write always run)")
    audit: bool = opt(False, "also compute the bias audit into OUT/audit/ at the end of the run")
    resume: bool = opt(False, "skip input rows already accounted for in OUT (curated or rejected), dedup the "
                              "new rows against OUT's rows, and write new shards beside the old ones")
    log_level: str = opt("INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    progress_seconds: float = opt(10.0, "seconds between progress lines (0 = off)")
    chunk_rows: int = opt(0, "run the input in passes of about this many rows (picked by uid hash), one Beam "
                             "job each, so a local run's memory stays flat however large the input; dedup "
                             "spans the passes; 0 = one pass")

    def __post_init__(self):
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 0:
            raise ConfigError(f"--chunk-rows must be an integer >= 0 (0 = one pass), got {self.chunk_rows!r}")
        known = stage_names()
        unknown = [s for s in self.stages if s not in ("all", "none") and s not in known]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from all,none,{','.join(known)}")

    def enabled(self) -> tuple[str, ...]:
        """The stages named by ``--stages``, in pipeline order."""
        if "all" in self.stages:
            return stage_names()
        return tuple(s for s in stage_names() if s in self.stages)


#: One typed field per registered stage (``cfg.stages.dedup`` is a ``DedupConfig``), made from the registry
#: so that a new stage needs no edit here.
StageConfigs = dataclasses.make_dataclass(
    "StageConfigs", [(s.name, s.config, dataclasses.field(default_factory=s.config)) for s in registered()],
    frozen=True)
StageConfigs.__module__ = __name__  # picklable by name, like a class written out here
StageConfigs.__doc__ = "Every stage's config, one typed field per registered stage."


@dataclass(frozen=True)
class CurateConfig:
    """Everything one ``clip-curate run`` needs to know."""

    reader: ReaderConfig
    output: OutputConfig
    run: RunConfig = RunConfig()
    stages: StageConfigs = dataclasses.field(default_factory=StageConfigs)
    audit: Optional[AuditConfig] = None
    judgments: tuple[str, ...] = ()   # what the model's card switched on and off (resolve_judgments)

    def stage(self, name: str) -> Any:
        """The config of stage ``name``."""
        return getattr(self.stages, name)

    @property
    def model(self) -> Optional[ModelConfig]:
        """The CLIP model this run embeds with: None when the embed stage is off or ``--clip-model none``."""
        embed = self.stages.embed
        return embed if "embed" in self.run.enabled() and has_clip_model(embed) else None


BASE_CONFIGS: tuple[tuple[str, type], ...] = (
    ("input", ReaderConfig), ("output", OutputConfig), ("run", RunConfig))


def all_config_classes() -> list[tuple[str, type]]:
    """(title, config class) of every flag group: input, output, run, each stage, audit."""
    return list(BASE_CONFIGS) + [(s.name, s.config) for s in registered()] + [("audit", AuditConfig)]


def plan_passes(cfg: CurateConfig, estimated_rows: int) -> int:
    """How many passes ``--chunk-rows`` makes of an input of ``estimated_rows`` (1 without it).

    Raises ConfigError for settings that need every row in one job (each stage says which)."""
    if not cfg.run.chunk_rows or estimated_rows <= cfg.run.chunk_rows:
        return 1
    for stage in registered():
        if stage.name in cfg.run.enabled() and stage.check_passes is not None:
            stage.check_passes(cfg.stage(stage.name), cfg)
    return -(-estimated_rows // cfg.run.chunk_rows)


def check_environment(cfg: CurateConfig) -> None:
    """Checks that need more than a config's own fields (files, models), run before any work starts."""
    for stage in registered():
        if stage.name in cfg.run.enabled() and stage.check is not None:
            stage.check(cfg.stage(stage.name))


#: stage -> its card judgment ``(config, card or None) -> (config, Judgment or None)``
CARD_JUDGMENTS: dict[str, Any] = {
    "clip": clip_card_judgment,
    "dedup": lambda cfg, card: cfg.card_judgment(card),
    "safety": safety_card_judgment,
}


def resolve_judgments(cfg: CurateConfig) -> CurateConfig:
    """Decide, from the model's card, which model judgments run: the effective stage and audit configs,
    and one line per judgment in ``judgments`` (written to stats.json). Logs the run's model warning
    (synthetic-tiny, random weights) and a warning for each uncovered judgment the user turned on."""
    model = cfg.model
    card = card_for(model) if model is not None else None
    lines: list[str] = []
    warnings: list[str] = []
    if model is not None:
        warning = model_warning(model)
        if warning:
            warnings.append(warning)
        if is_random_init(model):
            lines.append(f"model: {describe_model(model)} (--clip-pretrained none, on purpose): its scores mean "
                         "nothing")
        else:
            lines.append(f"model: {card.model} (card: {card.origin})")
    else:
        lines.append("model: none (--clip-model none, or no embed stage): no model judgments")

    def take(judgment: Optional[Judgment]) -> None:
        if judgment is not None:
            lines.append(judgment.line)
            if judgment.warning:
                warnings.append(judgment.warning)

    enabled = cfg.run.enabled()
    updates = {}
    for name, judge in CARD_JUDGMENTS.items():
        stage_cfg, judgment = judge(cfg.stage(name), card)
        updates[name] = stage_cfg
        if name in enabled:
            take(judgment)
    audit = cfg.audit
    if audit is not None:
        audit, judgment = audit.card_judgment(card)
        if cfg.run.audit:
            take(judgment)
    for w in warnings:
        log.warning("%s", w)
    return dataclasses.replace(cfg, stages=dataclasses.replace(cfg.stages, **updates), audit=audit,
                               judgments=tuple(lines))


def build_run_parser(prog: str = "clip-curate run") -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, allow_abbrev=False,
        description="Curate an image-caption URL list (or an existing pool) into curated + rejected Parquet. "
                    "Any other --flag is passed to Apache Beam (--runner, --direct_num_workers, --project, ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any of these flags as keys")
    for title, cls in all_config_classes():
        add_config_arguments(parser, cls, title)
    return parser


def parse_run_args(argv: Sequence[str]) -> tuple[CurateConfig, list[str]]:
    """argv -> (validated CurateConfig, Beam pipeline args)."""
    parser = build_run_parser()
    ns, beam_args = parser.parse_known_args(list(argv))
    classes = all_config_classes()
    values: dict[str, Any] = {}
    if ns.config:
        values, yaml_beam = load_yaml_config(ns.config, classes)
        beam_args = yaml_beam + list(beam_args)
    values.update({k: v for k, v in vars(ns).items() if k != "config"})
    validate_beam_args(beam_args)
    if values.get("clip_model") is None:  # no model named: a re-filter keeps the model that made its input
        recorded = recorded_model(values.get("input"), values.get("input_format") or "auto")
        if recorded:
            log.info("re-filter: using the input's model %s%s (recorded in its stats.json; --clip-model "
                     "chooses another)", recorded["clip_model"],
                     f" --clip-pretrained {recorded['clip_pretrained']}" if recorded["clip_pretrained"] else "")
            values["clip_model"] = recorded["clip_model"]
            if values.get("clip_pretrained") is None:
                values["clip_pretrained"] = recorded["clip_pretrained"]
    built = {title: config_from_namespace(cls, values) for title, cls in classes}
    stage_cfgs = StageConfigs(**{s.name: built[s.name] for s in registered()})
    cfg = CurateConfig(built["input"], built["output"], built["run"], stage_cfgs, built["audit"])
    return resolve_judgments(cfg), list(beam_args)


def print_error(prog: str, exc: BaseException) -> None:
    print(f"{prog}: error: {exc}", file=sys.stderr)
