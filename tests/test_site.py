"""The documentation site, checked in a real browser.

`make site` builds `_site/` (`python -m tools.build_site`); this suite rebuilds it when it is missing or older than
the notebooks, serves it on localhost and opens every page in headless Chromium, driven through the Chrome
DevTools Protocol (`websocket-client`). Each page must render with its title, the sidebar linking every
chapter, loaded figures, resolving local links, typeset formulas with no raw TeX left, and no `#|` lines
or raw front matter in its text. A screenshot of one chapter goes to /tmp for a human to look at.
"""
import functools
import http.server
import json
import re
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cdp import chromium_page
from tools import build_site, make_readme
from tools.nbtools import split_directives

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "_site"
NBS = ROOT / "nbs"
BUILD = ROOT / "tools" / "build_site.py"
SCREENSHOT_DIR = Path(tempfile.gettempdir())

NOTEBOOKS = build_site.source_notebooks()


# ------------------------------------------------------------------------------------ what the source says
def _visible_cells(rel: Path) -> list:
    "The source notebook's cells a reader sees (hidden / excluded cells dropped)."
    cells = json.loads((NBS / rel).read_text(encoding="utf-8"))["cells"]
    out = []
    for cell in cells:
        src = "".join(cell.get("source", ""))
        d = split_directives(src)[0] if cell["cell_type"] == "code" else {}
        if "hide" in d or d.get("include") == "false" or {"export", "exporti", "default_exp"} & d.keys():
            continue
        if d.get("output") == "false":
            cell = {**cell, "outputs": []}
        out.append((cell, src))
    return out


def expected_title(rel: Path) -> str:
    "The notebook's H1, which nbdev turns into the page title."
    for cell in json.loads((NBS / rel).read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            m = re.search(r"^#\s+(\S.*?)\s*$", "".join(cell["source"]), flags=re.MULTILINE)
            if m:
                return m.group(1)
    return build_site.fallback_title(rel)


def expects_images(rel: Path) -> bool:
    for cell, src in _visible_cells(rel):
        if cell["cell_type"] == "markdown" and re.search(r"!\[[^\]]*\]\(|<img\s", src):
            return True
        if any(k.startswith("image/") for o in cell.get("outputs", []) for k in o.get("data", {})):
            return True
    return False


def expects_math(rel: Path) -> bool:
    for cell, src in _visible_cells(rel):
        if cell["cell_type"] == "markdown":
            text = re.sub(r"```.*?```|`[^`\n]*`", "", src, flags=re.DOTALL)
            if re.search(r"(?<!\\)\$[^$\n]+\$|\$\$|\\begin\{", text):
                return True
    return False


# ------------------------------------------------------------------------------------ building and serving
def _site_is_stale() -> bool:
    manifest = SITE / "site.json"
    if not manifest.exists():
        return True
    built = manifest.stat().st_mtime
    pages = {page["source"] for page in json.loads(manifest.read_text())["pages"]}
    if pages != {f"nbs/{p.as_posix()}" for p in build_site.source_notebooks()}:
        return True
    inputs = [BUILD, BUILD.parent / "nbtools.py", ROOT / "settings.ini", ROOT / "_quarto.yml"]
    inputs += [p for p in NBS.rglob("*") if p.is_file() and p.name != "sidebar.yml"]
    inputs += list((ROOT / "llm_book").rglob("*.py"))  # show_doc output comes from the package
    return any(p.exists() and p.stat().st_mtime > built for p in inputs)


@pytest.fixture(scope="session")
def site() -> dict:
    "The built site's manifest; builds `_site/` first when it is missing or stale."
    if _site_is_stale():
        # A chapter that fails to build gets an error page and a non-zero exit; its page test reports it.
        subprocess.run([sys.executable, "-m", "tools.build_site"], cwd=ROOT, timeout=900)
    assert (SITE / "site.json").exists(), "python -m tools.build_site did not produce _site/site.json"
    manifest = json.loads((SITE / "site.json").read_text())
    return {page["source"]: page for page in manifest["pages"]}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


PAGE_PROBE = r"""
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null :
      new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, 5000); })));
  const rendered = 'script, style, pre, code, textarea, .MathJax_CHTML, .mjx-chtml, .MJX_Assistive_MathML, ' +
                   '.MathJax_Preview, .MathJax, .MathJax_Display, mjx-container, svg';
  const prose = document.body.cloneNode(true);
  prose.querySelectorAll(rendered).forEach(e => e.remove());
  return {
    title: document.title,
    h1: (document.querySelector('h1.title') || {textContent: ''}).textContent.trim(),
    subtitle: (document.querySelector('.title-block .subtitle') || {textContent: ''}).textContent.trim(),
    sidebar: [...document.querySelectorAll('#sidebar a[href]')].map(a => a.href),
    images: imgs.map(i => ({src: i.currentSrc.slice(0, 100), width: i.naturalWidth})),
    svgFigures: document.querySelectorAll('.output_area svg, .output_subarea svg').length,
    links: [...document.querySelectorAll('a[href], link[href]')].map(a => a.href),
    resources: [...document.querySelectorAll('img[src], script[src], link[rel=stylesheet][href]')]
                 .map(e => e.src || e.href),
    ids: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.getAttribute('name')),
    mathjax: document.documentElement.getAttribute('data-mathjax'),
    mathCount: document.querySelectorAll('.mjx-chtml, .MathJax_CHTML, mjx-container').length,
    mathErrors: [...document.querySelectorAll('.mjx-merror, merror, [data-mjx-error]')]
                 .map(e => e.textContent.slice(0, 120)),
    proseText: prose.textContent,
    visibleText: document.body.innerText,
  };
})()
"""


@pytest.fixture(scope="session")
def browser_report(site) -> dict:
    "Open every page of the site in headless Chromium; returns {source notebook: probe results}."
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    report = {}
    try:
        with chromium_page() as tools:
            for domain in ("Page", "Runtime", "Log"):
                tools.send(f"{domain}.enable")
            tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
            for source, page in site.items():
                # Start from a blank page so that late events of the previous page are not counted for this one.
                tools.send("Page.navigate", url="about:blank")
                tools.wait_event("Page.loadEventFired", timeout=30)
                tools.send("Runtime.evaluate", expression="0")
                tools.events.clear()
                url = base + page["href"]
                start = time.time()
                tools.send("Page.navigate", url=url)
                tools.wait_event("Page.loadEventFired", timeout=30)
                while time.time() - start < 15:  # MathJax typesets after the load event (the probe reports if not)
                    state = tools.evaluate("window.MathJax ? document.documentElement.getAttribute('data-mathjax') "
                                           ": 'not loaded'")
                    if state in ("done", "not loaded"):
                        break
                    time.sleep(0.05)
                probe = tools.evaluate(PAGE_PROBE)
                tools.send("Runtime.evaluate", expression="0")  # flush events that arrived meanwhile
                errors = []
                for ev in tools.events:
                    if ev["method"] == "Runtime.exceptionThrown":
                        d = ev["params"]["exceptionDetails"]
                        errors.append(f'JS exception: {d.get("exception", {}).get("description") or d.get("text")}')
                    elif ev["method"] == "Log.entryAdded" and ev["params"]["entry"]["level"] == "error":
                        e = ev["params"]["entry"]
                        errors.append(f'console error: {e.get("text")} {e.get("url", "")}')
                probe.update(url=url, errors=errors, seconds=time.time() - start)
                report[source] = probe
            # One chapter for a human to look at: the first with both formulas and figures, else the first chapter.
            chapters = [s for s in site if site[s]["part"]] or list(site)
            pick = next((s for s in chapters if site[s]["has_math"] and site[s]["has_images"]), chapters[0])
            tools.send("Page.navigate", url=base + site[pick]["href"])
            tools.wait_event("Page.loadEventFired", timeout=30)
            for _ in range(200):
                if tools.evaluate("document.documentElement.getAttribute('data-mathjax')") == "done":
                    break
                time.sleep(0.05)
            height = min(tools.evaluate("document.documentElement.scrollHeight"), 2400)
            shot = tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})
            import base64
            path = SCREENSHOT_DIR / f"llm_book_site_{Path(site[pick]['href']).stem}.png"
            path.write_bytes(base64.b64decode(shot["data"]))
            report["_screenshot"] = str(path)
    finally:
        server.shutdown()
    report["_base"] = base
    return report


# ------------------------------------------------------------------------------------ the checks
RAW_TEX = re.compile(r"\$\$|\\begin\{|\\end\{|\\(?:frac|sqrt|sum|prod|int|mathbf|mathbb|mathrm|mathcal|operatorname|"
                     r"left|right|cdot|times|odot|otimes|alpha|beta|gamma|theta|sigma|epsilon|lambda|mu|top|"
                     r"infty|partial|nabla|approx|le|ge|neq|in|text|hat|tilde|bar|vec|log|exp|max|min)(?![a-zA-Z])")
RAW_INLINE_MATH = re.compile(r"(?<![\\\w])\$[^$\n]{1,200}?[\\^_{}][^$\n]{0,200}?\$")
DIRECTIVE = re.compile(r"^\s*#\|\s*[\w-]+", re.MULTILINE)
FRONT_MATTER = re.compile(r"^---\s*\n\s*(?:title|description|output-file)\s*:|^output-file\s*:", re.MULTILINE)


def _local_path(url: str, base: str):
    "The `_site/` file a same-site URL points at (None for other sites) and its fragment."
    if not url.startswith(base):
        return None, None
    parsed = urllib.parse.urlparse(url)
    rel = urllib.parse.unquote(parsed.path)[1:] or "index.html"
    target = SITE / rel
    if target.is_dir():
        target = target / "index.html"
    return target, parsed.fragment


def page_problems(source: str, site: dict, report: dict) -> list:
    "Everything wrong with one page, as readable sentences (empty: the page is fine)."
    page, probe = site[source], report[source]
    rel = Path(source).relative_to("nbs")
    base = report["_base"]
    problems = []
    if page.get("error"):  # the page only shows the error; the checks of its content would add nothing
        return [f"build failed for this chapter:\n{page['error']}"] + probe["errors"]
    # renders, with its title and summary
    want = expected_title(rel)
    if not probe["title"].strip():
        problems.append("document has no <title>")
    if probe["h1"] != want:
        problems.append(f"page title {probe['h1']!r}, expected the notebook's H1 {want!r}")
    if page["description"] and probe["subtitle"] != page["description"]:
        problems.append(f"subtitle {probe['subtitle']!r}, expected {page['description']!r}")
    problems += probe["errors"]
    # navigation: a sidebar linking every page
    sidebar = {_local_path(u, base)[0] for u in probe["sidebar"]}
    missing = [p["href"] for p in site.values() if SITE / p["href"] not in sidebar]
    if missing:
        problems.append(f"sidebar lacks links to {missing}")
    # figures
    broken = [i["src"] for i in probe["images"] if i["width"] <= 0]
    if broken:
        problems.append(f"images that did not load: {broken}")
    if expects_images(rel) and not (probe["images"] or probe["svgFigures"]):
        problems.append("the notebook has figures but the page shows none")
    if rel.name not in CHAPTERS_WITHOUT_FIGURE_YET and not [i for i in probe["images"] if i["width"] > 0]:
        problems.append("a chapter page needs at least one figure (<img>) that teaches something measured; it has none")
    # links and resources
    for url in probe["links"] + probe["resources"]:
        if url.startswith(("data:", "mailto:", "javascript:")):
            continue
        target, fragment = _local_path(url, base)
        if target is None:
            if url.startswith(("http://127.0.0.1", "http://localhost")):
                problems.append(f"link to another local server: {url}")
            continue
        if not target.is_file():
            problems.append(f"broken local link {url[len(base) - 1:]} (no file {target.relative_to(SITE)})")
        elif fragment and target.suffix == ".html":
            target_source = next((s for s, p in site.items() if SITE / p["href"] == target), None)
            if target_source and not site[target_source].get("error") and fragment not in report[target_source]["ids"]:
                problems.append(f"link {url[len(base) - 1:]}: no element with id {fragment!r} on that page")
    external = [u for u in probe["resources"] if not u.startswith(("data:", base))]
    if external:
        problems.append(f"the page loads resources from the network (the site must work offline): {external}")
    # formulas
    if probe["mathjax"] != "done":
        problems.append(f"MathJax did not finish (data-mathjax={probe['mathjax']!r})")
    if expects_math(rel) and probe["mathCount"] == 0:
        problems.append("the notebook has formulas but nothing was typeset")
    if probe["mathErrors"]:
        problems.append(f"TeX errors: {probe['mathErrors'][:5]}")
    text = probe["proseText"]
    raw = sorted({m.group(0) for m in RAW_TEX.finditer(text)} | {m.group(0)[:60] for m in RAW_INLINE_MATH.finditer(text)})
    if raw:
        problems.append(f"raw TeX left in the text: {raw[:8]}")
    # no Quarto plumbing in what a reader sees
    lines = sorted({m.group(0).strip() for m in DIRECTIVE.finditer(probe["visibleText"])})
    if lines:
        problems.append(f"directive lines visible: {lines[:5]}")
    if FRONT_MATTER.search(probe["visibleText"]):
        problems.append("raw YAML front matter visible")
    return problems


# Chapters that still owe a measured figure (issue 13: "a figure in every chapter"). The list may only shrink;
# every other chapter page is checked for at least one loaded image.
CHAPTERS_WITHOUT_FIGURE_YET = {"index.ipynb"}

@pytest.mark.parametrize("notebook", [str(p) for p in NOTEBOOKS])
def test_page(notebook, site, browser_report):
    source = f"nbs/{notebook}"
    assert source in site, f"{source} has no page in _site/ (rebuild with `make site`)"
    problems = page_problems(source, site, browser_report)
    assert not problems, f"{site[source]['href']}:\n- " + "\n- ".join(problems)


def test_every_notebook_has_a_page_in_the_sidebar_yml(site):
    "Each notebook has exactly one page, and nbs/sidebar.yml (Quarto's sidebar) lists them all."
    import yaml
    sources = {f"nbs/{p.as_posix()}" for p in NOTEBOOKS}
    assert set(site) == sources
    sidebar = yaml.safe_load((NBS / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
    listed = []
    for entry in sidebar:
        listed += entry["contents"] if isinstance(entry, dict) else [entry]
    assert sorted(listed) == sorted(p.as_posix() for p in NOTEBOOKS)
    hrefs = [p["href"] for p in site.values()]
    assert len(set(hrefs)) == len(hrefs), f"two notebooks render to the same page: {hrefs}"


def test_quarto_config():
    "The top-level _quarto.yml is the config nbdev uses (via nbs/_quarto.yml) and names its metadata files."
    import yaml
    link = NBS / "_quarto.yml"
    assert link.is_symlink() and link.resolve() == (ROOT / "_quarto.yml").resolve()
    cfg = yaml.safe_load(link.read_text())
    assert cfg["project"]["type"] == "website"
    assert cfg["format"]["html"]["html-math-method"] in ("mathjax", "katex")
    for name in cfg["metadata-files"]:
        assert (NBS / name).is_file(), f"nbs/{name} named in _quarto.yml is missing"
    assert (NBS / cfg["format"]["html"]["css"]).is_file()
    from nbdev.config import get_config
    from nbdev.quarto import _nbdev_yml
    settings = get_config(path=ROOT)
    vals = {k: settings[k] for k in ["title", "description", "branch", "git_url", "doc_host", "doc_baseurl"]}
    assert (NBS / "nbdev.yml").read_text() == _nbdev_yml.format(doc_path=settings.doc_path.name, **vals)
    proc_copy = ROOT / "_proc" / "_quarto.yml"
    if proc_copy.exists():  # nbdev_proc_nbs copied the file behind the link, not the link
        assert not proc_copy.is_symlink() and proc_copy.read_text() == link.read_text()


def test_screenshot_taken(browser_report):
    path = Path(browser_report["_screenshot"])
    assert path.stat().st_size > 10_000, f"screenshot {path} looks empty"


# ------------------------------------------------------------------------------------ the tools' rules, no browser
def test_parts_and_page_names():
    "Chapters fall into the book's parts by number; pages drop the numbers as nbdev does."
    part = lambda name: build_site.part_of(Path(name))
    assert part("index.ipynb") is None
    assert [part(n) for n in ["01_head_attention.ipynb", "07_group_query_attention.ipynb", "08_kv_cache.ipynb",
                              "12_mistral.ipynb", "21_bpe_tokenizer.ipynb", "36_cli.ipynb", "42_chat.ipynb",
                              "appendix.ipynb"]] == ["Core building blocks", "Core building blocks", "Models", "Models",
                                                     "Tokenizers", "Training", "Real weights", "More"]
    assert build_site.output_name(Path("06a_gelu.ipynb")) == Path("gelu.html")
    assert build_site.fallback_title(Path("09d_configs.ipynb")) == "Configs"


def test_cell_options_and_markdown_fixes():
    opts, code = build_site.split_directives("#| echo: false\n#|output: asis\nshow_doc(f)\nx = 1  # not #| this")
    assert opts == {"echo": "false", "output": "asis"} and code == "show_doc(f)\nx = 1  # not #| this"
    link = build_site.pandoc_links_to_html('[source](https://x.org/a.py#L3){target="_blank" style="float:right"}')
    assert link == '<a href="https://x.org/a.py#L3" target="_blank" style="float:right">source</a>'
    assert build_site.escape_dollars(r"costs \$5, `\$x` stays") == r"costs \\$5, `\$x` stays"
    assert build_site.pandoc_id("Why divide by √d") == "why-divide-by-d"
    assert build_site.pandoc_id("Trainer.__init__") == "trainer.__init__"
    assert build_site.doc_link_fragment("trainer.__init__", {"trainer"}) == "trainer"


def test_code_fold_renders_as_details():
    "`#| code-fold: true` (an exercise's solution) folds the source into a closed <details>; `show` leaves it open."
    import nbformat
    nb = nbformat.v4.new_notebook()
    folded = nbformat.v4.new_code_cell("#| code-fold: true\n#| code-summary: Solution\nanswer = 6 * 7\nprint(answer)")
    folded.outputs = [nbformat.v4.new_output("stream", name="stdout", text="42\n")]
    shown = nbformat.v4.new_code_cell("#| code-fold: show\nvisible = 1")
    plain = nbformat.v4.new_code_cell("plain = 2")
    nb.cells = [nbformat.v4.new_markdown_cell("An exercise."), folded, shown, plain]
    body = build_site.notebook_html(nb)
    details = re.findall(r"<details([^>]*)><summary>([^<]*)</summary>(.*?)</details>", body, flags=re.DOTALL)
    assert [(attrs, summary) for attrs, summary, _ in details] == [(' class="code-fold"', "Solution"),
                                                                    (' class="code-fold" open', "Code")]
    assert "answer" in details[0][2] and "42" not in details[0][2]      # the source is folded, not the output
    assert "42" in body.split("</details>", 1)[1]
    assert "visible" in details[1][2] and "plain" not in "".join(d[2] for d in details)
    assert "#|" not in body


def test_make_readme_rules():
    "README: title and summary from the H1 cell, hidden/exported cells dropped, `echo: false` keeps the output."
    md = lambda s: {"cell_type": "markdown", "source": s, "metadata": {}}
    code = lambda s, outs=(): {"cell_type": "code", "source": s, "metadata": {}, "outputs": list(outs)}
    stream = lambda s: {"output_type": "stream", "name": "stdout", "text": s}
    nb = {"cells": [code("#| hide\nimport secret"), md("# My book\n\n> It builds things."), md("Intro $x$."),
                    code("#| export\ndef f(): pass"), code("#| echo: false\nprint('shown')", [stream("shown\n")]),
                    code("#| output: false\n1 + 1", [stream("hidden output\n")]), code("print(2)", [stream("2\n")])]}
    text, images = make_readme.render(nb)
    assert text.startswith("# My book\n\n> It builds things.\n\n<!-- WARNING")
    assert "Intro $x$." in text and "```\nshown\n```" in text and "print('shown')" not in text
    assert "```python\n1 + 1\n```" in text and "hidden output" not in text
    assert "```python\nprint(2)\n```\n\n```\n2\n```" in text
    assert "secret" not in text and "def f" not in text and "#|" not in text and images == {}
