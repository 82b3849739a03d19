"""The package layers, checked on every module's imports (issue #14 item 4).

Allowed order, each layer importing only from the layers to its left:

    sicsrec.runtime  <-  shards / llm_labeling  <-  sicsrec (models, trainers)  <-  launcher (CLI, stage registry)

- sicsrec/runtime/ (distributed init, run directories and manifests) is the bottom: it imports
  no other project module (sicsrec, shards, llm_labeling, launcher), only itself.
- shards/ (data I/O, the `data`/`shard` config sections) imports nothing from sicsrec but
  sicsrec.runtime, and not llm_labeling; llm_labeling/ sits beside it and may read shards/ (the
  prepared dataset), never the other way round, and imports nothing from sicsrec but
  sicsrec.runtime.
- Nothing under sicsrec/, shards/ or llm_labeling/ imports launcher/: each stage body takes its
  own config section and its upstream folders, never the run's config tree.
- launcher/ may import everything (it assembles the config tree and the stages).

Every import counts: module level, function-local, `if TYPE_CHECKING:` blocks, and
`importlib.import_module("...")` / `__import__("...")` with a literal name. An import that must
still point upward goes into UPWARD_EXCEPTIONS with its reason, never into a looser rule.
"""
from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("launcher", "sicsrec", "shards", "llm_labeling")

# (importing module, imported name) -> why it cannot point the right way yet. Empty: none left.
UPWARD_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, path: Path, target: str | None, level: int) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the file, however deeply nested; for
    `from a.b import c` the name is a.b.c (c may be a submodule or an attribute)."""
    module = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node.module, node.level)
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no modules under {package}/"
    return files


def _forbidden(module: str, name: str) -> str | None:
    """Why `module` may not import `name` (None: allowed)."""
    if not any(_within(name, p) for p in PROJECT):
        return None  # stdlib / third party
    if _within(module, "sicsrec.runtime"):
        return None if _within(name, "sicsrec.runtime") else "sicsrec.runtime is the bottom layer"
    if _within(name, "launcher"):
        return "only launcher/ (the top) imports launcher"
    if _within(module, "shards") or _within(module, "llm_labeling"):
        if _within(name, "sicsrec") and not _within(name, "sicsrec.runtime"):
            return "shards/ and llm_labeling/ import nothing from sicsrec but sicsrec.runtime"
        if _within(module, "shards") and _within(name, "llm_labeling"):
            return "llm_labeling/ reads shards/, not the other way round"
    return None


def test_imports_follow_the_layer_order():
    wrong, used = [], set()
    for package in ("sicsrec", "shards", "llm_labeling"):
        for path in _files(package):
            module = _module_name(path)
            for line, name in imports_of(path):
                why = _forbidden(module, name)
                if why is None:
                    continue
                key = next(((m, n) for m, n in UPWARD_EXCEPTIONS if m == module and _within(name, n)), None)
                if key:
                    used.add(key)
                else:
                    wrong.append(f"{path.relative_to(REPO)}:{line}: imports {name} ({why})")
    assert not wrong, "imports against the layer order (see this test's docstring):\n" + "\n".join(wrong)
    stale = set(UPWARD_EXCEPTIONS) - used
    assert not stale, f"UPWARD_EXCEPTIONS lists imports that no longer exist: remove {sorted(stale)}"


def test_sicsrec_package_init_imports_nothing():
    """shards/ and llm_labeling/ import sicsrec.runtime, which runs sicsrec/__init__.py first:
    it must not pull the models and trainers in."""
    assert imports_of(REPO / "sicsrec" / "__init__.py") == []
    assert [n for _, n in imports_of(REPO / "sicsrec" / "runtime" / "__init__.py")] == []


def test_the_import_scan_sees_nested_and_relative_imports(tmp_path):
    # rundir.py imports dist inside run_stage(): a function-local import is found
    assert "sicsrec.runtime.dist.barrier" in {n for _, n in imports_of(REPO / "sicsrec" / "runtime" / "rundir.py")}
    assert _resolve("shards.writer", REPO / "shards" / "writer.py", "config", 1) == "shards.config"
    assert _resolve("sicsrec.runtime", REPO / "sicsrec" / "runtime" / "__init__.py", None, 2) == "sicsrec"
    assert _forbidden("shards.synth", "sicsrec.train.train_id") and _forbidden("sicsrec.train", "launcher.config")
    assert _forbidden("sicsrec.runtime.rundir", "sicsrec.config.TrainConfig")
    assert not _forbidden("llm_labeling.run", "sicsrec.runtime.rundir.hash_files")
    assert not _forbidden("launcher.stages", "sicsrec.train.train_id")


@pytest.mark.parametrize("section", ["data", "shard", "label", "sft", "encode", "train_id", "sicsrec", "tssr"])
def test_every_section_lives_in_its_package(section):
    """The sections sit beside the code that reads them; launcher.config only gathers them."""
    from launcher.config import Config

    home = {"data": "shards", "shard": "shards", "label": "llm_labeling"}.get(section, "sicsrec")
    assert typing.get_type_hints(Config)[section].__module__ == f"{home}.config"


STAGE_BODIES = ["shards.synth:synthesize", "shards.writer:write_shards", "llm_labeling.run:label",
                "sicsrec.sft:sft", "sicsrec.encode:encode", "sicsrec.train:train_id",
                "sicsrec.train_sicsrec:train_sicsrec", "sicsrec.train_content:train_content",
                "sicsrec.train_tssr:train_tssr"]


@pytest.mark.parametrize("target", STAGE_BODIES)
def test_each_stage_body_receives_its_section(target):
    """A stage body takes config sections (dataclasses of a `*.config` module below the launcher),
    never the run's tree (launcher.config.Config)."""
    import dataclasses
    import importlib

    module, name = target.split(":")
    hints = typing.get_type_hints(getattr(importlib.import_module(module), name))
    sections = [t for t in hints.values() if dataclasses.is_dataclass(t)]
    assert sections, f"{target} takes no config section"
    assert all(t.__module__.endswith(".config") and not t.__module__.startswith("launcher") for t in sections), \
        (target, sections)
