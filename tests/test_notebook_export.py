"""The exported notebook HTML, checked the way people see it: in headless Chromium, offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (python3 tasks.py test installs it)")
def test_exported_quickstart_shows_the_inspector_drawings_without_a_kernel(tmp_path, processes):
    processes.sweep()   # Chromium's helpers (and the kernel that executes the notebook) stop with the test
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        from export_notebooks import export
    finally:
        sys.path.remove(str(ROOT / "docs"))
    page = export(ROOT / "notebooks" / "01_quickstart.ipynb", tmp_path)
    assert (tmp_path / "_static" / "embed-amd.js").exists()
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                          page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # the inspector widget was rendered from its saved state (not left as a script tag) ...
    tab = re.search(r'class="[^"]*widget-tab[^"]*"', dom)
    assert tab, "the inspector's Tab widget did not render"
    widget_part = dom[tab.start():]
    # ... and it shows the optimized plan drawn as SVG, with the fused stage and the rewrite list
    assert "after optimization" in widget_part and "<svg" in widget_part
    assert "preprocess+TinyResNet+postprocess" in widget_part and "What the optimizer did" in dom
    # the flow drawn inline as a cell's value is there too
    assert dom.count("<svg") >= 3
