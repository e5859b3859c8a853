"""The documentation's links, and the documentation in the source distribution.

Every relative link in README.md and docs/*.md must name a file inside the repository: a
link that leaves it (``../shared/SPEC.md``) is dead in a fresh clone even on a machine where
it happens to resolve. A link's anchor (``page.md#a-heading``) must name a heading of that
page, slugged as GitHub does. The source distribution (built from a copy of the working tree
by setuptools' PEP 517 hook, as ``python -m build --sdist`` does) must hold docs/, the
contract docs/spec.md among it, and every file those links name.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown page outside fenced code blocks."""
    lines, fence = [], None
    for line in text.splitlines():
        marker = line.lstrip()[:3]
        if fence is None and marker in ("```", "~~~"):
            fence = marker
        elif fence is not None and marker == fence:
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def link_targets(text: str) -> list[str]:
    """Targets of the inline links and reference definitions of a page, outside code (a code
    span in a link's text stays a link: only its content is blanked)."""
    prose = CODE_SPAN.sub("`code`", "\n".join(prose_lines(text)))
    return INLINE_LINK.findall(prose) + REFERENCE_DEFINITION.findall(prose)


def relative_targets(page: Path) -> list[tuple[str, str, str]]:
    """(link as written, path part, anchor) of each relative link of ``page``."""
    found = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if SCHEME.match(target):
            continue
        path, _, anchor = target.partition("#")
        found.append((target, unquote(path), unquote(anchor)))
    return found


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower case, characters other than
    letters, digits, ``_``, ``-`` and spaces removed, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (a repeated one gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def link_problems(page: Path, root: Path) -> list[str]:
    """Why each dead relative link of ``page`` is dead: its file is outside ``root`` or missing,
    or its anchor names no heading of the markdown page it points to."""
    problems = []
    for written, path, anchor in relative_targets(page):
        target = (page.parent / path).resolve() if path else page.resolve()
        if not target.is_relative_to(root):
            problems.append(f"{written}: outside the repository ({target})")
        elif not target.exists():
            problems.append(f"{written}: no such file ({target.relative_to(root)})")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            problems.append(f"{written}: no heading of {target.relative_to(root)} has the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_name_files_in_the_repository(page):
    problems = link_problems(page, ROOT.resolve())
    assert not problems, f"dead links in {page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_contract_is_in_the_repository_and_the_readme_links_it():
    assert (ROOT / "docs" / "spec.md").is_file()
    linked = {path for _, path, _ in relative_targets(ROOT / "README.md")}
    assert "docs/spec.md" in linked, "README.md does not link docs/spec.md"


def test_the_link_check_finds_dead_links(tmp_path):
    """The checker itself: a link out of the repository counts as dead even where its file
    exists; so do a missing file and a wrong anchor; web links and code do not count."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "SPEC.md").write_text("# Spec\n")
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "page.md").write_text("# A page\n\n## Its `second` section\n")
    readme = repo / "README.md"
    readme.write_text(
        "[contract](../shared/SPEC.md) [gone](docs/gone.md) [bad anchor](docs/page.md#nowhere)\n"
        "[good](docs/page.md#its-second-section) [`code text`](docs/page.md) [web](https://example.com/x.md)\n"
        "[self](#a-readme) `[in code](missing.md)`\n\n# A README\n\n```\n[in a fence](missing.md)\n```\n"
        "[ref]: docs/also-gone.md\n")
    problems = link_problems(readme, repo.resolve())
    assert [p.split(":")[0] for p in problems] == [
        "../shared/SPEC.md", "docs/gone.md", "docs/page.md#nowhere", "docs/also-gone.md"], problems


def working_tree_copy(destination: Path) -> Path:
    """The repository's files as a fresh clone with the working tree's changes would have them
    (git's tracked and untracked-but-not-ignored files; without git, the tree less build
    outputs), so that no stale build metadata feeds the sdist."""
    destination.mkdir()
    listed = None
    if (ROOT / ".git").exists() and shutil.which("git"):
        run = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=False)
        if run.returncode == 0:
            listed = [name for name in run.stdout.decode().split("\0") if name]
    if listed is None:
        shutil.rmtree(destination)
        shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
            ".git", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", "*.so"))
        return destination
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_the_sdist_holds_the_docs_and_every_linked_file(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the build backend) is not installed")
    source = working_tree_copy(tmp_path / "source")
    out = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))",
         str(out)], cwd=source, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, f"building the sdist failed:\n{build.stdout}\n{build.stderr}"
    with tarfile.open(out / build.stdout.strip().splitlines()[-1]) as archive:
        shipped = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {"docs/spec.md", "README.md"} | {str(page.relative_to(ROOT)) for page in PAGES}
    for page in PAGES:
        for _, path, _ in relative_targets(page):
            if path:
                target = (page.parent / path).resolve()
                if target.is_relative_to(ROOT.resolve()) and target.is_file():
                    wanted.add(str(target.relative_to(ROOT.resolve())))
    missing = sorted(wanted - shipped)
    assert not missing, f"the sdist lacks {missing} (MANIFEST.in decides what it holds)"


PACKAGE = ROOT / "fused_cosloss"
QUALIFIED_NAME = re.compile(r"^([a-z_]+)\.([A-Za-z_][A-Za-z0-9_]*)$")


def code_names(page: Path) -> list[str]:
    """The single identifiers or file names in backticks on ``page`` (``autograd.py``, ``functional.assemble``)."""
    return [span.strip("`").split("(")[0] for line in prose_lines(page.read_text()) for span in CODE_SPAN.findall(line)]


@pytest.mark.parametrize("page", ["architecture.md"])
def test_every_module_and_function_a_page_names_exists(page):
    """docs/architecture.md names the package's files and functions: each must exist, so the page
    cannot outlive a rename."""
    import importlib

    missing = []
    for name in code_names(ROOT / "docs" / page):
        if re.fullmatch(r"[a-z_/]+\.py", name):
            if not (PACKAGE / name).is_file() and not (ROOT / name).is_file():
                missing.append(name)
        elif (match := QUALIFIED_NAME.match(name)) and (PACKAGE / f"{match[1]}.py").is_file():
            module = importlib.import_module(f"fused_cosloss.{match[1]}")
            if not hasattr(module, match[2]):
                missing.append(name)
        elif name.endswith("/") and not (ROOT / name).is_dir() and not (PACKAGE / name).is_dir():
            missing.append(name)
    assert not missing, f"docs/{page} names what the code does not have: {missing}"
