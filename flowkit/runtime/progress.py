"""Long work (``dep.map``): many inputs scored through a bounded window of requests in flight,
results in order, with a progress bar (an ipywidgets bar in a notebook, else a text line on
stderr)."""

from __future__ import annotations

import sys
import time
from concurrent.futures import Future
from typing import Any, Callable

__all__ = ["Progress", "score_many"]


def score_many(submit: Callable[[Any], Future], inputs: list, *, window: int, progress: str | None = None,
               timeout: float | None = None, return_exceptions: bool = False) -> list:
    """``submit`` each input, keeping at most ``window`` in flight; the results in order (see
    ``Deployment.map``). ``progress``: the bar's label (None: no bar)."""
    futures: list[Future] = []
    results: list = []
    bar = Progress(len(inputs), progress) if progress is not None else None

    def failed(i: int, e: Exception) -> Exception:
        if not return_exceptions:
            e.add_note(f"dep.map: input {i} of {len(inputs)} failed")
            raise e
        return e

    def collect() -> None:   # the oldest outstanding input's result
        i = len(results)
        try:
            results.append(futures[i].result(timeout))
        except Exception as e:
            results.append(failed(i, e))
        if bar:
            bar.update(len(results))

    try:
        for x in inputs:
            while len(futures) - len(results) >= window:
                collect()
            try:
                futures.append(submit(x))
            except Exception as e:   # refused before it ran (bad input, overloaded)
                futures.append(Future())
                futures[-1].set_exception(failed(len(futures) - 1, e))
        while len(results) < len(futures):
            collect()
    except BaseException:   # the caller gets no results: the inputs still in flight are abandoned
        for f in futures[len(results):]:
            f.cancel()
        raise
    finally:
        if bar:
            bar.close()
    return results


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
