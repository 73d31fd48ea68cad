"""The README is a front page and the documents hold together: every relative link reaches a file (and a
heading), and every repository path cited in backticks exists."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITED = re.compile(r"(?<!`)`([^`\s]+)`(?!`)")
PACKAGES = ("benchmark", "strategies", "streams", "reports")


def _prose(path: Path) -> str:
    """A document's text without its fenced code blocks (whose ``#`` lines are no headings)."""
    return FENCE.sub("", path.read_text())


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", _prose(path), re.M)}


def test_anchor_follows_github():
    assert anchor("VQA with LLaVA-1.5-7B") == "vqa-with-llava-15-7b"
    assert anchor("Evaluation speed: the image cache and the shared row 0") == \
        "evaluation-speed-the-image-cache-and-the-shared-row-0"
    assert anchor("Tuning (`fscl tune`)") == "tuning-fscl-tune"


def test_every_relative_link_reaches_a_file_and_a_heading():
    broken = []
    for path in DOCUMENTS:
        for target in LINK.findall(_prose(path)):
            if "://" in target or target.startswith("mailto:"):
                continue
            name, _, fragment = target.partition("#")
            linked = (path.parent / name).resolve() if name else path
            if not linked.exists():
                broken.append(f"{path.relative_to(REPO)} links {target}: no such file")
            elif fragment and fragment not in anchors(linked):
                broken.append(f"{path.relative_to(REPO)} links {target}: no such heading")
    assert not broken, "\n".join(broken)


def test_every_repository_path_cited_exists():
    """A backticked path whose first part is an entry of the repository (`streams/mini/`,
    `benchmark/presets/mini.yaml`, `examples/fscl_l2sp/`) names a file or folder that exists."""
    top = {p.name for p in REPO.iterdir() if not p.name.startswith(".")}
    missing = []
    for path in DOCUMENTS:
        for cited in CITED.findall(_prose(path)):
            first = cited.split("/", 1)[0]
            if "/" not in cited or first not in top or re.search(r"[<>{}]", cited):
                continue
            if not (any(REPO.glob(cited.rstrip("/"))) if "*" in cited else (REPO / cited).exists()):
                missing.append(f"{path.relative_to(REPO)} cites {cited}")
    assert not missing, "\n".join(missing)


def _defines(source: str, name: str) -> bool:
    """Whether a module's source defines, imports or exports ``name``."""
    return re.search(rf"^(?:def|class) {name}\b|^{name}\b\s*[:=]|\bimport\b[^\n]*\b{name}\b|[\"']{name}[\"']",
                     source, re.M) is not None


def test_every_module_cited_exists():
    """A backticked dotted name of our packages (`benchmark.vqa.questions`, `benchmark.plugins.StrategyPlugin`,
    `streams.Stream`) is a module of the tree, or a name that module defines."""
    missing = []
    for path in DOCUMENTS:
        for cited in CITED.findall(_prose(path)):
            parts = cited.replace(":", ".").split(".")
            if parts[0] not in PACKAGES or not all(p.isidentifier() for p in parts):
                continue
            module, rest = REPO / parts[0], parts[1:]
            while rest and ((module / rest[0]).is_dir() or (module / f"{rest[0]}.py").is_file()):
                module, rest = module / rest[0], rest[1:]
            source = module / "__init__.py" if module.is_dir() else module.with_suffix(".py")
            if len(rest) > 1 or (rest and not _defines(source.read_text(), rest[0])):
                missing.append(f"{path.relative_to(REPO)} cites {cited}")
    assert not missing, "\n".join(missing)


def test_the_readme_is_a_front_page():
    """Under 200 lines, opening with its title and the two commands; every docs page is linked from it."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 200, len(lines)
    assert lines[0] == "# fscl-bench" and lines[2] == "```" and lines[5] == "```"
    assert lines[3].startswith("make demo ") and lines[4].startswith("make test ")
    linked = set(LINK.findall(_prose(REPO / "README.md")))
    assert {f"docs/{p.name}" for p in DOCUMENTS[1:]} <= linked


def test_every_docs_page_opens_with_a_title_and_a_one_line_intro():
    for path in DOCUMENTS[1:]:
        title, blank, intro = path.read_text().splitlines()[:3]
        assert title.startswith("# ") and blank == "" and intro.strip(), path
