"""The documentation: every example runs, the site builds strictly, and the reference is complete.

* Every ```python block of README.md and docs/**/*.md is executed, section by section: each
  section's first block starts a fresh namespace, so it runs on its own when copied, and the
  section's later blocks continue it. A section that builds on the one before says so in its
  text and marks its first block ``<!-- fpsolve: continues (what it builds on) -->``. Examples run
  in a temporary working directory that must stay empty: they write only under temporary
  directories of their own. A block that truly cannot run on a CPU-only machine is preceded by
  ``<!-- fpsolve: skip-exec (the reason) -->``; the reason is required, and such blocks are
  counted so that they stay rare.
* ``mkdocs build --strict`` passes (any warning fails), and the built site has an API entry for
  every public name.
* The reference pages name every hook, every registered built-in name (aliases included) with its
  options, every error and every command.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

import fpsolve
from fpsolve import hookspecs, registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*fpsolve:\s*skip-exec\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
CONTINUES = re.compile(r"<!--\s*fpsolve:\s*continues\s*\((?P<what>[^)]+)\)\s*-->\s*$")
HEADING = re.compile(r"^#{1,6} ", re.MULTILINE)
#: at most this many skipped blocks in the whole site: skipping must stay the exception
MAX_SKIPPED = 6


def blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason or None)`` of every python block on a page."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append((line, match.group(1), skip.group("reason").strip() if skip else None))
    return found


def section_starts(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, fresh)`` of every executed block: ``fresh`` when it opens its section's
    namespace (the first block after a heading, unless marked as continuing)."""
    lines = page.read_text().splitlines()
    headings, fenced = [], False
    for number, text_line in enumerate(lines, start=1):
        if text_line.startswith("```"):
            fenced = not fenced
        elif not fenced and HEADING.match(text_line):  # a "# comment" inside a code block is no heading
            headings.append(number)
    found, current = [], None
    for line, code, reason in blocks(page):
        if reason is not None:
            continue
        section = max((h for h in headings if h < line), default=0)
        continues = CONTINUES.search(lines[line - 2]) if line >= 2 else None
        found.append((line, code, section != current and continues is None))
        current = section
    return found


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


EXECUTABLE = [page for page in PAGES if any(reason is None for _, _, reason in blocks(page))]


@pytest.fixture
def isolated_run(tmp_path, monkeypatch):
    """Run examples in a temporary directory; undo plugin registrations and process groups."""
    monkeypatch.chdir(tmp_path)
    manager = registry.get_plugin_manager()
    before = set(map(id, manager.get_plugins()))
    yield
    for plugin in list(manager.get_plugins()):
        if id(plugin) not in before:
            fpsolve.unregister_plugin(plugin=plugin)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("page", EXECUTABLE, ids=page_id)
def test_examples_run(page, isolated_run, tmp_path):
    name = f"docs_example_{page.stem.replace('-', '_')}"
    page_namespace: dict = {"__name__": name}  # the page read as one script
    for line, code, fresh in section_starts(page):
        # each section's first block runs on its own, in a fresh namespace; what it defines is
        # then part of the page, for the section's later blocks and for sections that continue it
        namespace = {"__name__": name} if fresh else page_namespace
        try:
            exec(compile(code, f"{page_id(page)}:{line}", "exec"), namespace)
            page_namespace.update(namespace)
        except Exception as error:
            raise AssertionError(
                f"the example at {page_id(page)}:{line} failed: {type(error).__name__}: {error}"
            ) from error
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not left, f"the examples of {page_id(page)} wrote {left} into the working directory"


def test_continuing_sections_say_what_they_build_on():
    for page in PAGES:
        text = page.read_text()
        for match in CONTINUES.finditer(text):
            what = match.group(0)
            assert len(match.group("what").split()) >= 2, f"{page_id(page)}: say what {what} continues"


def test_skipped_examples_are_rare_and_justified():
    skipped = [(page_id(page), line, reason) for page in PAGES for line, _, reason in blocks(page) if reason]
    assert len(skipped) <= MAX_SKIPPED, skipped
    for where, line, reason in skipped:
        assert len(reason.split()) >= 2, f"{where}:{line}: give a real reason to skip, not {reason!r}"


def test_every_page_is_reachable_from_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        relative = page.relative_to(DOCS).as_posix()
        if relative.startswith("benchmarks/") and relative != "benchmarks/index.md":
            continue  # generated report pages, linked from the report's own index
        assert f": {relative}" in config, f"docs/{relative} is not in the nav of mkdocs.yml"


# -- the reference is complete ------------------------------------------------------------------


def reference(name: str) -> str:
    return (DOCS / "reference" / name).read_text()


def test_every_hook_is_documented_with_its_signature():
    page = reference("hooks.md")
    specs = [
        name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("fpsolve_")
    ]
    assert len(specs) >= 6
    for name in specs:
        assert f"::: fpsolve.hookspecs.{name}" in page, f"hook {name} has no API entry"
        parameters = ", ".join(
            f"{p.name}: {p.annotation}"
            for p in inspect.signature(getattr(hookspecs, name)).parameters.values()
        )
        assert f"`{name}({parameters})" in page, f"hook {name}'s signature is missing from the table"


def builtin_entries():
    # fpsolve's own names: the built-in modules, and any plugin the fpsolve distribution itself ships
    entries = [
        entry
        for entry in fpsolve.list_plugins()
        if entry.plugin in registry.BUILTIN_PLUGINS or entry.distribution == "fpsolve"
    ]
    assert entries
    return entries


@pytest.mark.parametrize("entry", builtin_entries(), ids=lambda e: f"{e.kind}:{e.name}")
def test_every_builtin_name_is_documented_with_its_options(entry):
    page = reference("builtins.md")
    assert f"`{entry.name}`" in page, f"the {entry.kind} name {entry.name!r} is not documented"
    if entry.alias_of is None:
        row = next((line for line in page.splitlines() if line.startswith(f"| `{entry.name}` |")), None)
        assert row is not None, f"the {entry.kind} {entry.name!r} has no table row"
        for option in registry.option_names(entry.cls):
            assert f"`{option}`" in row, f"option {option!r} of {entry.kind} {entry.name!r} is not documented"
        assert (
            f"::: {entry.cls.__module__.rsplit('.', 1)[0]}.{entry.cls.__qualname__}" in page
            or f"::: {entry.cls.__module__}.{entry.cls.__qualname__}" in page
        )


def test_every_error_is_documented():
    page = reference("errors.md")
    names = list(fpsolve.errors.__all__) + ["ConformanceError"]
    if importlib.util.find_spec("fpsolve.distributed"):
        distributed = importlib.import_module("fpsolve.distributed")
        names += [
            n
            for n in distributed.__all__
            if isinstance(getattr(distributed, n), type)
            and issubclass(getattr(distributed, n), BaseException)
        ]
    for name in names:
        assert f"[`{name}`]" in page, f"error {name} is missing from the errors table"


def test_every_command_is_documented():
    from fpsolve.cli import COMMANDS

    page = reference("cli.md")
    for command in COMMANDS:
        assert f"| `fpsolve {command}` |" in page, f"`fpsolve {command}` is not documented"


# -- the site builds ----------------------------------------------------------------------------

#: modules whose every public name (``__all__``) must have an API entry on the site
PUBLIC_MODULES = [
    "fpsolve",
    "fpsolve.samplers",
    "fpsolve.solvers",
    "fpsolve.stopping",
    "fpsolve.initializers",
    "fpsolve.errors",
    "fpsolve.registry",
    "fpsolve.testing",
    "fpsolve.testing.strategies",
    "fpsolve.testing.problems",
    "fpsolve.testing.checks",
    "fpsolve.testing.conformance",
    "fpsolve.distributed",
    "fpsolve.evaluators",
    "fpsolve.schedules",
    "fpsolve.validators",
    "fpsolve.gpu",
    "fpsolve.models",
    "fpsolve_paradigms",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built with ``mkdocs build --strict`` into a temporary directory."""
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (the docs extra)")
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, warnings
    return target


def test_mkdocs_build_strict_passes(site):
    assert (site / "index.html").exists() and (site / "reference" / "api" / "index.html").exists()


def test_every_public_name_has_an_api_entry(site):
    html = "\n".join(path.read_text() for path in (site / "reference").rglob("*.html"))
    anchors = set(re.findall(r'id="([\w.]+)"', html))
    missing = []
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue  # an optional part that is not installed here
        for name in getattr(module, "__all__", []):
            value = getattr(module, name, None)
            if inspect.ismodule(value) or name.startswith("__"):
                continue  # modules have pages of their own; dunders (__version__) are not API entries
            defined_in = (
                getattr(value, "__module__", module_name)
                if not isinstance(value, (str, dict, tuple))
                else module_name
            )
            candidates = {f"{module_name}.{name}", f"{defined_in}.{name}", f"fpsolve.{name}"}
            if not candidates & anchors:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names without an API entry on the site: {missing}"


def test_math_is_rendered_for_mathjax(site):
    page = (site / "concepts" / "triangular-systems" / "index.html").read_text()
    assert 'class="arithmatex"' in page and "\\Psi" in page
    assert "javascripts/mathjax.js" in page


def test_option_names_helper_matches_attrs():
    # the builtins test reads options through registry.option_names; make sure it sees attrs fields
    assert registry.option_names(fpsolve.solvers.TAA) == [f.name for f in attrs.fields(fpsolve.solvers.TAA)]
