"""Parse ``clip-curate run`` flags and ``--config FILE.yaml`` into a validated ``CurateConfig``.

Precedence: stage defaults < YAML config < command-line flags. YAML keys are the flag names with
dashes or underscores (``min-clip-score`` or ``min_clip_score``); a ``beam:`` mapping or list holds
Beam pipeline options. Unknown keys and unknown flags are errors that name the key.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, Sequence

import yaml

from clip_curate.options import ConfigError, add_config_arguments, coerce_value, config_from_namespace, config_keys
from clip_curate.pipeline import CurateConfig, RunConfig, stage_config_classes
from clip_curate.reader import ReaderConfig
from clip_curate.writer import OutputConfig

BASE_CONFIGS: tuple[tuple[str, type], ...] = (
    ("input", ReaderConfig), ("output", OutputConfig), ("run", RunConfig))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise ConfigError(message)


def all_config_classes() -> list[tuple[str, type]]:
    from clip_curate.audit import AuditConfig
    return list(BASE_CONFIGS) + list(stage_config_classes().items()) + [("audit", AuditConfig)]


def build_run_parser(prog: str = "clip-curate run") -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog, allow_abbrev=False,
        description="Curate an image-caption URL list (or an existing pool) into curated + rejected Parquet. "
                    "Any other --flag is passed to Apache Beam (--runner, --direct_num_workers, --project, ...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with any of these flags as keys")
    for title, cls in all_config_classes():
        add_config_arguments(parser, cls, title)
    return parser


def _key_index(classes: list[tuple[str, type]]) -> dict[str, type]:
    index = {}
    for _, cls in classes:
        for key in config_keys(cls):
            index[key] = cls
    return index


def load_yaml_config(path: str, classes: list[tuple[str, type]]) -> tuple[dict[str, Any], list[str]]:
    """YAML file -> (values by field name, beam args). Raises ConfigError naming the bad key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    index = _key_index(classes)
    _check_against_declared_schema(data, path)
    values: dict[str, Any] = {}
    beam_args: list[str] = []
    for raw_key, value in data.items():
        if raw_key == "beam":
            beam_args.extend(_beam_args_from_yaml(value, path))
            continue
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in index:
            close = difflib.get_close_matches(key, list(index), n=1)
            hint = f"; did you mean '{close[0].replace('_', '-')}'?" if close else ""
            raise ConfigError(f"--config {path}: unknown key '{raw_key}'{hint}")
        values[key] = coerce_value(index[key], key, value)
    return values, beam_args


def _check_against_declared_schema(data: dict, path: str) -> None:
    """Types and choices of known keys, per ``schemas/config.json`` (generated from the configs)."""
    import jsonschema

    from clip_curate.schema import load_declaration

    declared = load_declaration("config")["properties"]
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key in declared:
            errors = list(jsonschema.Draft202012Validator(declared[key]).iter_errors(value))
            if errors:
                raise ConfigError(f"--config {path}: key '{raw_key}': {errors[0].message}")


def _beam_args_from_yaml(value: Any, path: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            flag = "--" + str(k).lstrip("-")
            out.extend([flag] if v is True else [] if v is False else [f"{flag}={v}"])
        return out
    raise ConfigError(f"--config {path}: 'beam' must be a list of flags or a mapping")


def validate_beam_args(beam_args: Sequence[str]) -> None:
    """Error on flags that neither clip-curate nor any Beam PipelineOptions class knows."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    seen: set[type] = set()
    stack = list(PipelineOptions.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        try:
            cls._add_argparse_args(parser)
        except argparse.ArgumentError:
            pass  # options declared by two classes
    _, unknown = parser.parse_known_args(list(beam_args))
    flags = [u for u in unknown if u.startswith("-")]
    if flags:
        raise ConfigError(f"unknown flag {flags[0]} (see clip-curate run --help; Beam options are passed through)")


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
    built = {title: config_from_namespace(cls, values) for title, cls in classes}
    stages = {title: cfg for title, cfg in built.items() if title not in dict(BASE_CONFIGS) and title != "audit"}
    return CurateConfig(built["input"], built["output"], built["run"], stages, built["audit"]), list(beam_args)


def print_error(prog: str, exc: BaseException) -> None:
    print(f"{prog}: error: {exc}", file=sys.stderr)
