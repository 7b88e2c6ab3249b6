"""MkDocs hook: the CLI reference (docs/api/cli.md) generated from the code, so it cannot drift.

The `<!-- commands -->` line becomes one section per entry of `smolds.cli.COMMANDS`: the command, its
one-line help, and the docstring of the module whose `main` runs it. Everything is read statically with
`ast` (building the docs imports nothing of smolds, hence no torch). Docstrings are taken as written
(`clean=False`): module docstrings start at column 0, so their indented usage lines stay Markdown code
blocks, as they read in the source.
"""

from __future__ import annotations

import ast
from pathlib import Path

MARKER = "<!-- commands -->"
ROOT = Path(__file__).resolve().parents[2]


def commands() -> dict[str, tuple[str, str]]:
    """smolds.cli.COMMANDS: {name: (module, help)}, read from the source."""
    tree = ast.parse((ROOT / "smolds" / "cli.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "COMMANDS")
    return ast.literal_eval(node.value)


def module_docstring(module: str) -> str:
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    if doc is None:
        raise ValueError(f"{path} has no module docstring; the CLI reference shows it: add one")
    return doc


def reference() -> str:
    sections = []
    for name, (module, help_) in commands().items():
        sections.append(f"### smolds {name}\n\n{help_} (`{module}`)\n\n{module_docstring(module)}\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri != "api/cli.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/api/cli.md lost its {MARKER} line, where the commands go")
    return markdown.replace(MARKER, reference())
