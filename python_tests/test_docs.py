"""The user documentation stays true: every relative link and image in README.md, CHANGELOG.md and docs/*.md points at a
file (and heading) of the repository, the make targets the README names exist, and the README's quickstart runs as
written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"(?:src|href)\s*=\s*\"([^\"]+)\"")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where link syntax is only an example."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def heading_anchors(text: str) -> set:
    """GitHub's anchors for the headings of a markdown page: lower case, punctuation dropped, spaces to hyphens,
    repeated headings numbered."""
    anchors, seen = set(), {}
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path, root: Path) -> list:
    """Each relative link or image of `page` that leaves `root`, names no existing file, or names a heading its
    markdown target lacks, with the reason."""
    text = page.read_text(encoding="utf-8")
    body = prose(text)
    problems = []
    for target in MARKDOWN_LINK.findall(body) + HTML_LINK.findall(body):
        if SCHEME.match(target):
            continue  # a URL, not a file of the repository
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if root not in (path, *path.parents):
            problems.append(f"{target}: outside the repository")
            continue
        if not path.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in heading_anchors(path.read_text(encoding="utf-8")):
            problems.append(f"{target}: no heading #{anchor} in {path.relative_to(root)}")
    return problems


def section(text: str, heading: str) -> str:
    """The body of the level-2 section `heading`, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert broken_links(page, ROOT) == []


def test_the_link_check_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Title\n\n## A section\n\n"
                    "[ok](../img.png) ![ok](../img.png) [ok](#a-section) [ok](https://example.org/x)\n"
                    "[missing](../nowhere.md) [escapes](../../shared/SPEC.md) [anchor](#no-such-heading)\n"
                    '<img src="gone.png">\n'
                    "`[in code](../nowhere.md)`\n```\n[in a block](../nowhere.md)\n```\n")
    problems = broken_links(page, tmp_path)
    assert [p.split(":")[0] for p in problems] == ["../nowhere.md", "../../shared/SPEC.md", "#no-such-heading",
                                                   "gone.png"]


def test_make_targets_named_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    named = set(re.findall(r"`make ([\w-]+)", (ROOT / "README.md").read_text()))
    assert named and named <= targets, f"the README names make targets the Makefile lacks: {named - targets}"


def test_readme_quickstart_runs(tmp_path):
    """The Python blocks of the README's Quickstart, executed as written in an empty folder, save an image."""
    from PIL import Image

    quickstart = section((ROOT / "README.md").read_text(encoding="utf-8"), "Quickstart")
    blocks = re.findall(r"^```python\n(.*?)^```", quickstart, re.M | re.S)
    assert blocks, "the Quickstart has no python block"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    images = [path for path in tmp_path.iterdir() if path.suffix in (".png", ".jpg")]
    assert images, "the quickstart saved no image"
    with Image.open(images[0]) as image:
        assert image.size[0] > 0 and image.size[1] > 0
