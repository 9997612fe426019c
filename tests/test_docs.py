"""The documentation: the site builds strictly (so a broken link, a page left out of the nav or a stale API
name fails), the build really is strict, the reference covers the whole public API and every command, and
the names, commands, options and scripts used in the README's and the docs' code blocks exist."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

import source_proj as sp
from source_proj import evaluation as ev
from source_proj.cli.main import main as cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with ``mkdocs build --strict`` (the test fails here with mkdocs' warnings)."""
    out = tmp_path_factory.mktemp("site")
    built = _mkdocs_build(ROOT / "mkdocs.yml", out)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return out


def test_site_builds_strictly_with_every_public_name_and_command(site: Path) -> None:
    api = "".join(p.read_text() for p in (site / "reference").rglob("*.html"))
    public = {f"source_proj.{n}": getattr(sp, n) for n in sp.__all__ if n != "__version__"}
    public |= {f"source_proj.evaluation.{n}": getattr(ev, n) for n in ev.__all__}
    canonical = {name: f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', '')}" for name, o in public.items()}
    missing = [name for name in public if f'id="{name}"' not in api and f'id="{canonical[name]}"' not in api]
    assert not missing, f"public names without an entry in the API reference (docs/reference/api/): {missing}"
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    assert isinstance(cli, click.Group)
    absent = [name for name in cli.commands if f"source-proj {name}" not in cli_page]
    assert not absent, f"commands missing from the generated CLI reference: {absent}"
    benchmarks = (site / "benchmarks" / "index.html").read_text()
    first_section = re.search(r"^## (.+)$", (ROOT / "BENCHMARKS.md").read_text(), re.MULTILINE)
    assert first_section and first_section.group(1) in benchmarks  # BENCHMARKS.md is included, not copied


def _unlisted_public_names(overview: str) -> list[str]:
    """The public names (``sp.__all__``, ``source_proj.integrations``) the API overview's table does not name;
    the errors are listed there as ``SourceProjError`` and its subclasses."""
    from source_proj import integrations

    listed = set(re.findall(r"`(\w+)`", overview))
    public = [n for n in sp.__all__ if n != "__version__"] + list(integrations.__all__)
    return [n for n in public if n not in listed
            and not (isinstance(getattr(sp, n, None), type) and issubclass(getattr(sp, n), sp.SourceProjError))
            and not (isinstance(getattr(integrations, n, None), type) and issubclass(getattr(integrations, n),
                                                                                      sp.SourceProjError))]


def test_the_api_overview_names_every_public_name() -> None:
    """docs/reference/api/index.md's table, the page a reader looks a name up in, names every public name (a name
    added to the package and its reference page, but not to the overview, fails)."""
    overview = (ROOT / "docs" / "reference" / "api" / "index.md").read_text()
    unlisted = _unlisted_public_names(overview)
    assert not unlisted, f"names the API overview leaves out: {unlisted}"
    assert _unlisted_public_names(overview.replace("`GradientCapture`, ", "")) == ["GradientCapture"]


def test_a_broken_link_a_stale_api_name_or_a_page_outside_the_nav_fails_the_build(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Stale\n\n[The guide](howto/nowhere.md), [`fit`][source_proj.NoSuchName].\n")
    (docs / "orphan.md").write_text("# Not in the nav\n")
    config.update(docs_dir=str(docs), nav=[{"Home": "index.md"}])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    built = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    log = built.stdout + built.stderr
    assert built.returncode != 0
    assert "howto/nowhere.md" in log and "source_proj.NoSuchName" in log and "orphan.md" in log


def _code_blocks(path: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def _python_names(code: str) -> set[str]:
    aliases = {"sp": "source_proj", "ev": "source_proj.evaluation"}
    names = {f"{aliases[a]}.{rest}" for a, rest in re.findall(r"(?<![\w.])(sp|ev)\.([A-Za-z_][\w.]*\w)", code)}
    names |= set(re.findall(r"(?<![\w.])(source_proj(?:\.[A-Za-z_]\w*)+)", code))
    for module, imported in re.findall(r"from (source_proj[\w.]*) import ([\w, ]+)", code):
        names |= {f"{module}.{name.split(' as ')[0].strip()}" for name in imported.split(",") if name.strip()}
    return names


def _cli_uses(code: str) -> list[tuple[str, list[str]]]:
    uses = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():  # a command continued with a backslash is one line
        command_part = re.split(r"\s#", line)[0]  # a comment may mention the command; its options count
        found = re.search(r"(?:source-proj|-m source_proj\.cli)\s+([a-z]+)(.*)", line)
        if found and found.start() < len(command_part):
            uses.append((found.group(1), re.findall(r"(?<![\w-])(--[a-z][\w-]*)", found.group(2))))
    return uses


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_name_what_exists(page: Path) -> None:
    stale: list[str] = []
    for language, code in _code_blocks(page):
        if language == "python":
            stale += [f"{name} (Python)" for name in sorted(_python_names(code)) if _public_object(name) is None]
        if language in ("bash", "python"):
            stale += [f"{s} (file)" for s in re.findall(r"\b((?:examples|benchmarks|tests)/[\w/]+\.py)", code)
                      if not (ROOT / s).is_file()]
    assert not stale, f"{page.relative_to(ROOT)} shows names that do not exist: {stale}"


def _inline_code(path: Path) -> list[str]:
    """The prose's code spans (`source-proj fit STORE --segments 3`), outside the fenced blocks."""
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", path.read_text()))


def _stale_cli_uses(texts: list[str]) -> list[str]:
    stale = []
    for command, flags in (use for text in texts for use in _cli_uses(text)):
        if command not in cli.commands:  # type: ignore[attr-defined]
            stale.append(f"source-proj {command} (command)")
            continue
        options = {o for p in cli.commands[command].params for o in p.opts}  # type: ignore[attr-defined]
        stale += [f"source-proj {command} {f} (option)" for f in flags if f not in options | {"--help"}]
    return stale


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "BENCHMARKS.md", *PAGES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_line_shown_names_commands_and_options_that_exist(page: Path) -> None:
    """Every `source-proj` command line a page shows, in a shell block, an unlabelled block (an error message, a
    command printed as output) or a code span of its prose, names a command that exists and only its options."""
    texts = [code for language, code in _code_blocks(page) if language != "python"] + _inline_code(page)
    stale = _stale_cli_uses(texts)
    assert not stale, f"{page.relative_to(ROOT)} shows command lines that do not exist: {stale}"


def test_a_renamed_option_anywhere_a_page_shows_a_command_is_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `source-proj fit STORE --segment 3`, then\n\n```\nsource-proj query STORE --top-k 5 \\\n"
        "    --queries 0:3 --topk 5\n```\n\n```bash\nsource-proj fitt STORE\n```\n"
    )
    texts = [code for language, code in _code_blocks(page) if language != "python"] + _inline_code(page)
    assert _stale_cli_uses(texts) == [
        "source-proj query --topk (option)", "source-proj fitt (command)", "source-proj fit --segment (option)",
    ]


def _public_object(dotted: str) -> object | None:
    """What ``source_proj.x.y`` names as a reader reaches it: attributes of the shortest importable module (so
    ``source_proj.featurize`` is the function, not the subpackage of that name); ``None`` if nothing."""
    parts = dotted.split(".")
    for cut in range(1, len(parts) + 1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            return obj
    return None


def _call_mismatches(code: str) -> list[str]:
    """Calls of the package's functions and classes (``sp.x(...)``, ``ev.x(...)``, names imported from
    ``source_proj``) whose arguments their signature does not take: a stale keyword, one positional too many, a
    required argument left out. Calls of the reader's objects' methods (``attributor.top_k``) are not checked, nor
    blocks that are not Python as they stand (tasks.md's list of a spec's functions, signatures without bodies)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names = {"sp": "source_proj", "ev": "source_proj.evaluation"}
    names |= {a.asname or a.name: f"{n.module}.{a.name}" for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("source_proj") for a in n.names}
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        parts, func = [], call.func
        while isinstance(func, ast.Attribute):
            parts, func = [func.attr, *parts], func.value
        if not isinstance(func, ast.Name) or func.id not in names:
            continue
        obj = _public_object(".".join([names[func.id], *parts]))
        if not callable(obj) or any(isinstance(a, ast.Starred) for a in call.args) or None in [
            k.arg for k in call.keywords
        ]:
            continue
        try:
            inspect.signature(obj).bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})
        except TypeError as err:
            found.append(f"{ast.unparse(call)[:80]}: {err}")
    return found


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_call_the_package_with_arguments_it_takes(page: Path) -> None:
    """Each page's Python calls of the package bind to its signatures (no page's Python is run: most use the
    reader's model and data)."""
    stale = [m for language, code in _code_blocks(page) if language == "python" for m in _call_mismatches(code)]
    assert not stale, f"{page.relative_to(ROOT)} calls the package with arguments it does not take: {stale}"


def test_a_stale_keyword_or_argument_in_a_code_block_is_found() -> None:
    code = "import source_proj as sp\nsp.fit(store, segments=3)\nsp.featurize(a, b, c, d, e, f)\nev.lds(s)\n"
    assert [m.split(": ", 1)[1] for m in _call_mismatches(code)] == [
        "got an unexpected keyword argument 'segments'", "too many positional arguments",
        "missing a required argument: 'truth'",
    ]


def _unbound_names(code: str, readers: set[str]) -> list[str]:
    """Names a block of Python reads that it never binds, other than the reader's own and builtins."""
    tree = ast.parse(code)
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {(a.asname or a.name).split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
              for a in n.names}
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return sorted(read - bound - readers - set(dir(builtins)))


def test_the_readme_python_example_defines_what_it_uses_beyond_the_readers_own_objects() -> None:
    """The quick start is pasted as it is: every name it reads is the reader's (their model, optimizer, data and
    model builder), a builtin, or bound in the block itself."""
    readers = {"model", "optimizer", "loader", "train_set", "test_set", "test_subset", "build_model", "F"}
    (code,) = [code for language, code in _code_blocks(ROOT / "README.md") if language == "python"]
    missing = _unbound_names(code, readers)
    assert not missing, f"the README's Python example uses names it never defines: {missing}"


def test_the_digits_tutorial_defines_what_its_python_uses_beyond_the_demos_objects() -> None:
    """The digits tutorial's blocks, read in order as one script, use only what the demo provides
    (``examples/digits/digits.py``, its data and training loop's objects) and what they bind themselves."""
    demo = {"sp", "torch", "F", "digits", "train_set", "test_set", "run_dir", "model", "optimizer", "batches"}
    code = "\n".join(code for language, code in _code_blocks(ROOT / "docs" / "tutorials" / "digits.md")
                     if language == "python")
    missing = _unbound_names(code, demo)
    assert not missing, f"docs/tutorials/digits.md's Python uses names it never defines: {missing}"


def test_readme_links_point_at_files_that_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into the docs"
    assert not [t for t in local if not (ROOT / t).exists()]


def _unknown_benchmark_sections(markdown: str) -> list[str]:
    """The sections of BENCHMARKS.md a page cites by their title in quotes (``BENCHMARKS.md, "The eigen basis from
    sampled positions"``, ``[Benchmarks](../benchmarks.md), "A segment's average over its steps"``) that no heading
    of BENCHMARKS.md holds: a section renamed or merged leaves the citation pointing nowhere."""
    headings = [h.lower() for h in re.findall(r"^#+\s+(.+)$", (ROOT / "BENCHMARKS.md").read_text(), re.MULTILINE)]
    text = re.sub(r"\s*\n\s*", " ", markdown)
    cited = re.findall(r"(?:BENCHMARKS\.md|\[Benchmarks\]\([^)]*\)|Benchmarks)[,:]?\s*((?:(?:section\s+)?\"[^\"]+\""
                       r"(?:,|\sand|\sor)?\s*)+)", text)
    titles = [title for quoted in cited for title in re.findall(r"\"([^\"]+)\"", quoted)]
    return [title for title in titles if not any(title.lower() in h for h in headings)]


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_sections_cited_by_title_exist(page: Path) -> None:
    unknown = _unknown_benchmark_sections(page.read_text())
    assert not unknown, f"{page.relative_to(ROOT)} cites BENCHMARKS.md sections that do not exist: {unknown}"


def test_a_benchmark_section_cited_under_a_title_it_no_longer_has_is_found() -> None:
    page = ('figures in BENCHMARKS.md, "The eigen basis from sampled positions" and "The eigen basis from\n'
            'sampled rows"; [Benchmarks](../benchmarks.md), "A segment\'s average over its checkpoints".')
    assert _unknown_benchmark_sections(page) == ["The eigen basis from sampled rows",
                                                 "A segment's average over its checkpoints"]


def _broken_anchors(markdown: str) -> list[str]:
    """Links of ``markdown`` to a section of a page (``docs/x.md#anchor``) whose page has no heading of that anchor
    (mkdocs checks the site's own links; the README is not part of the site)."""
    from markdown.extensions.toc import slugify

    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s:]+\.md)#([^)\s]+)\)", markdown):
        headings = re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", (ROOT / target).read_text()), re.MULTILINE)
        if anchor not in {slugify(h, "-") for h in headings}:
            broken.append(f"{target}#{anchor}")
    return broken


def test_readme_links_to_a_section_name_a_heading_that_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "#" in "".join(re.findall(r"\]\(docs/[^)]+\)", readme)), "the README links to sections of the docs"
    assert not _broken_anchors(readme), f"README links to sections that do not exist: {_broken_anchors(readme)}"
    assert _broken_anchors("[a](docs/howto/scale.md#queries-against-billions-of-rows)") == [
        "docs/howto/scale.md#queries-against-billions-of-rows"
    ]
