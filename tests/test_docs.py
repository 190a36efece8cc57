"""The documentation's links resolve, and the README stays short.

Every relative Markdown link in README.md, SECURITY.md and docs/**/*.md must name a file that
exists (relative to the page that links to it), and a `#fragment` must name a heading of the
page it points to (GitHub's heading slugs). Web and mail links are not followed. No model is
loaded: this reads text only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

# [text](target) or [text](target "title"); images too. Code spans and fenced blocks are removed first.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def pages() -> list[Path]:
    found = [REPO / "README.md", REPO / "SECURITY.md", *sorted((REPO / "docs").rglob("*.md"))]
    return [page for page in found if page.is_file()]


def strip_code(text: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, markup and punctuation dropped (but '-' and '_'), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's slug, numbered as GitHub does when a heading repeats (-1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> list[str]:
    return [target for target in LINK.findall(strip_code(page.read_text(encoding="utf-8")))
            if not target.startswith(EXTERNAL)]


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page):
        path_part, _, fragment = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            problems.append(f"{target}: no such file {destination.relative_to(REPO) if destination.is_relative_to(REPO) else destination}")
            continue
        if fragment and destination.is_file() and destination.suffix == ".md" and fragment not in anchors(destination):
            problems.append(f"{target}: no heading #{fragment} in {destination.relative_to(REPO)}")
    return problems


def test_the_pages_are_there():
    names = {page.relative_to(REPO).as_posix() for page in pages()}
    assert {"README.md", "SECURITY.md", "docs/measurements/README.md"} <= names


@pytest.mark.parametrize("page", pages(), ids=lambda page: page.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_docs_page_is_linked():
    """A page nobody links to is a page nobody finds."""
    linked = set()
    for page in pages():
        for target in links(page):
            path_part = target.partition("#")[0]
            if path_part:
                linked.add((page.parent / path_part).resolve())
    orphans = [page.relative_to(REPO).as_posix() for page in pages()
               if page.parent.is_relative_to(REPO / "docs") and page.resolve() not in linked]
    assert orphans == []


def test_slugs_follow_github():
    assert slug("Class cues versus backdoors (the opposite test)") == "class-cues-versus-backdoors-the-opposite-test"
    assert slug("Rules files and the `--rules` overlay") == "rules-files-and-the---rules-overlay"
    assert slug("Project settings: `[tool.lmscan]` and `lmscan.toml`") == "project-settings-toollmscan-and-lmscantoml"
    assert slug("`lmscan monitor` and `PVMonitor`") == "lmscan-monitor-and-pvmonitor"
