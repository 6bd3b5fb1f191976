"""``clip-curate`` command line: run, demo, audit, export, evaluate, train-tiny."""
from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
from typing import Callable, Sequence

from clip_curate.fields import ConfigError

USAGE = """usage: clip-curate COMMAND [flags]

commands:
  run         curate a URL list or an image pool: curated + rejected Parquet, stats.json
  demo        run the full pipeline on a local synthetic web with the bundled tiny model
  audit       (re)compute the bias audit (audit.json + report.html) of an output directory
  export      write curated rows as WebDataset tar shards for open_clip training
  evaluate    proxy evaluation: train a tiny CLIP on raw vs curated pairs, compare zero-shot accuracy
  train-tiny  train the bundled synthetic-tiny CLIP model on the synthetic world
  entries     build an entry list for --balance-entries (WordNet noun lemmas)

Run 'clip-curate COMMAND --help' for the flags of a command; 'clip-curate --version' for the version.
"""


def version() -> str:
    """The installed clip-curate version."""
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("clip-curate")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


# ---------------------------------------------------------------------------------------------
# Beam options: one line and a hint for each mistake, before any work starts

class _BeamOptionError(Exception):
    pass


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise _BeamOptionError(message)


def beam_option_parser() -> argparse.ArgumentParser:
    """An argparse parser that knows every Beam PipelineOptions flag (and raises instead of exiting)."""
    from clip_curate.fields import add_beam_options

    return add_beam_options(_RaisingParser(add_help=False, allow_abbrev=False))


def _command_parser(command: str) -> argparse.ArgumentParser | None:
    if command == "run":
        from clip_curate.config import build_run_parser

        return build_run_parser()
    if command == "audit":
        from clip_curate.audit.assemble import build_arg_parser

        return build_arg_parser()
    return None


def check_beam_options(command: str, argv: Sequence[str]) -> None:
    """ConfigError (one line, with the fix) for a Beam option a command would pass on but Beam refuses: an
    unknown runner (the valid ones listed), a bad value (the option named), a dashed spelling of an
    underscore option (the right spelling suggested)."""
    own = _command_parser(command)
    if own is None or any(a in ("-h", "--help") for a in argv):
        return
    _, rest = own.parse_known_args(list(argv))
    if not rest:
        return
    beam = beam_option_parser()
    known = {s for action in beam._actions for s in action.option_strings}
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and "-" in flag[2:] and flag not in known:
            underscore = "--" + flag[2:].replace("-", "_")
            if underscore in known:
                raise ConfigError(f"unknown flag {flag}: Beam options are spelled with underscores; did you mean "
                                  f"{underscore}?")
    try:
        ns, _ = beam.parse_known_args(list(rest))
    except _BeamOptionError as exc:
        raise ConfigError(f"Beam option: {exc}") from None
    runner = getattr(ns, "runner", None)
    if runner and "." not in str(runner):
        from apache_beam.options.pipeline_options import StandardOptions
        from apache_beam.runners.runner import _RUNNER_MAP

        name = str(runner).lower()
        if name not in _RUNNER_MAP and name + "runner" not in _RUNNER_MAP:
            close = difflib.get_close_matches(str(runner), StandardOptions.KNOWN_RUNNER_NAMES, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"--runner {runner}: unknown runner; {hint}valid runners: "
                              f"{', '.join(StandardOptions.KNOWN_RUNNER_NAMES)} (or a PipelineRunner's full "
                              "module path)")


def _cmd_run(argv: Sequence[str]) -> int:
    from clip_curate.run import run
    from clip_curate.stats import format_summary

    stats = run(argv)
    print(format_summary(stats))
    print(f"outputs: {stats.get('config', {}).get('output', {}).get('output')}")
    return 0


def _lazy(module: str, func: str) -> Callable[[Sequence[str]], int]:
    def call(argv: Sequence[str]) -> int:
        return getattr(importlib.import_module(module), func)(list(argv))
    return call


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "run": _cmd_run,
    "demo": _lazy("clip_curate.synthetic.demo", "main"),
    "audit": _lazy("clip_curate.audit.assemble", "main"),
    "export": _lazy("clip_curate.export", "main"),
    "evaluate": _lazy("clip_curate.synthetic.evaluate", "main"),
    "train-tiny": _lazy("clip_curate.synthetic.train", "main"),
    "entries": _lazy("clip_curate.stages.balance", "main"),
}


#: Beam's local job service (DirectRunner multi-process mode) re-logs every worker log line at INFO.
BEAM_WORKER_ECHO_LOGGER = "apache_beam.runners.portability.local_job_service"


class QuietBeamWorkerEcho(logging.Filter):
    """Keep the worker lines a user needs (clip-curate's own, and Beam's warnings and errors); drop the
    SDK harness chatter the local job service echoes at INFO."""

    #: warnings every local worker prints at start-up, harmless for a local run
    BENIGN = ("No semi_persistent_directory found", "Discarding unparseable args")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(b in msg for b in self.BENIGN):
            return False
        location = msg.rsplit("log_location:", 1)[-1] if "log_location:" in msg else ""
        keep = (record.levelno >= logging.WARNING or "/clip_curate/" in location
                or any(f"severity: {s}" in msg for s in ("WARN", "ERROR", "CRITICAL")))
        if keep:
            unwrap_worker_record(record)
        return keep


_ENVELOPE_MESSAGE = re.compile(r'\bmessage: "((?:[^"\\]|\\.)*)"')
_ENVELOPE_SEVERITY = re.compile(r"\bseverity: ([A-Z]+)")
_ENVELOPE_LOCATION = re.compile(r'\blog_location: "([^"]*)"')
_SEVERITIES = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "NOTICE": logging.INFO,
               "WARN": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def _unescape(text: str) -> str:
    """Undo the protobuf text-format escapes of a log message (``\\"``, ``\\n``, octal UTF-8 bytes)."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeError, ValueError):
        return text


def unwrap_worker_record(record: logging.LogRecord) -> None:
    """Turn a worker line the local job service echoes (``Worker: severity: INFO timestamp { ... } message:
    "..." instruction_id ... log_location ...``) into the worker's own message, level and logger name."""
    msg = record.getMessage()
    if not msg.startswith("Worker:"):
        return
    found = _ENVELOPE_MESSAGE.search(msg)
    if found is None:
        return
    record.msg, record.args = _unescape(found.group(1)), ()
    severity = _ENVELOPE_SEVERITY.search(msg)
    if severity and severity.group(1) in _SEVERITIES:
        record.levelno = _SEVERITIES[severity.group(1)]
        record.levelname = logging.getLevelName(record.levelno)
    location = _ENVELOPE_LOCATION.search(msg)
    if location and "/clip_curate/" in location.group(1):
        module = location.group(1).rsplit("/clip_curate/", 1)[-1].split(":")[0]
        record.name = "clip_curate." + module[:-3].replace("/", ".") if module.endswith(".py") else record.name


#: Commands that run Beam pipelines.
BEAM_COMMANDS = ("run", "demo", "audit")


def hide_ipython() -> None:
    """A command line is no IPython session: make ``import IPython`` fail for this process (and the workers
    forked from it). Beam imports IPython where it is installed, optionally, twice: through BigQuery's
    notebook progress bars (tqdm.notebook) and to ask whether a pipeline is built inside a notebook; ~0.6 CPU
    s of every run's start-up. A no-op where IPython is already loaded (clip-curate called from a notebook)."""
    if "IPython" not in sys.modules:
        sys.modules["IPython"] = None  # type: ignore[assignment]  # ``import IPython`` raises ImportError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `clip-curate run -h | head -1`: the reader left; nothing to report
        try:  # keep the interpreter's final flush of stdout from raising again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("--version", "-V", "version"):
        print(f"clip-curate {version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"clip-curate: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command in BEAM_COMMANDS:
        hide_ipython()
    try:
        check_beam_options(command, rest)
    except ConfigError as exc:
        print(f"clip-curate {command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        logging.getLogger(BEAM_WORKER_ECHO_LOGGER).addFilter(QuietBeamWorkerEcho())
    quiet = _QuietConfigErrors()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    try:
        return int(COMMANDS[command](rest) or 0)
    except KeyboardInterrupt:
        print(f"clip-curate {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = config_error_message(exc)
        if message is None and isinstance(exc, ValueError) and "Unexpected pipeline runner" in str(exc):
            message = one_line(str(exc))
        if message is None:
            raise
        print(f"clip-curate {command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(quiet)


_WHILE_RUNNING = re.compile(r"\s*\[while running '[^']*'\]")
_REMOTE_CONFIG_ERROR = re.compile(r"(?:clip_curate\.fields\.)?ConfigError: ([^\n]+)")


def config_error_message(exc: BaseException) -> str | None:
    """The one-line message of the ConfigError behind ``exc`` (raised directly, re-raised by Beam with
    "[while running ...]" appended, chained, or reported as text by a worker process), else None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return one_line(_WHILE_RUNNING.sub("", str(e)))
        stack.extend([e.__cause__, e.__context__])
    found = _REMOTE_CONFIG_ERROR.findall(str(exc))
    return one_line(_WHILE_RUNNING.sub("", found[-1])) if found else None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _has_config_error(exc_info) -> bool:
    return bool(exc_info and exc_info[1] is not None and config_error_message(exc_info[1]) is not None)


class _QuietConfigErrors(logging.Filter):
    """Drop the tracebacks Beam logs for an exception that is a user's ConfigError (in this process, or echoed
    from a worker process as text): the CLI reports it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _has_config_error(record.exc_info):
            return False
        return record.levelno < logging.ERROR or "clip_curate.fields.ConfigError: " not in record.getMessage()


if __name__ == "__main__":
    sys.exit(main())
