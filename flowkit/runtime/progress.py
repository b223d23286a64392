"""A progress bar for long work (``dep.map``): an ipywidgets bar in a notebook, else a text
line on stderr."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A progress bar for ``dep.map``: an ipywidgets bar in a notebook, else a text line on stderr."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.widget, self.last, self.n = total, label, None, 0.0, 0
        try:
            from IPython import get_ipython

            if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
                import ipywidgets
                from IPython.display import display

                self.widget = ipywidgets.IntProgress(value=0, max=total, description=label[:12])
                display(self.widget)
        except Exception:
            self.widget = None

    def update(self, n: int, force: bool = False) -> None:
        self.n = n
        if self.widget is not None:
            self.widget.value = n
            return
        now = time.monotonic()
        if force or now - self.last > 0.2 or n == self.total:
            self.last = now
            width = 30
            filled = int(width * n / max(1, self.total))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {n}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.widget is None:   # the line as it ended (short of the total if an input failed)
            self.update(self.n, force=True)
            sys.stderr.write("\n")
