"""The Markdown of README.md and docs/: headings' anchors, links, and the ```bash blocks.

Shared by test_docs_links.py and test_docs_commands.py. Standard library only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# `<!-- not run: REASON -->` on the line right above a ```bash block excuses it.
EXCUSE = re.compile(r"^<!-- not run: (?P<reason>\S.*?) -->$")
HEADING = re.compile(r"^(#{1,6}) (.+)$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            out.append((number, line))
    return out


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code blocks and inline code."""
    out = []
    for number, line in prose_lines(path):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            out.append((number, target))
    return out


@dataclass
class Block:
    path: Path
    line: int                  # the ```bash line
    text: str
    excuse: Optional[str]      # why it is not run, or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[str]:
        """The block's commands: comment lines dropped, continued and multi-line quoted ones joined."""
        commands, pending = [], ""
        for line in self.text.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending += line + "\n"
            if pending.rstrip().endswith("\\"):
                continue
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # a quote still open: the command goes on on the next line
                continue
            commands.append(pending.strip())
            pending = ""
        assert not pending, f"{self.where}: unfinished command {pending!r}"
        return commands


def bash_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("```"):
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            if lines[index].strip() == "```bash":
                above = lines[index - 1] if index else ""
                match = EXCUSE.match(above)
                blocks.append(Block(path, index + 1, "\n".join(lines[index + 1:end]),
                                    match.group("reason") if match else None))
            index = end
        index += 1
    return blocks
