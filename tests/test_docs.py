"""The user's guide and its pages: short, linked, and about this repository alone.

A clone must explain itself: a README that grows back into a lab notebook, a link to a
page that was renamed, or a pointer to a file beside the repository (a design note a
clone does not have) each leave a reader stuck. Ray-free, a fraction of a second.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 400
PAGES = ("architecture", "data", "serving", "security", "monitoring", "experiments", "cluster")
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs" / f"{page}.md" for page in PAGES)]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
"""A Markdown link's target: ``[text](target)``."""


def relative_links(markdown: str) -> list[str]:
    """The link targets of ``markdown`` that name a file (no URL, no in-page anchor), anchors cut off."""
    targets = (target.split("#", 1)[0] for target in LINK.findall(markdown))
    return [target for target in targets if target and "://" not in target and not target.startswith("mailto:")]


def test_the_readme_is_a_guide_not_a_notebook() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_of_the_repository(doc: Path) -> None:
    assert doc.exists(), f"{doc.relative_to(ROOT)} is missing"
    for target in relative_links(doc.read_text()):
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.relative_to(ROOT)} links outside the repository: {target}"
        assert resolved.exists(), f"{doc.relative_to(ROOT)} links to a missing file: {target}"


def test_a_broken_link_is_found() -> None:
    assert relative_links("see [the data](docs/data.md#records), [Ray](https://docs.ray.io), [gone](docs/gone.md)") \
        == ["docs/data.md", "docs/gone.md"]


def test_no_tracked_file_refers_to_files_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    offenders = [
        name for name in tracked.splitlines()
        if name != "tests/test_docs.py" and (ROOT / name).is_file()
        and re.search(r"shared/|DESIGN\.md", (ROOT / name).read_text(errors="ignore"))
    ]
    assert not offenders, f"files referring to a design note or a folder beside the repository: {offenders}"
