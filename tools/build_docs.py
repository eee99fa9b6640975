"""Build the docs website offline: nbdev's processed notebooks, rendered by smalldocs (pure Python) into _docs/.

    python tools/build_docs.py                       # all notebooks -> _docs/
    python tools/build_docs.py --only 'index|19_'    # just these notebooks (regex on the file name), e.g. for tests
    python tools/build_docs.py --out /tmp/site       # somewhere else

Steps: (1) `nbdev.serve.proc_nbs` writes processed notebooks (show_doc cells for every exported name, directives
applied) into _proc/; it executes only export cells, show_doc cells and cells that are nothing but imports (nbdev
would also run cells mixing imports with other code, which then miss the variables of unexecuted cells);
(2) each page is named as nbdev names it, keeps its whole `> description` (nbdev keeps its first line only) and
shows the docs of a cell's names in the order they are defined (nbdev inserts them in reverse);
(3) _proc/sidebar.yml lists the notebooks in order, grouped as the index describes; (4) `smalldocs render _proc`.
KaTeX for maths is copied into the site from a local copy (Debian's libjs-katex), so pages work offline.
Quarto is not needed (`nbdev-docs` needs it; `nbdev-proc-nbs` tries to install it).
"""
import argparse
import ast
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KATEX_DIRS = [os.environ.get("KATEX_DIR", ""), "/usr/share/javascript/katex"]  # Debian: apt-get install libjs-katex
GROUPS = [  # (section title, notebook-number regex)
    ("Foundations", r"^0\d"), ("Instruction construction", r"^1[0-2]"), ("Distillation data", r"^1[3-6]"),
    ("Student and evaluation", r"^1[78]"), ("End to end", r"^(19|2\d)"), ("Command line", r"^9\d")]


def _patch_nbdev_eval():
    "Execute only export/show_doc cells and pure-import cells while processing (see the module docstring)."
    import nbdev.processors as P
    if getattr(P._do_eval, "_compeffdist", False):
        return
    original = P._do_eval

    def _do_eval(cell):
        if not original(cell):
            return False
        if cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}:
            return True
        trees = cell.parsed_()
        return bool(P._show_docs(trees)) or all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in trees)
    _do_eval._compeffdist = True
    P._do_eval = _do_eval
    warnings.filterwarnings("ignore", message="Found cells containing imports")


def _frontmatter(nb: dict) -> tuple[int, dict]:
    "Index and parsed YAML of the processed notebook's front-matter (raw) cell."
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] == "raw" and src.startswith("---"):
            return i, yaml.safe_load(src.strip().strip("-")) or {}
    return -1, {}


def full_description(nb: dict) -> str | None:
    "The `> description` of a notebook's title cell, all its lines joined (nbdev keeps only the first line)."
    md = next((c for c in nb["cells"] if c["cell_type"] == "markdown"), None)
    if md is None:
        return None
    src = "".join(md["source"]) if isinstance(md["source"], list) else md["source"]
    m = re.search(r"^>[ \t]*\S.*(?:\n>.*)*", src, flags=re.MULTILINE)
    return " ".join(l.lstrip(">").strip() for l in m.group(0).splitlines()).strip() if m else None


def _module_source(nb: dict) -> str:
    "The source of the module a notebook exports to (`#| default_exp`), or ''."
    for c in nb["cells"]:
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] == "code" and (m := re.search(r"^#\|\s*default_exp\s+(\S+)", src, flags=re.MULTILINE)):
            path = ROOT / "compeffdist" / (m.group(1).replace(".", "/") + ".py")
            return path.read_text(encoding="utf-8") if path.is_file() else ""
    return ""


def order_show_docs(cells: list, module: str) -> list:
    """Put each run of consecutive `show_doc` cells in the order the names are defined in the module (nbdev inserts
    the docs of a cell's names in reverse order). A run with a name not found in the module is left as it is."""
    def name(c):
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        m = re.search(r"^show_doc\(([\w.]+)\)\s*$", src, flags=re.MULTILINE) if c["cell_type"] == "code" else None
        return m.group(1) if m else None

    def line(n):
        last = n.split(".")[-1]
        m = re.search(rf"^(?:(?:async )?def|class) {re.escape(last)}\b|^{re.escape(last)}\s*[:=]", module, flags=re.MULTILINE)
        return module.count("\n", 0, m.start()) if m else None

    out, i = [], 0
    while i < len(cells):
        j = i
        while j < len(cells) and name(cells[j]):
            j += 1
        if j > i:
            lines = [line(name(c)) for c in cells[i:j]]
            run = cells[i:j]
            out += [c for _, c in sorted(zip(lines, run), key=lambda x: x[0])] if None not in lines else run
            i = j
        else:
            out.append(cells[i]); i += 1
    return out


def name_pages(proc: Path) -> list[tuple[str, str, str]]:
    "Rename each processed notebook to its nbdev page name (`output-file`, e.g. pipeline.html <- 19_pipeline.ipynb),\n    which smalldocs does not read; returns (original name, new name, title) in notebook order."
    pages = []
    for p in sorted(proc.glob("*.ipynb")):
        nb = json.loads(p.read_text(encoding="utf-8"))
        i, fm = _frontmatter(nb)
        target = Path(fm.pop("output-file", p.stem + ".html")).stem + ".ipynb"
        src = ROOT / "nbs" / p.name
        if src.is_file():
            orig = json.loads(src.read_text(encoding="utf-8"))
            if fm.get("description"):
                fm["description"] = full_description(orig) or fm["description"]
            nb["cells"] = order_show_docs(nb["cells"], _module_source(orig))
        if i >= 0:
            nb["cells"][i]["source"] = "---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n"
        (proc / target).write_text(json.dumps(nb, ensure_ascii=False), encoding="utf-8")
        if target != p.name:
            p.unlink()
        pages.append((p.name, target, str(fm.get("title") or p.stem)))
    return pages


def sidebar(pages: list[tuple[str, str, str]]) -> dict:
    "The sidebar: the index first, then the notebooks grouped by number."
    contents = [{"href": new, "text": "Overview"} for old, new, _ in pages if old == "index.ipynb"]
    for section, rx in GROUPS:
        items = [{"href": new, "text": f"{old.split('_')[0]} · {title}"} for old, new, title in pages
                 if re.match(rx, old)]
        if items:
            contents.append({"section": section, "contents": items})
    return {"website": {"sidebar": {"contents": contents}}}


def vendor_katex(out: Path) -> bool:
    "Serve KaTeX (maths) from the site instead of a CDN: copy a local KaTeX into site_libs/katex; False if none."
    src = next((Path(d) for d in KATEX_DIRS if d and (Path(d) / "katex.min.js").is_file()), None)
    if src is None:
        return False
    dst = out / "site_libs" / "katex"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("katex.min.css", "katex.min.js"):
        shutil.copy(src / name, dst / name)
    shutil.copytree((src / "fonts").resolve(), dst / "fonts", dirs_exist_ok=True)
    (dst / "contrib").mkdir(exist_ok=True)
    auto = next(p for p in (src / "contrib" / "auto-render.min.js", src / "contrib" / "auto-render.js") if p.is_file())
    shutil.copy(auto, dst / "contrib" / "auto-render.min.js")
    return True


def build(only: str | None = None, out: Path | None = None, quiet: bool = False) -> Path:
    "Process the notebooks and render the site; returns the output folder."
    os.chdir(ROOT)
    _patch_nbdev_eval()
    from nbdev.serve import proc_nbs
    proc = ROOT / "_proc"
    if proc.exists():
        shutil.rmtree(proc)
    proc_nbs(str(ROOT / "nbs"), n_workers=0, file_re=only or "")  # in-process, so the patch above applies
    if only:  # proc_nbs copies every other file; keep only the selected notebooks
        for p in proc.glob("*.ipynb"):
            if not re.search(only, p.name):
                p.unlink()
    pages = name_pages(proc)
    (proc / "sidebar.yml").write_text(yaml.safe_dump(sidebar(pages), sort_keys=False), encoding="utf-8")
    out = Path(out or ROOT / "_docs").resolve()
    qy = yaml.safe_load((proc / "_quarto.yml").read_text(encoding="utf-8"))
    qy["project"]["output-dir"] = os.path.relpath(out, proc)
    (proc / "_quarto.yml").write_text(yaml.safe_dump(qy, sort_keys=False), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    import smalldocs.layout as layout
    from smalldocs.cli import main as smalldocs
    katex = any(d and (Path(d) / "katex.min.js").is_file() for d in KATEX_DIRS)
    if katex:
        layout.KATEX = "site_libs/katex"  # every page sits at the site root
    else:
        print("warning: no local KaTeX (apt-get install libjs-katex, or KATEX_DIR=...): pages with maths load it "
              "from a CDN", file=sys.stderr)
    argv = ["render", str(proc)] + (["--quiet"] if quiet else [])
    rc = smalldocs(argv)
    if rc:
        raise SystemExit(f"smalldocs render failed (exit {rc})")
    if katex:
        vendor_katex(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="regex on notebook file names to render (default: all)")
    ap.add_argument("--out", type=Path, help="output folder (default: _docs)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    site = build(a.only, a.out, a.quiet)
    print(f"docs: {site / 'index.html'}")
