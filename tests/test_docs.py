"""The docs stay true to the code and to themselves: generated reference, README size and commands,
links between pages, and no notes about the environment the docs were written in."""
import importlib.util
import os
import re
import unicodedata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
README_MAX_LINES = 300
# Pages for developers, not users: they may talk about the project's own workings.
NOT_USER_DOCS = {"ARCHITECTURE.md", "development.md"}
# Phrases that describe where the docs were written rather than the software (case-insensitive).
BANNED_PHRASES = (
    "this machine", "this project's machine", "this project's 2", "build machine", "development machine",
    "the issue", "issue's", "this session", "these sessions", "this task", "sandbox", "downloaded here",
    "access here", "measured here", "seen here", "weights here", "was lent", "were lent",
)


def _doc_paths(user_only=False):
    names = sorted(n for n in os.listdir(DOCS) if n.endswith(".md"))
    if user_only:
        names = [n for n in names if n not in NOT_USER_DOCS]
    return [README] + [os.path.join(DOCS, n) for n in names]


def _rel(path):
    return os.path.relpath(path, ROOT)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- 1. the generated reference ----------------------------------------------------------------

def _build_reference():
    spec = importlib.util.spec_from_file_location("build_reference", os.path.join(DOCS, "build_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_page_is_generated_from_the_code():
    build = _build_reference()
    problem = build.check()
    assert problem is None, problem  # the message names the command: python docs/build_reference.py


def test_reference_check_notices_a_stale_or_missing_page(tmp_path):
    build = _build_reference()
    fresh = build.render()
    for stage, reasons in build._reasons().items():  # the vocabulary, the flags and the schemas are on the page
        assert f"| `{stage}` |" in fresh and all(f"`{r}`" in fresh for r in reasons)
    assert "| `--min-clip-score` |" in fresh and "| `clip_score` | float32 |" in fresh
    page = tmp_path / "reference.md"
    page.write_text(fresh, encoding="utf-8")
    assert build.check(str(page)) is None
    page.write_text(fresh.replace("| `--min-clip-score` |", "| `--min-clip-scores` |"), encoding="utf-8")
    message = build.check(str(page))
    assert message and "python docs/build_reference.py" in message and "\n" not in message
    assert "missing" in build.check(str(tmp_path / "absent.md"))


# --- 2. README: short, and its commands are the ones CI runs -------------------------------------

def test_readme_is_short():
    lines = _read(README).count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail into a docs/ page and link it")


def test_readme_install_and_test_commands_are_the_ones_ci_runs():
    readme = _read(README)
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    commands = []
    for line in ci.splitlines():
        line = line.strip()
        if line.startswith("python -m pip install"):
            commands.append(re.sub(r"\s-q\b", "", line))  # CI installs quietly; the README shows the plain command
        elif line.startswith("python -m pytest"):
            commands.append(line)
    assert len(commands) >= 3, f".ci/run changed shape; commands found: {commands}"
    missing = [c for c in commands if c not in readme]
    assert not missing, f"README.md does not show these .ci/run commands exactly: {missing}"
    assert 'python -m pytest -m "not slow" tests -q' in readme  # the fast lane


# --- 3. links ----------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text):
    """Link targets of inline markdown links and images, outside fenced code blocks."""
    return _LINK.findall(_FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lower-case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(text):
    found, seen = set(), {}
    for line in _FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path, text):
    problems = []
    here = os.path.dirname(path)
    for target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s)/mailto links, and anchors within the page (checked below)
        file_part, _, fragment = target.partition("#")
        dest = os.path.normpath(os.path.join(here, file_part))
        if not os.path.exists(dest):
            problems.append(f"{_rel(path)}: {target} -> {_rel(dest)} does not exist")
        elif fragment and dest.endswith(".md") and fragment not in anchors(_read(dest)):
            problems.append(f"{_rel(path)}: {target} -> no heading #{fragment} in {_rel(dest)}")
    for target in links(text):
        if target.startswith("#") and target[1:] not in anchors(text):
            problems.append(f"{_rel(path)}: {target} -> no such heading in the page")
    return problems


@pytest.mark.parametrize("path", _doc_paths(), ids=_rel)
def test_relative_links_point_at_files_that_exist(path):
    problems = broken_links(path, _read(path))
    assert not problems, "\n".join(problems)


def test_link_checker_finds_broken_links(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n", encoding="utf-8")
    text = ("[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x.md) [self](#top)\n"
            "# Top\n```\n[not a link](gone-in-code.md)\n```\n"
            "[gone](missing.md) ![img](img/none.png) [bad anchor](there.md#nope)\n")
    problems = broken_links(str(page), text)
    assert len(problems) == 3, problems
    assert any("missing.md" in p for p in problems) and any("none.png" in p for p in problems)
    assert any("#nope" in p for p in problems)
    assert slug("Download + resize vs `img2dataset`") == "download--resize-vs-img2dataset"
    assert slug("Memory with `--chunk-rows`") == "memory-with---chunk-rows"


# --- 4. no notes about the environment the docs were written in ---------------------------------

def banned_phrases(text):
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        low = line.lower()
        found += [(number, p) for p in BANNED_PHRASES if p in low]
    return found


@pytest.mark.parametrize("path", _doc_paths(user_only=True), ids=_rel)
def test_user_docs_carry_no_notes_about_where_they_were_written(path):
    found = banned_phrases(_read(path))
    assert not found, f"{_rel(path)}: " + "; ".join(f"line {n}: {p!r}" for n, p in found) + (
        " — describe the software, and name hardware as e.g. '2 x86-64 cores, no GPU'")


def test_banned_phrase_check_finds_them():
    assert banned_phrases("Fine.\nMeasured on This Machine, load 4.\n") == [(2, "this machine")]
    assert banned_phrases("The Java job servers could not be downloaded here.")
    assert not banned_phrases("Measured on 2 x86-64 cores, no GPU.")
