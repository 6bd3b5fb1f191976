"""The package's shape: no import cycles, the product never imports the synthetic lab, the composition
names no stage, and a stage is one module plus one registration."""
import ast
import pathlib

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline

from clip_curate import records
from clip_curate.stages import base

PKG = pathlib.Path(__file__).resolve().parent.parent / "clip_curate"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: pathlib.Path) -> set[str]:
    """Project modules imported anywhere in the file (inside functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
            for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != "clip_curate":
                found.add(name)
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    return cycles


def test_the_walk_sees_lazy_imports():
    # run.py imports the pipeline at module level; audit.assemble imports the report inside a function
    assert "clip_curate.pipeline" in GRAPH["clip_curate.run"]
    assert "clip_curate.audit.report" in GRAPH["clip_curate.audit.assemble"]


def test_no_import_cycles_counting_lazy_imports():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle():
    GRAPH["clip_curate.records"] = GRAPH["clip_curate.records"] | {"clip_curate.pipeline"}
    try:
        assert any("clip_curate.records" in c for c in _cycles())
    finally:
        GRAPH["clip_curate.records"] = GRAPH["clip_curate.records"] - {"clip_curate.pipeline"}


def test_the_product_never_imports_the_synthetic_lab_or_pipelines():
    offenders = {m: sorted(i for i in deps if i.startswith("clip_curate.synthetic"))
                 for m, deps in GRAPH.items() if not m.startswith("clip_curate.synthetic")}
    assert {m: d for m, d in offenders.items() if d} == {}
    for path in MODULES.values():
        assert "from pipelines" not in path.read_text(encoding="utf-8"), path


def test_the_composition_names_no_stage():
    names = set(base.stage_names())
    assert {"caption", "download", "image", "embed", "clip", "dedup", "safety"} <= names
    for module in ("pipeline.py", "run.py"):
        tree = ast.parse((PKG / module).read_text(encoding="utf-8"))
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert strings & names == set(), module


def test_pool_inputs_skip_what_they_already_have_and_get_the_image_stage_back():
    from clip_curate.stages.base import IMAGE, RAW_IMAGE

    assert base.plan_stages(["caption", "download", "embed"], frozenset()) == (
        ("caption", "download", "embed"), frozenset(), [])
    enabled, skipped, added = base.plan_stages(["download", "embed", "dedup"], frozenset({RAW_IMAGE}))
    assert enabled == ("download", "image", "embed", "dedup") and skipped == {"download"} and added == ["image"]
    enabled, skipped, added = base.plan_stages(["download", "image", "embed"], frozenset({RAW_IMAGE, IMAGE}))
    assert skipped == {"download", "image"} and added == []


class _ShortUrl(base.RowFilter):
    stage = "toy"

    def judge(self, row):
        return base.Verdict(row, None if len(row["url"]) > 14 else "too_short", f"len={len(row['url'])}")


def test_a_new_filter_is_one_module_and_one_registration(monkeypatch):
    """What docs/ARCHITECTURE.md's recipe promises: a RowFilter + register() and the pipeline runs it."""
    from dataclasses import dataclass

    from clip_curate.config import RunConfig
    from clip_curate.fields import opt

    @dataclass(frozen=True)
    class ToyConfig:
        on: bool = opt(True, "toy")

    monkeypatch.setitem(records.REASONS, "toy", ("too_short",))
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    base.register(base.Stage("toy", ToyConfig, position=15,
                             build=lambda cfg, ctx: base.RowStage(_ShortUrl(cfg)) if cfg.on else None))
    assert base.stage_names()[:3] == ("caption", "toy", "download")
    rows = [{"uid": str(i), "url": "http://a.test/" + "x" * i, "caption": "c"} for i in range(4)]
    with TestPipeline() as p:
        kept, rejected = p | beam.Create(rows) | base.RowStage(_ShortUrl(ToyConfig()))
        from apache_beam.testing.util import assert_that, equal_to
        assert_that(kept | "K" >> beam.Map(lambda r: r["uid"]), equal_to(["1", "2", "3"]), label="kept")
        assert_that(rejected | "R" >> beam.Map(lambda r: (r["uid"], r["stage"], r["reason"], r["detail"])),
                    equal_to([("0", "toy", "too_short", "len=14")]), label="rejected")
    with pytest.raises(ValueError, match="registered twice"):
        base.register(base.Stage("toy", ToyConfig, position=16, build=lambda cfg, ctx: None))
    assert RunConfig(stages=("toy", "caption")).enabled() == ("caption", "toy")
