"""Stage configuration: frozen dataclasses turned into CLI flags and YAML keys.

Each stage module declares ``@dataclass(frozen=True) class XConfig`` whose fields carry
``metadata={"help": ..., "flag": "--name" (optional), "parse": "csv"|"append" (optional),
"choices": (...) (optional)}``. ``add_config_arguments`` turns the fields into an argparse group and
``config_from_namespace`` builds the config back, so a flag, its YAML key and its config field are
the same thing declared once. Validation lives in each config's ``__post_init__`` and raises
``ConfigError`` with a message that names the flag and the fix.
"""
from __future__ import annotations

import argparse
import difflib
import dataclasses
import typing
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A user mistake in flags, YAML config or input: reported as one line, exit code 2."""


def opt(default: Any, help: str, **meta: Any) -> Any:  # noqa: A002 - mirrors argparse
    """Declare a config field with its CLI help (and optional flag/parse/choices)."""
    meta["help"] = help
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    """float | None -> float; tuple[str, ...] -> tuple."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {})  # annotations are simple builtins
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        return tuple
    return annotation


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, title: str) -> None:
    """Add one argparse group with a flag per field of ``config_cls``."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("cli") is False:
            continue
        kind = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
            help_text += f" (default: {'on' if f.default else 'off'})"
        elif kind is tuple:
            if f.metadata.get("parse") == "append":
                kw["action"] = "append"
                help_text += " (repeatable)"
            else:
                kw["type"] = _csv
                help_text += f" (comma-separated; default: {','.join(map(str, f.default)) or 'none'})"
        else:
            kw["type"] = kind if kind in (int, float, str) else str
            help_text += f" (default: {f.default})"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        group.add_argument(flag_name(f), help=help_text.replace("%", "%%"), **kw)


def config_keys(config_cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def coerce_value(config_cls: type, key: str, value: Any) -> Any:
    """Coerce a YAML value to the field's type, or raise ConfigError naming the key."""
    hints = typing.get_type_hints(config_cls)
    kind = _base_type(hints[key])
    optional = type(None) in typing.get_args(hints[key])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is tuple:
            if isinstance(value, str):
                return _csv(value)
            if isinstance(value, (list, tuple)):
                return tuple(value)
            raise TypeError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value) if kind is str else value
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}': expected {getattr(kind, '__name__', kind)}, got {value!r}"
        ) from None


def config_from_namespace(config_cls: type, ns: argparse.Namespace | dict) -> Any:
    """Build ``config_cls`` from parsed flags / merged YAML values (missing keys take defaults)."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else ns
    kwargs = {k: values[k] for k in config_keys(config_cls) if k in values}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    try:
        return config_cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def read_user_text(path: str, flag: str) -> str:
    """The UTF-8 text of a file named by ``flag`` (any Beam filesystem), or ConfigError naming the flag."""
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path) as f:
            data = f.read()
    except Exception:  # noqa: BLE001 - any filesystem's "not found"
        raise ConfigError(f"{flag}: cannot read {path}; pass an existing file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ConfigError line (exit 2), with no usage dump."""

    def error(self, message):  # one line, exit 2, no usage dump
        raise ConfigError(message)


def add_beam_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with every flag of every Beam PipelineOptions class added; returns it."""
    from apache_beam.options.pipeline_options import PipelineOptions

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
            pass  # an option declared by two classes
    return parser


#: Flags of earlier releases -> what replaced them (named in the error).
RENAMED_FLAGS = {"language_low_accuracy": "--language-accuracy low"}


def _renamed(flag: str) -> str:
    new = RENAMED_FLAGS.get(flag.split("=", 1)[0].lstrip("-").replace("-", "_"))
    return f"; it was replaced by {new}" if new else ""


def validate_beam_args(beam_args: Sequence[str]) -> None:
    """Error on flags that neither clip-curate nor any Beam PipelineOptions class knows."""
    parser = add_beam_options(argparse.ArgumentParser(add_help=False, allow_abbrev=False))
    _, unknown = parser.parse_known_args(list(beam_args))
    flags = [u for u in unknown if u.startswith("-")]
    if flags:
        renamed = _renamed(flags[0])
        raise ConfigError(f"unknown flag {flags[0]}{renamed}" if renamed else
                          f"unknown flag {flags[0]} (see clip-curate run --help; Beam options are passed through)")


# ---------------------------------------------------------------------------------------------
# YAML config files (clip-curate run --config FILE.yaml)

def _key_index(classes: list[tuple[str, type]]) -> dict[str, type]:
    index = {}
    for _, cls in classes:
        for key in config_keys(cls):
            index[key] = cls
    return index


#: Largest ``--config`` file read (a config is a few hundred bytes to a few KB).
MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only) that refuses aliases (``*name``, ``<<: *name``): an alias
    can expand a small file into an enormous document (the "billion laughs"), and a config never needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: aliases and "
                              "anchors are not accepted in config files; write the value out")
        return super().compose_node(parent, index)


def parse_yaml_text(text: str, where: str) -> Any:
    """Parse a small YAML document safely: plain data only, no aliases, no deep nesting (ConfigError)."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None


def load_yaml_config(path: str, classes: list[tuple[str, type]]) -> tuple[dict[str, Any], list[str]]:
    """YAML file -> (values by field name, beam args). Raises ConfigError naming the bad key."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path} ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_BYTES // (1 << 20)} MB; a config file holds "
                          "flag values, not data")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    data = parse_yaml_text(text, f"--config {path}")
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
            hint = _renamed(key) or (f"; did you mean '{close[0].replace('_', '-')}'?" if close else "")
            raise ConfigError(f"--config {path}: unknown key '{raw_key}'{hint}")
        values[key] = coerce_value(index[key], key, value)
    return values, beam_args


def _check_against_declared_schema(data: dict, path: str) -> None:
    """Types and choices of known keys, per ``schemas/config.json`` (generated from the configs)."""
    import jsonschema

    from clip_curate.schemas import load_declaration

    declared = load_declaration("config")["properties"]
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key in declared:
            errors = list(jsonschema.Draft202012Validator(declared[key]).iter_errors(value))
            if errors:
                raise ConfigError(f"--config {path}: key '{raw_key}': {errors[0].message}")


def _beam_scalar(value: Any, what: str, path: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        text = "true" if value is True else "false" if value is False else "" if value is None else str(value)
        if "\n" in text or len(text) > 4096:
            raise ConfigError(f"--config {path}: 'beam' {what}: value too long or spans lines")
        return text
    raise ConfigError(f"--config {path}: 'beam' {what}: expected a scalar (text, number, true/false), got "
                      f"{type(value).__name__}")


def _beam_args_from_yaml(value: Any, path: str) -> list[str]:
    """Beam flags from a config's ``beam:`` section: a list of ``--flag[=value]`` strings, or a mapping of
    known Beam option names to scalars or lists of scalars (a list repeats the flag). Anything else, and any
    option Beam does not know, is a ConfigError."""
    if isinstance(value, list):
        out = [_beam_scalar(v, f"item {i + 1}", path) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        out = []
        for k, v in value.items():
            if not isinstance(k, str) or not k.strip("-"):
                raise ConfigError(f"--config {path}: 'beam' keys must be Beam option names, got {k!r}")
            flag = "--" + k.lstrip("-")
            items = v if isinstance(v, list) else [v]
            for item in items:
                if item is True:
                    out.append(flag)
                elif item is not False:
                    out.append(f"{flag}={_beam_scalar(item, repr(k), path)}")
    else:
        raise ConfigError(f"--config {path}: 'beam' must be a list of flags or a mapping of Beam options")
    try:
        validate_beam_args(out)
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: 'beam': {exc}") from None
    return out
