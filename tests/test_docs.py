"""The docs website builds offline (tools/build_docs.py: nbdev-processed notebooks rendered by smalldocs) and a
built stage page, with its plots, loads in headless Chromium (driven through chromedriver's WebDriver HTTP API).

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver); skipped without them.
"""
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"03_data.ipynb": "data.html", "19_pipeline.ipynb": "pipeline.html"}  # a stage page with plots, the tutorial
MATHS_NB = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# maths\n\n> KaTeX offline"},
                      {"cell_type": "markdown", "metadata": {}, "source":
                       "Inline $\\mathrm{IFD} = \\mathrm{PPL}(y|x) / \\mathrm{PPL}(y)$ and display\n\n"
                       "$$\\sum_{i=1}^{n} \\frac{r_i}{|V|}$$\n"}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "A docs build of the index and PAGES, made in a scratch copy of the project (so it never touches _proc/)."
    work = tmp_path_factory.mktemp("docs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, work / name)
    (work / "nbs").mkdir(); (work / "tools").mkdir()
    for name in ["index.ipynb", "_quarto.yml", *PAGES]:
        shutil.copy(ROOT / "nbs" / name, work / "nbs" / name)
    shutil.copy(ROOT / "tools" / "build_docs.py", work / "tools" / "build_docs.py")
    (work / "nbs" / "98_maths.ipynb").write_text(json.dumps(MATHS_NB))  # maths must render without a CDN
    r = subprocess.run([sys.executable, "tools/build_docs.py", "--quiet"], cwd=work, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work / "_docs"


def test_site_has_pages_sidebar_and_search(site):
    for page in ["index.html", *PAGES.values()]:
        assert (site / page).is_file(), page
    html = (site / "data.html").read_text(encoding="utf-8")
    assert 'href="pipeline.html"' in html  # the sidebar links the tutorial
    assert "load_user_texts" in html  # an exported function is documented (nbdev show_doc)
    assert html.count("data:image/png;base64,") >= 1  # the notebook's saved plots are on the page
    index = (site / "index.html").read_text(encoding="utf-8")
    assert "as a literate nbdev library" in index  # a description over two lines is shown whole, not cut
    search = json.loads((site / "search.json").read_text(encoding="utf-8"))
    assert any("pipeline" in json.dumps(e) for e in search)
    assert not list(site.rglob("*.ipynb"))
    for page in site.glob("*.html"):  # nothing is fetched from the network
        remote = re.findall(r'(?:src|href)="(https?://[^"]+)"', page.read_text(encoding="utf-8"))
        assert not [u for u in remote if not u.startswith(("https://github.com", "http://github.com"))], (page, remote)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    "The few WebDriver commands the test needs, over HTTP (no selenium)."

    def __init__(self, driver: str, binary: str, profile: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": binary, "args": CHROME_FLAGS + [f"--user-data-dir={profile}"]}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["value"]

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str):
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": []})

    def browser_log(self) -> list[dict]:
        return self.cmd("POST", "/se/log", {"type": "browser"})

    def close(self):
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Debian chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    wd = WebDriver(driver, binary, tmp_path_factory.mktemp("chromium-profile"))
    yield wd
    wd.close()


@pytest.mark.parametrize("page", [*PAGES.values(), "maths.html"])
def test_page_and_plots_load_in_chromium(site, browser, page):
    browser.open((site / page).as_uri())
    state = browser.js("""
        const imgs = Array.from(document.images);
        return {ready: document.readyState, title: document.title,
                h1: (document.querySelector('h1') || {}).textContent || '',
                sidebar: document.querySelectorAll('#quarto-sidebar a, nav a').length,
                code: document.querySelectorAll('pre code, div.sourceCode').length,
                katex: document.querySelectorAll('.katex').length,
                css: Array.from(document.querySelectorAll('link[rel=stylesheet]')).map(l => !!l.sheet),
                bootstrap: getComputedStyle(document.body).getPropertyValue('--bs-body-font-family').length > 0,
                imgs: imgs.map(i => ({src: i.currentSrc.slice(0, 40), ok: i.complete && i.naturalWidth > 0,
                                       w: i.naturalWidth, h: i.naturalHeight}))};""")
    assert state["ready"] == "complete"
    assert state["title"] and state["h1"].strip(), state
    assert state["sidebar"] >= 3, state
    if page == "maths.html":
        assert state["katex"] >= 2, state  # KaTeX from site_libs rendered both formulas
    else:
        assert state["code"] >= 1, state
    assert state["css"] and all(state["css"]) and state["bootstrap"], state  # stylesheets from site_libs loaded
    if page == "data.html":
        assert len(state["imgs"]) >= 1, "the stage page shows no plot"
    bad = [i for i in state["imgs"] if not i["ok"]]
    assert not bad, f"images that did not load: {bad}"
    assert all(i["w"] >= 100 and i["h"] >= 50 for i in state["imgs"] if i["src"].startswith("data:image/png"))
    severe = [e for e in browser.browser_log() if e.get("level") == "SEVERE"]
    assert not severe, f"browser errors on {page}: {severe}"


def test_system_deps_target_skips_gracefully_without_apt(tmp_path):
    "`make system-deps` (run by `make test` and `make docs`) never fails a machine without apt-get or Chromium."
    make = shutil.which("make")
    if not make:
        pytest.skip("no make")
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("sh", "bash", "id", "env", "cat"):  # a PATH with a shell but no apt-get, chromium or chromedriver
        if shutil.which(tool):
            (fake / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([make, "-s", "system-deps"], cwd=ROOT, env={"PATH": str(fake)}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no apt-get" in r.stderr
    (fake / "apt-get").write_text("#!/bin/sh\nexit 100\n")  # apt-get that fails (no network, no rights)
    (fake / "apt-get").chmod(0o755)
    r = subprocess.run([make, "-s", "system-deps"], cwd=ROOT, env={"PATH": str(fake)}, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "could not install" in r.stderr, r.stderr


def test_show_docs_follow_definition_order():
    "nbdev inserts the docs of a cell's names in reverse; the build puts each run back in definition order."
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_docs
    finally:
        sys.path.pop(0)
    doc = lambda n: {"cell_type": "code", "source": f"#| echo: false\n#| output: asis\nshow_doc({n})"}
    prose = {"cell_type": "markdown", "source": "text"}
    module = "X = 1\n\ndef a(): pass\n\nclass B: pass\n\ndef c(): pass\n"
    cells = [doc("c"), doc("B"), doc("a"), prose, doc("c"), doc("nowhere"), doc("a")]
    got = [c["source"].split("show_doc(")[-1] if c["cell_type"] == "code" else "|" for c in build_docs.order_show_docs(cells, module)]
    assert got == ["a)", "B)", "c)", "|", "c)", "nowhere)", "a)"]  # a run with an unknown name is left alone
