"""Checks of the run's input and output made before any work starts (after planning, before any download).

``preflight(cfg, plan)`` raises ConfigError (one line, exit 2) for what would otherwise fail mid-run:

- the output cannot be written (``probe_output``: a marker file is created and removed under it; a regular
  file, an unwritable directory or a directory under an unwritable parent is refused);
- with ``--strict-input``, an input split cannot be read to its end (``check_input_readable`` reads every
  split once, as the Read transform would, and refuses the run on the first damaged source).

``probe_output`` is also what ``clip-curate export`` (``api="fsspec"``) and ``clip-curate audit`` call on
their ``--output``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import logging
import os
import posixpath
import uuid
from typing import Any

from clip_curate.fields import ConfigError

log = logging.getLogger(__name__)

#: Threads reading splits for ``--strict-input`` (reading is I/O bound).
STRICT_READ_THREADS = 8
_MARKER = ".clip-curate-write-probe-"


def preflight(cfg: Any, plan: Any) -> None:
    """Check the output can be written and (with ``--strict-input``) that every split can be read."""
    probe_output(cfg.output.output, "--output")
    if getattr(cfg.reader, "strict_input", False):
        check_input_readable(plan)


# ---------------------------------------------------------------------------------------------
# Output

def _is_local(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(path) is None


def _why(exc: BaseException) -> str:
    """A short one-line reason from an OS / filesystem error (Beam wraps local errors in BeamIOError)."""
    details = getattr(exc, "exception_details", None)
    if isinstance(details, dict) and details:
        exc = next(iter(details.values()))
    if isinstance(exc, OSError) and exc.errno is not None:
        text = exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:200]


def _missing_dirs(path: str) -> list[str]:
    """Local directories on the way to ``path`` (itself included) that do not exist yet, outermost first."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return missing[::-1]


def _local_checks(path: str, flag: str) -> None:
    p = os.path.abspath(path)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise ConfigError(f"{flag} {path!r} is a file, not a directory; pass a directory")
    q = p
    while not os.path.lexists(q) and os.path.dirname(q) != q:
        q = os.path.dirname(q)
    if os.path.lexists(q) and not os.path.isdir(q):
        raise ConfigError(f"{flag} {path!r} lies under {q!r}, which is a file; pass a directory path")


def probe_output(path: str | None, flag: str = "--output", api: str = "beam") -> None:
    """Refuse (ConfigError, one line) an output that cannot be written: create a marker file under ``path``
    and remove it again. ``api``: the filesystem layer the command writes with, ``beam`` (Beam FileSystems:
    ``run``, ``audit``) or ``fsspec`` (``export``). Directories the probe had to create are removed again."""
    if not path:
        return
    local = api == "beam" and _is_local(path) or api == "fsspec" and "://" not in path
    created = []
    if local:
        _local_checks(path, flag)
        created = _missing_dirs(path)
    marker = f"{_MARKER}{uuid.uuid4().hex}"
    try:
        if api == "fsspec":
            _probe_fsspec(path, marker, flag)
        else:
            _probe_beam(path, marker)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any filesystem's refusal is the user's to fix
        raise ConfigError(f"{flag} {path!r} is not writable ({_why(exc)}); pass a directory you can write "
                          "to") from None
    finally:
        for d in reversed(created):
            try:
                os.rmdir(d)
            except OSError:
                pass


def _probe_beam(path: str, marker: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    target = FileSystems.join(path.rstrip("/"), marker)
    with FileSystems.create(target) as f:
        f.write(b"clip-curate write probe\n")
    FileSystems.delete([target])


def _probe_fsspec(path: str, marker: str, flag: str) -> None:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{flag} {path!r}: cannot open ({_why(exc)})") from None
    if fs.isfile(root):
        raise ConfigError(f"{flag} {path!r} is a file, not a directory; pass a directory")
    fs.makedirs(root, exist_ok=True)
    target = posixpath.join(root.rstrip("/"), marker)
    with fs.open(target, "wb") as f:
        f.write(b"clip-curate write probe\n")
    fs.rm(target)


# ---------------------------------------------------------------------------------------------
# Input (--strict-input)

def check_input_readable(plan: Any) -> None:
    """Read every split of ``plan`` to its end, as the Read transform would; ConfigError naming the first
    damaged source (and how many there are) when any cannot be read to its end."""
    from clip_curate.readers.base import ReadRejection, read_split

    whole = dataclasses.replace(plan, part=None)

    def damage(split) -> list[str]:
        return [item.damage for item in read_split(split, whole)
                if isinstance(item, ReadRejection) and item.damage]

    found: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=STRICT_READ_THREADS) as pool:
        for result in pool.map(damage, plan.splits):
            found.extend(result)
    log.info("--strict-input: read %d split(s) before the run: %d damaged source(s)", len(plan.splits), len(found))
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(f"--strict-input: an input source cannot be read to its end: {found[0]}{more}; repair "
                          "or remove it, or drop --strict-input to keep the rows before the damage")
