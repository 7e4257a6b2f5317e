"""Build the offline documentation site: `nbs/*.ipynb` -> `_site/*.html` (what `make site` runs).

Quarto (what `nbdev_docs` uses) may not be installed, so this renders the same processed notebooks Quarto
would render, with nbconvert instead:

1. `nbdev_proc_nbs` copies `nbs/` into `_proc/` and runs nbdev's processors (front matter from the H1 and
   `>` line, `#| hide` cells removed, `show_doc` cells executed, names linkified).
2. Each processed notebook is rendered with nbconvert into `_site/<output-file>` (nbdev's name: numbers
   dropped, `01_head_attention.ipynb` -> `head_attention.html`) inside a page with a title block, a
   sidebar listing every chapter grouped in parts, an "on this page" list and previous/next links.
   Quarto cell options are honoured (`echo`, `output`, `include`, `code-fold` and `code-summary`: the source
   in a `<details>`, shown on a click) and their `#|` lines removed.
3. MathJax 2 is copied from Debian's `libjs-mathjax` into `_site/mathjax/`, so the site needs no network.

Run it from the repository root: `python -m tools.build_site`. It also rewrites `nbs/sidebar.yml`
(settings.ini has `custom_sidebar = True`), the parts Quarto shows.
`--sidebar-only` does just that. Failing chapters get an error page; the build then exits with status 1.
"""
import argparse
import fcntl
import hashlib
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from tools.nbtools import front_matter, split_directives

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
PROC = ROOT / "_proc"
SITE = ROOT / "_site"
MATHJAX_SRC = Path(os.environ.get("MATHJAX_DIR", "/usr/share/javascript/mathjax"))
# The parts of the book, by the chapter number a notebook's name starts with (`09a_` -> 9).
PARTS = [(0, 7, "Core building blocks"), (8, 19, "Models"), (20, 29, "Tokenizers"),
         (30, 39, "Training"), (40, 49, "Real weights"), (50, 59, "Fine-tuning")]
OTHER_PART = "More"
# The MathJax 2 files a page needs for TeX input and CommonHTML output (the rest is loaded on demand).
MATHJAX_FILES = ["MathJax.js", "config/TeX-AMS_CHTML.js", "extensions", "jax/input/TeX", "jax/element",
                 "jax/output/CommonHTML", "fonts/HTML-CSS/TeX/woff", "localization/en"]
ASSET_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".ico", ".pdf", ".mp4", ".webm"}


# ---------------------------------------------------------------------------------------------- notebooks
def source_notebooks() -> list:
    "The notebooks nbdev documents (its `nbglob`: recursive, skipping `_`/`.` files and folders), index first."
    from nbdev.doclinks import nbglob
    cwd = os.getcwd()
    os.chdir(ROOT)  # nbglob reads settings.ini (recursive = ...) from the working directory
    try:
        paths = [Path(p).relative_to(NBS) for p in nbglob(NBS, func=Path)]
    finally:
        os.chdir(cwd)
    return sorted(paths, key=lambda p: (p.name != "index.ipynb", str(p)))


def chapter_number(rel: Path):
    m = re.match(r"^(\d+)", rel.name)
    return int(m.group(1)) if m else None


def part_of(rel: Path):
    "The part a notebook belongs to; None for the index page."
    if rel.name == "index.ipynb" and rel.parent == Path("."):
        return None
    num = chapter_number(rel)
    for lo, hi, name in PARTS:
        if num is not None and lo <= num <= hi:
            return name
    return OTHER_PART


def output_name(rel: Path) -> Path:
    "nbdev's page name for a notebook: lower case, leading chapter number dropped (`_nbpath2html`)."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(rel)


def fallback_title(rel: Path) -> str:
    "A title from the file name, numbers dropped as nbdev's sidebar does."
    name = re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.stem).replace("_", " ")
    return name[:1].upper() + name[1:]


def write_sidebar_yml(notebooks: list) -> str:
    "Write `nbs/sidebar.yml`: the index, then each part as a Quarto sidebar section. Returns the YAML."
    lines = ["website:", "  sidebar:", "    contents:"]
    grouped = {}
    for rel in notebooks:
        part = part_of(rel)
        if part is None:
            lines.append(f"      - {rel.as_posix()}")
        else:
            grouped.setdefault(part, []).append(rel)
    for part in [name for _, _, name in PARTS] + [OTHER_PART]:
        if part in grouped:
            lines += [f"      - section: {part}", "        contents:"]
            lines += [f"          - {rel.as_posix()}" for rel in grouped[part]]
    text = "\n".join(lines) + "\n"
    target = NBS / "sidebar.yml"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return text


# ---------------------------------------------------------------------------------------------- processing
def run_proc_nbs(notebooks: list) -> dict:
    "Run `nbdev_proc_nbs` into `_proc/`; returns {notebook: error message} for notebooks it could not process."
    import nbdev.quarto as nbq
    nbq._ensure_quarto = lambda: None  # nbdev would try to download Quarto; we only need the processing
    errors = {}
    try:
        nbq.nbdev_proc_nbs.__wrapped__()
    except Exception:  # one bad notebook stops nbdev's parallel run: redo the rest one by one to find it
        from nbdev.processors import FilterDefaults
        from nbdev.serve_drv import main as proc_one
        for rel in notebooks:
            src, dst = NBS / rel, PROC / rel
            if dst.exists() and dst.stat().st_mtime >= src.stat().st_mtime:
                continue
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                proc_one((src, dst, FilterDefaults))
            except Exception as exc:
                cause = exc.__cause__ or exc
                errors[rel] = f"{exc}\n{type(cause).__name__}: {cause}"
                imports = re.findall(r"^\s*((?:from\s+\S+\s+)?import\s.+?)\s*$", str(exc), flags=re.MULTILINE)
                if isinstance(cause, NameError) and imports:
                    errors[rel] += ("\nnbdev_docs runs every cell that contains an import (so that show_doc works), "
                                    "and this cell also uses names from earlier cells. Move "
                                    + ", ".join(f"`{i}`" for i in imports) + " into a cell of its own (or the "
                                    "notebook's imports cell); see nbdev's FAQ on 'cells containing imports'.")
                if dst.exists():
                    dst.unlink()
    return errors


_re_pandoc_link = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)\{([^}\n]*)\}")


def pandoc_links_to_html(text: str) -> str:
    "`[text](url){target=\"_blank\" .cls}` (Pandoc attributes, as `show_doc` writes) -> an HTML link."
    def repl(m):
        attrs, classes = [], []
        for tok in re.findall(r'[\w-]+="[^"]*"|[\w-]+=\S+|\.[\w-]+|#[\w-]+', m.group(3)):
            if tok.startswith("."):
                classes.append(tok[1:])
            elif tok.startswith("#"):
                attrs.append(f'id="{tok[1:]}"')
            else:
                attrs.append(tok)
        if classes:
            attrs.append(f'class="{" ".join(classes)}"')
        return f'<a href="{html.escape(m.group(2))}" {" ".join(attrs)}>{m.group(1)}</a>'
    return _re_pandoc_link.sub(repl, text)


def escape_dollars(text: str) -> str:
    r"Keep `\$` (a literal dollar) through markdown so MathJax (`processEscapes`) shows `$` and not math."
    parts = re.split(r"(```.*?```|`[^`\n]*`)", text, flags=re.DOTALL)
    return "".join(p if i % 2 else re.sub(r"(?<!\\)\\\$", r"\\\\$", p) for i, p in enumerate(parts))


def prepare_notebook(nb):
    "Front matter out of the notebook, Quarto cell options applied, directive lines removed. Returns (nb, fm)."
    fm, cells = {}, []
    for cell in nb.cells:
        src = cell.get("source", "") or ""
        if cell.cell_type == "raw" and front_matter(src, "raw"):
            fm.update(front_matter(src, "raw"))
            continue
        if cell.cell_type == "markdown":
            cell.source = pandoc_links_to_html(escape_dollars(src))
            if not cell.source.strip():
                continue
        if cell.cell_type == "code":
            opts, code = split_directives(src)
            if opts.get("include") == "false" or "hide" in opts or opts.get("hide") == "true":
                continue
            cell.source = code
            if opts.get("output") == "false":
                cell.outputs = []
            if opts.get("echo") == "false" or not code.strip():
                cell.metadata.setdefault("transient", {})["remove_source"] = True
            elif opts.get("code-fold") in ("true", "show"):  # Quarto's folded code: a <details> (fold_code_cells)
                summary = opts.get("code-summary") or "Code"
                tag = "code-fold-show" if opts["code-fold"] == "show" else "code-fold"
                cell.metadata["tags"] = [*cell.metadata.get("tags", []), tag]
                cell.metadata["code_summary"] = summary[:1].upper() + summary[1:]
            if not code.strip() and not cell.outputs:
                continue
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if "text/markdown" in data:
                    data["text/markdown"] = pandoc_links_to_html(escape_dollars(data["text/markdown"]))
        cells.append(cell)
    nb.cells = cells
    return nb, fm


_re_folded_input = re.compile(
    r'(<div class="cell [^"]*\bcelltag_(code-fold(?:-show)?)\b[^"]*"[^>]*>\s*)'   # the cell's opening tag
    r'(<div class="input">.*?</pre></div>\s*</div>\s*</div>\s*</div>)', re.DOTALL)  # its input: the source


def fold_code_cells(body: str, summaries: list) -> str:
    "Wrap the source of cells tagged `code-fold` (`code-fold-show`: open) in `<details>`, as Quarto's code-fold does."
    summaries = iter(summaries)

    def repl(m):
        is_open = " open" if m.group(2) == "code-fold-show" else ""
        summary = html.escape(next(summaries, "Code"))
        return (f'{m.group(1)}<details class="code-fold"{is_open}><summary>{summary}</summary>\n'
                f'{m.group(3)}\n</details>')
    return _re_folded_input.sub(repl, body)


def has_image_outputs(nb) -> bool:
    "Does the notebook show a picture (an image output or a markdown image)?"
    for cell in nb.cells:
        if cell.cell_type == "markdown" and re.search(r"!\[[^\]]*\]\(|<img\s", cell.source):
            return True
        for out in cell.get("outputs", []):
            if any(k.startswith("image/") for k in out.get("data", {})):
                return True
    return False


def has_math(nb) -> bool:
    "Does the notebook's text (markdown cells or markdown outputs) contain TeX math?"
    texts = [c.source for c in nb.cells if c.cell_type == "markdown"]
    texts += [o["data"]["text/markdown"] for c in nb.cells for o in c.get("outputs", [])
              if "text/markdown" in o.get("data", {})]
    pattern = r"(?<!\\)\$[^$\n]+\$|\$\$|\\begin\{|\\\(|\\\["
    return any(re.search(pattern, re.sub(r"```.*?```|`[^`\n]*`", "", t, flags=re.DOTALL)) for t in texts)


# ---------------------------------------------------------------------------------------------- HTML
def pandoc_id(text: str) -> str:
    "Pandoc's (so Quarto's and nbdev's doc links') heading identifier."
    s = re.sub(r"[^\w\s.-]", "", text.strip().lower())
    s = re.sub(r"\s+", "-", s)
    s = re.sub(r"^[^a-z]+", "", s)
    return s or "section"


def fix_headings(body: str):
    "Pandoc-style heading ids (`#configs`, `#basetokenizer`); returns (body, [(level, id, text)] of h2/h3)."
    used, toc = set(), []

    def repl(m):
        level, inner = m.group(1), m.group(3)
        inner = re.sub(r'<a class="anchor-link"[^>]*>.*?</a>', "", inner)
        text = html.unescape(re.sub(r"<[^>]+>", "", inner)).strip()
        base = pandoc_id(text)
        hid, n = base, 0
        while hid in used:
            n += 1
            hid = f"{base}-{n}"
        used.add(hid)
        if level in "23":
            toc.append((int(level), hid, text))
        return f'<h{level} id="{hid}" class="anchored">{inner}<a class="anchor-link" href="#{hid}" aria-label="link to this section">#</a></h{level}>'

    body = re.sub(r'<h([1-6]) id="([^"]*)"[^>]*>(.*?)</h\1>', repl, body, flags=re.DOTALL)
    return body, toc


def relative(target: Path, page: Path) -> str:
    "Link from site page `page` to site file `target` (both relative to `_site/`)."
    return Path(os.path.relpath(target, page.parent or Path("."))).as_posix()


def doc_link_fragment(fragment: str, ids) -> str:
    "nbdev links every documented name (`#trainer.__init__`); without a `show_doc` of its own, use its class's."
    while fragment and fragment not in ids:
        fragment = fragment.rpartition(".")[0]
    return fragment


def rewrite_links(body: str, page_rel: Path, nb_rel: Path, pages: dict, doc_root: str, anchors: dict) -> str:
    "Links to notebooks (`x.ipynb`, `01_x.html`) and to the published site become links to our pages."
    by_name = {}
    for rel, info in pages.items():
        by_name[rel.as_posix()] = info["href"]
        by_name[rel.with_suffix(".html").as_posix()] = info["href"]
        by_name[info["href"]] = info["href"]

    def fix(url: str) -> str:
        if doc_root and url.startswith(doc_root):  # nbdev's links to names: to the published site
            target = url[len(doc_root):].lstrip("/") or "index.html"
            path, _, frag = target.partition("#")
            if frag and path in anchors:
                frag = doc_link_fragment(frag, anchors[path])
            return relative(Path(path), page_rel) + (f"#{frag}" if frag else "")
        if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", url, flags=re.I):
            return url
        path, hashmark, frag = url.partition("#")
        if not path.endswith((".ipynb", ".html")):
            return url
        key = os.path.normpath((nb_rel.parent / path).as_posix()).replace(os.sep, "/")
        if key in by_name:
            return relative(Path(by_name[key]), page_rel) + (f"#{frag}" if hashmark else "")
        return url

    return re.sub(r'(\s(?:href|src)=")([^"]*)(")',
                  lambda m: m.group(1) + html.escape(fix(html.unescape(m.group(2)))) + m.group(3), body)


def sidebar_html(pages: dict, current: Path, page_rel: Path) -> str:
    out = ['<nav class="sidebar" id="sidebar" aria-label="Chapters">']
    grouped = {}
    for rel, info in pages.items():
        grouped.setdefault(info["part"], []).append((rel, info))

    def item(rel, info):
        cls = ' class="active" aria-current="page"' if rel == current else ""
        return (f'<li><a href="{relative(Path(info["href"]), page_rel)}"{cls}>'
                f'{html.escape(info["title"])}</a></li>')

    for rel, info in grouped.get(None, []):
        out.append(f'<ul class="home">{item(rel, info)}</ul>')
    for part in [name for _, _, name in PARTS] + [OTHER_PART]:
        if part in grouped:
            out.append(f'<div class="part"><p class="part-title">{html.escape(part)}</p><ul>')
            out += [item(rel, info) for rel, info in grouped[part]]
            out.append("</ul></div>")
    out.append("</nav>")
    return "\n".join(out)


MATHJAX_CONFIG = r"""<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {inlineMath: [['$', '$'], ['\\(', '\\)']], displayMath: [['$$', '$$'], ['\\[', '\\]']],
            processEscapes: true, processEnvironments: true,
            skipTags: ['script', 'noscript', 'style', 'textarea', 'pre', 'code']},
  TeX: {extensions: ['AMSmath.js', 'AMSsymbols.js'],
        noErrors: {disabled: true}, noUndefined: {disabled: true}},  // bad TeX shows as an error
  CommonHTML: {linebreaks: {automatic: true}},
  messageStyle: 'none', showMathMenu: false
});
MathJax.Hub.Register.StartupHook('End', function () {
  document.documentElement.setAttribute('data-mathjax', 'done');
});
</script>"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{page_title}</title>
<meta name="description" content="{description}">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{root}site.css">
{mathjax_config}
<script src="{root}mathjax/MathJax.js?config=TeX-AMS_CHTML"></script>
</head>
<body>
<header class="topbar"><a class="brand" href="{root}index.html">{site_title}</a>
<span class="tagline">{site_description}</span></header>
<div class="layout">
{sidebar}
<main class="content" id="content">
<header class="title-block">
<h1 class="title">{title}</h1>
{subtitle}
</header>
{body}
{pager}
</main>
{toc}
</div>
</body>
</html>
"""


def site_css() -> str:
    from pygments.formatters import HtmlFormatter
    highlight = HtmlFormatter(style="friendly").get_style_defs(".highlight")
    return """/* llm_book offline site (tools/build_site.py) */
:root { --accent: #2780e3; --muted: #6c757d; --border: #dee2e6; --code-bg: #f7f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.6 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #212529; background: #fff; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
.topbar { background: var(--accent); color: #fff; padding: .6rem 1.5rem; display: flex; gap: 1rem;
          align-items: baseline; }
.topbar .brand { color: #fff; font-weight: 600; font-size: 1.15rem; }
.topbar .tagline { opacity: .85; font-size: .9rem; }
.layout { display: grid; grid-template-columns: 15rem minmax(0, 1fr) 12rem; gap: 2rem; max-width: 92rem;
          margin: 0 auto; padding: 0 1rem; }
.sidebar, .toc { position: sticky; top: 0; align-self: start; max-height: 100vh; overflow-y: auto;
                 padding: 1.5rem 0; font-size: .9rem; }
.sidebar ul, .toc ul { list-style: none; margin: 0; padding: 0; }
.sidebar li a { display: block; padding: .15rem .5rem; border-radius: .25rem; color: #343a40; }
.sidebar li a.active { background: #e7f1fc; color: var(--accent); font-weight: 600; }
.sidebar .part-title { margin: 1rem 0 .25rem .5rem; font-weight: 600; color: var(--muted);
                       text-transform: uppercase; font-size: .75rem; letter-spacing: .05em; }
.toc .toc-title { font-weight: 600; margin: 0 0 .25rem; }
.toc li { padding: .1rem 0; overflow-wrap: anywhere; } .toc li.h3 { padding-left: .8rem; font-size: .85rem; }
.content { padding: 1.5rem 0 4rem; min-width: 0; }
.title-block { border-bottom: 1px solid var(--border); margin-bottom: 1.5rem; padding-bottom: .5rem; }
.title-block .title { margin: 0 0 .25rem; font-size: 2.2rem; }
.title-block .subtitle { margin: 0 0 .5rem; color: var(--muted); font-size: 1.15rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid var(--border); padding-bottom: .2rem; }
h2, h3, h4 { scroll-margin-top: 1rem; }
.anchor-link { visibility: hidden; margin-left: .4rem; font-size: .8em; color: var(--muted); }
h2:hover .anchor-link, h3:hover .anchor-link, h4:hover .anchor-link { visibility: visible; }
.cell { margin: 1rem 0; }
.input_area .highlight, .content pre { background: var(--code-bg); border: 1px solid var(--border);
       border-radius: .3rem; padding: .6rem .8rem; overflow-x: auto; font-size: .85rem; line-height: 1.45; }
.input_area .highlight pre { margin: 0; padding: 0; border: 0; background: none; }
.output_area pre { background: #fff; border-left: 3px solid var(--border); border-radius: 0; }
code { font-size: .88em; background: var(--code-bg); padding: .05rem .25rem; border-radius: .2rem; }
pre code { background: none; padding: 0; }
.output_area img { max-width: 100%; height: auto; }
.rendered_html img { max-width: 100%; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .92rem; }
th, td { border-bottom: 1px solid var(--border); padding: .3rem .7rem; text-align: left; vertical-align: top; }
.output_markdown hr { border: 0; border-top: 1px solid var(--border); margin: 1.5rem 0 .5rem; }
.output_markdown h3, .output_markdown h4 { margin-top: .3rem; }
.output_markdown a[target="_blank"] { font-size: .85rem; }
.output_error pre, .build-error pre { border-left-color: #dc3545; color: #842029; white-space: pre-wrap; }
.pager { display: flex; justify-content: space-between; margin-top: 3rem; padding-top: 1rem;
         border-top: 1px solid var(--border); }
.mjx-chtml { outline: none; }
details.code-fold > summary { cursor: pointer; color: var(--muted); font-size: .9rem; margin: .2rem 0; }
details.code-fold[open] > summary { margin-bottom: .3rem; }
@media (max-width: 68rem) { .layout { grid-template-columns: 14rem minmax(0, 1fr); } .toc { display: none; } }
@media (max-width: 48rem) { .layout { display: block; } .sidebar { position: static; max-height: none; } }
""" + highlight + "\n"


def copy_mathjax(dest: Path):
    if not (MATHJAX_SRC / "MathJax.js").exists():
        raise SystemExit(f"MathJax not found at {MATHJAX_SRC}: install Debian's libjs-mathjax and fonts-mathjax "
                         "(`make system-deps`), or set MATHJAX_DIR to a MathJax 2 folder")
    missing = [item for item in MATHJAX_FILES if not (MATHJAX_SRC / item).exists()]
    if missing:  # the woff fonts come from fonts-mathjax, the rest from libjs-mathjax
        raise SystemExit(f"MathJax at {MATHJAX_SRC} lacks {missing}: install libjs-mathjax and fonts-mathjax")
    for item in MATHJAX_FILES:
        src, dst = MATHJAX_SRC / item, dest / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():  # symlinked files become real files: the site must stand alone
            shutil.copytree(src, dst, symlinks=False, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)


def notebook_html(nb) -> str:
    "A processed notebook's cells as HTML (nbconvert's basic template), cell options applied, folded code folded."
    from nbconvert import HTMLExporter
    nb, _ = prepare_notebook(nb)
    exporter = HTMLExporter(template_name="basic", exclude_input_prompt=True, exclude_output_prompt=True,
                            anchor_link_text="#")
    body, _ = exporter.from_notebook_node(nb)
    return fold_code_cells(body, [c.metadata["code_summary"] for c in nb.cells if "code_summary" in c.metadata])


def render_body(rel: Path, error: str = None):
    "The chapter's HTML (nbconvert), its h2/h3 list and its element ids; an error notice if it failed."
    import nbformat
    if error is not None:
        body = (f'<div class="build-error"><p>This chapter could not be processed for the documentation '
                f'(nbdev_proc_nbs failed):</p><pre>{html.escape(error)}</pre></div>')
        return body, [], set()
    body, toc = fix_headings(notebook_html(nbformat.read(PROC / rel, as_version=4)))
    return body, toc, set(re.findall(r'\sid="([^"]+)"', body))


def render_page(rel: Path, pages: dict, cfg, body: str, toc: list, anchors: dict) -> str:
    "The whole page: title block, sidebar, the chapter with its links made local, on-this-page, pager."
    info = pages[rel]
    page_rel = Path(info["href"])
    root = "../" * (len(page_rel.parts) - 1)
    body = rewrite_links(body, page_rel, rel, pages, f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip("/") + "/", anchors)
    order = list(pages)
    i = order.index(rel)
    prev_link = next_link = ""
    if i > 0:
        p = pages[order[i - 1]]
        prev_link = f'<a class="prev" href="{relative(Path(p["href"]), page_rel)}">&larr; {html.escape(p["title"])}</a>'
    if i + 1 < len(order):
        n = pages[order[i + 1]]
        next_link = f'<a class="next" href="{relative(Path(n["href"]), page_rel)}">{html.escape(n["title"])} &rarr;</a>'
    toc_html = ""
    if toc:
        items = "".join(f'<li class="h{lvl}"><a href="#{hid}">{html.escape(text)}</a></li>' for lvl, hid, text in toc)
        toc_html = f'<nav class="toc" aria-label="On this page"><p class="toc-title">On this page</p><ul>{items}</ul></nav>'
    site_title = cfg.get("title", cfg.lib_name)
    return PAGE.format(
        page_title=html.escape(info["title"] if info["title"] == site_title else f'{info["title"]} – {site_title}'),
        description=html.escape(info["description"]), root=root, mathjax_config=MATHJAX_CONFIG,
        site_title=html.escape(site_title), site_description=html.escape(cfg.get("description", "")),
        sidebar=sidebar_html(pages, rel, page_rel), title=html.escape(info["title"]),
        subtitle=f'<p class="subtitle">{html.escape(info["description"])}</p>' if info["description"] else "",
        body=body, pager=f'<nav class="pager">{prev_link}<span></span>{next_link}</nav>', toc=toc_html)


def page_info(rel: Path, error: str = None) -> dict:
    "Title, summary and facts about one processed notebook (the test reads them from site.json)."
    import nbformat
    info = {"source": (Path("nbs") / rel).as_posix(), "part": part_of(rel), "title": fallback_title(rel),
            "description": "", "href": output_name(rel).as_posix(), "has_images": False, "has_math": False,
            "error": error}
    if error is not None:  # title and summary from the source notebook's H1 and `>` line, as nbdev would
        try:
            cells = nbformat.read(NBS / rel, as_version=4).cells
        except Exception:  # not even valid JSON (being written?): the file name gives the title
            cells = []
        for cell in cells:
            fm = front_matter(cell.source, cell.cell_type)
            if fm:
                info["title"], info["description"] = fm["title"], fm.get("description", "")
                break
    else:
        nb = nbformat.read(PROC / rel, as_version=4)
        info["has_images"], info["has_math"] = has_image_outputs(nb), has_math(nb)
        _, fm = prepare_notebook(nbformat.read(PROC / rel, as_version=4))
        info["title"] = str(fm.get("title") or info["title"])
        info["description"] = str(fm.get("description") or "")
        if fm.get("output-file"):
            info["href"] = (rel.parent / fm["output-file"]).as_posix()
    return info


def copy_assets(dest: Path):
    "Images and other files the notebooks link to (copied by nbdev into `_proc/`)."
    for src in PROC.rglob("*"):
        if src.is_file() and src.suffix.lower() in ASSET_SUFFIXES and not any(p.startswith(".") for p in src.parts):
            dst = dest / src.relative_to(PROC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def build(verbose: bool = True) -> int:
    os.chdir(ROOT)
    from nbdev.config import get_config
    cfg = get_config()
    start = time.time()
    notebooks = source_notebooks()
    write_sidebar_yml(notebooks)
    errors = run_proc_nbs(notebooks)
    pages = {}
    for rel in notebooks:
        if rel not in errors and not (PROC / rel).exists():
            errors[rel] = "nbdev_proc_nbs wrote no processed notebook"
        try:
            pages[rel] = page_info(rel, errors.get(rel))
        except Exception as exc:
            errors[rel] = f"{type(exc).__name__}: {exc}"
            pages[rel] = page_info(rel, errors[rel])
    tmp = Path(tempfile.mkdtemp(prefix="_site.", dir=ROOT))
    try:
        bodies = {}
        for rel in notebooks:
            try:
                bodies[rel] = render_body(rel, errors.get(rel))
            except Exception:
                errors[rel] = pages[rel]["error"] = "rendering failed:\n" + traceback.format_exc(limit=3)
                bodies[rel] = render_body(rel, errors[rel])
        anchors = {pages[rel]["href"]: ids for rel, (_, _, ids) in bodies.items()}
        for rel in notebooks:
            out = tmp / pages[rel]["href"]
            out.parent.mkdir(parents=True, exist_ok=True)
            body, toc, _ = bodies[rel]
            out.write_text(render_page(rel, pages, cfg, body, toc, anchors), encoding="utf-8")
        (tmp / "site.css").write_text(site_css())
        copy_mathjax(tmp / "mathjax")
        copy_assets(tmp)
        manifest = {"pages": list(pages.values()), "built": time.time()}
        (tmp / "site.json").write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)
        old = ROOT / f"_site.old.{os.getpid()}"
        if SITE.exists():
            SITE.rename(old)
        tmp.rename(SITE)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"built {len(pages)} page(s) into {SITE.relative_to(ROOT)}/ in {time.time() - start:.1f}s; "
              f"open {SITE.relative_to(ROOT)}/index.html")
    for rel, err in errors.items():
        print(f"ERROR {rel}: {err}", file=sys.stderr)
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidebar-only", action="store_true", help="only rewrite nbs/sidebar.yml")
    args = parser.parse_args()
    if args.sidebar_only:
        write_sidebar_yml(source_notebooks())
        return 0
    # Builds of the same checkout (make site, the browser test) take turns.
    lock_path = Path(tempfile.gettempdir()) / f"llm_book_site_{hashlib.md5(str(ROOT).encode()).hexdigest()[:8]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return build()


if __name__ == "__main__":
    sys.exit(main())
