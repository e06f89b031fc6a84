"""The documentation holds together: README.md, CHANGELOG.md and docs/*.md.

Every relative link resolves to a file of the repository (and its #anchor to a
heading there, by GitHub's slug rule), every ``mbu COMMAND`` the pages' code shows
is a command of ``mbu`` (the README's quick start above all, since users copy it),
and the README's Documentation table links existing pages, every page of docs/
among them. The guides (README.md and docs/*.md) read as a guide, not a lab log:
none holds a phrase of LAB_LOG_PHRASES; the history of measurements goes to
CHANGELOG.md or bench/results/.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from mbu.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
GUIDES = [README, *sorted(DOCS.glob("*.md"))]

# Phrases of a lab log: who measured what when, what went wrong on which run, what the host was doing.
# A guide gives a figure with its hardware and command; the history belongs in CHANGELOG.md or bench/results/.
# Matched case-insensitively, across line breaks. ("not measured" alone is fine: "GPU: **not measured**".)
LAB_LOG_PHRASES = (
    "not measured the cause",
    "cause was not measured",
    "since fixed",
    "since marked",
    "busier",
    "was busier",
    "this session",
    "we measured",
    "I measured",
    "shared host",
    "less loaded",
    "run right after",
)

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
MBU_COMMAND = re.compile(r"(?<![\w./-])mbu[ \t]+([a-z][a-z-]*)(?:[ \t]+([a-z][a-z-]*))?")


@dataclass(frozen=True)
class Page:
    """A Markdown file split into its prose (code blocks blanked) and its fenced code blocks."""

    path: Path
    prose: str
    code_blocks: list[str]

    @property
    def name(self) -> str:
        return self.path.relative_to(REPO).as_posix()


def split_markdown(text: str) -> tuple[str, list[str]]:
    """``text`` with its fenced code blocks blanked (line numbers kept), and those blocks."""
    prose, blocks, block, fence = [], [], [], None
    for line in text.splitlines():
        marker = re.match(r"\s{0,3}(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence, block = marker.group(1), []
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
            blocks.append("\n".join(block))
        elif fence is not None:
            block.append(line)
        else:
            prose.append(line)
            continue
        prose.append("")
    return "\n".join(prose), blocks


def read_page(path: Path) -> Page:
    return Page(path, *split_markdown(path.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation but '-' and spaces removed, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in read_page(path).prose.splitlines():
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        seen = counts.get(base, 0)
        counts[base] = seen + 1
        found.add(base if seen == 0 else f"{base}-{seen}")  # GitHub numbers repeated headings
    return found


def links(page: Page) -> list[str]:
    """Link targets of the page's prose, leaving out code spans and code blocks."""
    text = CODE_SPAN.sub("", page.prose)
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def link_problem(page: Page, target: str) -> str | None:
    """Why ``target``, a link of ``page``, is broken; None when it resolves (or is not a relative link)."""
    if not target:
        return "empty link target"
    if SCHEME.match(target) or target.startswith("//"):
        return None  # a web address, mailto:, ...
    path_part, _, fragment = target.partition("#")
    if path_part.startswith("/"):
        return "absolute path: link to files of this repository by relative path"
    linked = (page.path.parent / path_part).resolve() if path_part else page.path
    if not linked.is_relative_to(REPO):
        return "points outside the repository"
    if not linked.exists():
        return f"no such file: {linked.relative_to(REPO).as_posix()}"
    if fragment and linked.suffix == ".md" and fragment not in anchors(linked):
        return f"no heading with anchor #{fragment} in {linked.relative_to(REPO).as_posix()}"
    return None


def section(page: Page, title: str) -> str:
    """The Markdown of the page's '## title' section, up to the next '## ' heading."""
    text = page.path.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{page.name}: no '## {title}' section"
    return match.group(1)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_problems(where: str, code: str, commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    problems = []
    for name, sub in MBU_COMMAND.findall(code):
        if name not in commands:
            problems.append(f"{where}: `mbu {name}` is not an mbu command (mbu has: {', '.join(sorted(commands))})")
            continue
        below = subcommands(commands[name])
        if below and sub and sub not in below:
            problems.append(f"{where}: `mbu {name} {sub}` is not a command (mbu {name} has: {', '.join(below)})")
    return problems


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    page = read_page(path)
    broken = [f"{page.name}: ({target}): {why}" for target in links(page) if (why := link_problem(page, target))]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_quick_start_commands_exist() -> None:
    _, blocks = split_markdown(section(read_page(README), "Quick start"))
    commands = subcommands(build_parser())
    used = [name for block in blocks for name, _ in MBU_COMMAND.findall(block)]
    assert used, "README.md: the Quick start's code blocks show no `mbu COMMAND`"
    problems = [p for block in blocks for p in command_problems("README.md, Quick start", block, commands)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_mbu_command_shown_exists(path: Path) -> None:
    page = read_page(path)
    code = page.code_blocks + [span for _, span in CODE_SPAN.findall(page.prose)]
    commands = subcommands(build_parser())
    problems = [p for text in code for p in command_problems(page.name, text, commands)]
    assert not problems, "\n".join(problems)


def test_readme_table_names_every_docs_page() -> None:
    rows = [line for line in section(read_page(README), "Documentation").splitlines() if line.startswith("|")]
    listed = [target.partition("#")[0] for row in rows for target in INLINE_LINK.findall(row)]
    assert listed, "README.md: the Documentation table links no page"
    missing = [
        f"README.md, Documentation table: ({target}): no such page"
        for target in listed
        if not (REPO / target).is_file()
    ]
    assert not missing, "\n".join(missing)
    listed_files = {(REPO / target).resolve() for target in listed}
    unlisted = [p.relative_to(REPO).as_posix() for p in sorted(DOCS.glob("*.md")) if p.resolve() not in listed_files]
    assert not unlisted, f"README.md: the Documentation table does not list {', '.join(unlisted)}"


def lab_log_phrases(text: str) -> list[tuple[int, str]]:
    """(line number, phrase) of every lab-log phrase in ``text``, a phrase split over lines included."""
    found = []
    for phrase in LAB_LOG_PHRASES:
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, phrase.split())) + r"(?!\w)"
        for match in re.finditer(pattern, text, re.I):
            found.append((text.count("\n", 0, match.start()) + 1, phrase))
    return sorted(found)


def test_lab_log_phrases_are_found() -> None:
    text = "A guide.\nThe host was\nBusier then; the cause was not measured.\nGPU: **not measured**.\n"
    assert lab_log_phrases(text) == [(2, "was busier"), (3, "busier"), (3, "cause was not measured")]


@pytest.mark.parametrize("path", GUIDES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_guides_hold_no_lab_log(path: Path) -> None:
    name = path.relative_to(REPO).as_posix()
    found = [f'{name}:{line}: "{phrase}"' for line, phrase in lab_log_phrases(path.read_text(encoding="utf-8"))]
    assert not found, "lab-log phrases in a guide (move the history to CHANGELOG.md or bench/results/):\n" + "\n".join(
        found
    )


def test_study_file_reference_lists_every_sampler_and_pruner() -> None:
    """The names a study file accepts (one list, ``study_file.SAMPLERS`` / ``PRUNERS``) are the ones documented."""
    from mbu.search.studyfile.study_file import PRUNERS, SAMPLERS

    text = (DOCS / "study-files.md").read_text()
    documented = re.search(r"sampler \(([^)]*)\)", text), re.search(r"pruner \(([^)]*)\)", text)
    assert all(documented), "docs/study-files.md no longer says sampler (a | b) and pruner (a | b)"
    assert [name.strip() for name in documented[0].group(1).split("|")] == list(SAMPLERS)
    assert [name.strip() for name in documented[1].group(1).split("|")] == list(PRUNERS)
