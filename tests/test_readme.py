"""The README renders: no fragments of edit comments, no broken headings, every in-page link has its heading."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _prose_lines():
    """(line number, line) outside fenced code blocks."""
    inside = False
    for n, line in enumerate(README.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            yield n, line


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not '-' or '_'), spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_has_no_comment_fragments_or_broken_headings():
    lines = list(_prose_lines())
    assert lines
    bad = [(n, ln) for n, ln in lines if "<!--" in ln or "-->" in ln]
    assert not bad, f"edit-comment fragments in README.md: {bad}"
    headings = [(n, ln) for n, ln in lines if ln.startswith("#")]
    assert any(ln == "# badprune" for _, ln in headings)
    for n, ln in headings:
        assert re.fullmatch(r"#{1,6} \S.*", ln), f"README.md:{n}: malformed heading {ln!r}"
        assert ln.count("`") % 2 == 0 and ln.count("(") == ln.count(")"), f"README.md:{n}: broken heading {ln!r}"
    # a code block left open swallows the rest of the file
    fences = [ln for ln in README.read_text(encoding="utf-8").splitlines() if ln.lstrip().startswith("```")]
    assert len(fences) % 2 == 0


def test_every_in_page_link_has_its_heading():
    text = "\n".join(ln for _, ln in _prose_lines())
    anchors = {_slug(ln.lstrip("#")) for ln in text.splitlines() if re.match(r"#{1,6} ", ln)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links
    missing = sorted(set(links) - anchors)
    assert not missing, f"README.md links to headings that do not exist: {missing}"
    # every relative file link points at a file of the repository
    root = README.parent
    files = [t for t in re.findall(r"\]\(([^)#:]+)\)", text)]
    assert files and all((root / f).exists() for f in files), [f for f in files if not (root / f).exists()]
