"""Read notebook cells the way nbdev does: cell directives and front matter, shared by the site and README builders."""
from fastcore.basics import AttrDict
from nbdev.frontmatter import _fm2dict, _md2dict
from nbdev.process import extract_directives, first_code_ln


def split_directives(src: str):
    """A code cell's options and its code: nbdev's leading `#|` directives (`#| hide`, `#| code-fold: true`) as
    {name: value}, names and values lower-cased (a bare `#| hide` has value ""), and the code under them."""
    lines = src.splitlines(keepends=True)
    start = first_code_ln(lines)                       # nbdev: the first line that is neither blank nor a directive
    code = "".join(lines[len(lines) if start is None else start:])
    found = extract_directives(AttrDict(source=src), remove=False)   # {"echo:": ["false"], "hide": []}
    opts = {name.rstrip(":").lower(): " ".join(args).strip("'\"").lower() for name, args in found.items()}
    return opts, code.strip("\n")


def front_matter(src: str, cell_type: str) -> dict:
    "nbdev's front matter from a raw `---` YAML cell or a markdown `# Title` / `> summary` cell ({} if none)."
    if cell_type == "raw": return _fm2dict(src) or {}
    if cell_type == "markdown": return _md2dict(src)
    return {}
