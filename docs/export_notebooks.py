"""Execute the notebooks and export them to HTML in docs/notebooks/, widget state included.

The HTML loads the widget renderer and require.js from docs/notebooks/_static/ (copies of the
npm packages @jupyter-widgets/html-manager 1.0.15 and requirejs 2.3.8), so the inspector's
drawings show without a kernel and without network access.

Run: .venv/bin/python docs/export_notebooks.py [--out DIR] [NOTEBOOK ...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "docs" / "notebooks" / "_static"


def export(notebook: Path, out: Path, execute: bool = True) -> Path:
    nb = nbformat.read(notebook, as_version=4)
    if execute:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}},
                       store_widget_state=True).execute()
    exporter = HTMLExporter(widget_renderer_url="_static/embed-amd.js", require_js_url="_static/require.js")
    body, _ = exporter.from_notebook_node(nb)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != STATIC.parent.resolve():
        shutil.copytree(STATIC, out / "_static", dirs_exist_ok=True)
    target = out / (notebook.stem + ".html")
    target.write_text(body)
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "notebooks")
    args = ap.parse_args(argv)
    for nb in args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")):
        print("exported", export(nb, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
