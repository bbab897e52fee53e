"""Every relative link and #anchor in README.md and docs/*.md leads somewhere (no process, no port)."""

from __future__ import annotations

import re

import pytest

from docsblocks import DOCS, REPO, anchors, links


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for line, target in links(path):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:: not ours to check offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.name}:{line}: {target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{path.name}:{line}: {target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, "\n".join(broken)


def test_docs_stand_alone_without_the_design_document_outside_the_repository():
    cited = [f"{p.relative_to(REPO)}:{n}" for p in DOCS
             for n, line in enumerate(p.read_text().splitlines(), 1) if "DESIGN" in line]
    assert not cited, cited


def test_the_readme_is_a_tour_and_links_into_docs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 500
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link {page.name}"
