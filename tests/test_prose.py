"""The tutorial stands alone: no notebook (markdown and code sources) and not the README names a path outside the
repository (a sibling checkout, a machine's absolute path, design notes that are not in the project) or refers to
how the work was organised ("issue 7"). A reader who clones the repository must be able to follow every pointer."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted((ROOT / "nbs").glob("*.ipynb"))

OUTSIDE = [  # (what it is, pattern)
    ("a sibling folder of the checkout", r"\.\./shared\b|\.\./\.\./"),
    ("a design note that is not in the repository", r"\b(?:METHOD|STACK|ARCHITECTURE)\.md\b"),
    ("an absolute path of one machine", r"(?<![\w.~/-])/(?:work|home|root|Users|mnt|scratch)/[\w.-]"),
    ("a reference to the work's organisation", r"\bissues?\s*#?\d+\b|\bthe issue's\b"),
]
RX = [(what, re.compile(p)) for what, p in OUTSIDE]


def outside_refs(text: str) -> list[str]:
    "Each reference in `text` to something outside the repository, with a little context."
    hits = []
    for what, rx in RX:
        for m in rx.finditer(text):
            ctx = text[max(0, m.start() - 40):m.end() + 20].replace("\n", " ")
            hits.append(f"{what}: …{ctx}…")
    return hits


def notebook_refs(path: Path) -> list[str]:
    "Outside references in a notebook's markdown and code sources (outputs are not read), by cell."
    nb = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, cell in enumerate(nb["cells"]):
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        out += [f"cell {i} ({cell['cell_type']}): {h}" for h in outside_refs(src)]
    return out


def test_finder_catches_each_kind_and_spares_ordinary_prose():
    bad = ["see METHOD.md §2.3", "in ../shared/sentibench", "read /work/main/runs/demo", "as in issue 7",
           "issue #12 asked", "the issue's recipe", "/home/me/x.json", "ARCHITECTURE.md says"]
    for text in bad:
        assert outside_refs(text), text
    good = ["The reference keeps count > 10 of 20K texts.", "runs/demo/pairing/samples.jsonl", "`../` relative",
            "an issue with ties", "nbs/16_sampling.ipynb", "https://github.com/HITSZ-HLT/Sentiment-Distillation",
            "/usr/share/javascript/katex", "tests/fixtures/demo_run/README.md", "data/sentibench"]
    for text in good:
        assert not outside_refs(text), (text, outside_refs(text))


@pytest.mark.parametrize("nb", NBS, ids=[p.stem for p in NBS])
def test_notebook_stays_inside_the_repository(nb):
    hits = notebook_refs(nb)
    assert not hits, f"{nb.name} points outside the repository:\n" + "\n".join(hits)


def test_readme_stays_inside_the_repository():
    hits = outside_refs((ROOT / "README.md").read_text(encoding="utf-8"))
    assert not hits, "README.md points outside the repository:\n" + "\n".join(hits)


def test_index_lists_every_notebook():
    "The index's table of notebooks names every numbered notebook, so a reader finds each one from the start page."
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text(encoding="utf-8"))
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    missing = [p.stem for p in NBS if p.stem[0].isdigit() and f"`{p.stem}`" not in text]
    assert not missing, f"index.ipynb does not list: {missing}"
