"""The installed layout: flowkit and the top-level widgets/ folder (as flowkit_widgets)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_import_stays_light():
    code = ("import sys, flowkit; heavy = [m for m in ('torch', 'ipywidgets', 'graphviz', 'pygraphviz', "
            "'flowkit_widgets', 'distributed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_widgets_importable_in_the_editable_install():
    import flowkit_widgets

    assert Path(flowkit_widgets.__file__).resolve().parent == ROOT / "widgets"


@pytest.mark.slow
def test_widgets_importable_from_a_built_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("flowkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "flowkit_widgets/__init__.py" in names and "flowkit/__init__.py" in names
    assert "flowkit/imagenet_classes.txt" in names   # the labels are data the package ships
    assert not any(n.startswith("widgets/") or n.startswith("tests/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    code = ("import flowkit, flowkit_widgets, flowkit.imagenet as i; assert len(i.CATEGORIES) == 1000; "
            "print(flowkit.__file__); print(flowkit_widgets.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(p.startswith(str(target)) for p in out), out
