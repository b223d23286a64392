"""Line charts as SVG strings (pure), for live GPU and deployment figures."""

from __future__ import annotations

import html
from typing import Iterable, Mapping

__all__ = ["line_chart_svg", "bar_chart_svg", "PALETTE"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def line_chart_svg(series: Mapping[str, Iterable[tuple[float, float]]], title: str = "", unit: str = "",
                   width: int = 460, height: int = 180, ymax: float | None = None,
                   hlines: Mapping[str, float] | None = None) -> str:
    """An SVG line chart of ``{label: [(x, y), ...]}`` with axes, a legend and the last values;
    ``hlines``: ``{label: y}`` marks drawn across the chart as dashed lines (an objective), kept
    in view (the y axis grows to show them).

    >>> svg = line_chart_svg({"util": [(0, 10), (1, 50)]}, title="GPU", unit="%")
    >>> svg.startswith("<svg") and "util" in svg and "50" in svg
    True
    >>> 'class="hline"' in line_chart_svg({"p99": [(0, 5)]}, hlines={"objective 50 ms": 50})
    True
    """
    hlines = {k: float(v) for k, v in (hlines or {}).items()}
    pad_l, pad_r, pad_t, pad_b = 44, 10, 22, 34
    pts = {k: [(float(x), float(y)) for x, y in v] for k, v in series.items()}
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1
    top = ymax if ymax is not None else (max(ys + list(hlines.values())) * 1.1 if ys + list(hlines.values())
                                         and max(ys + list(hlines.values())) > 0 else 1.0)
    iw, ih = width - pad_l - pad_r, height - pad_t - pad_b

    def sx(x):
        return pad_l + (x - x0) / (x1 - x0) * iw

    def sy(y):
        return pad_t + ih - min(max(y, 0.0), top) / top * ih

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="Helvetica" font-size="10">',
           f'<text x="{pad_l}" y="14" font-size="12" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{pad_l}" y="{pad_t}" width="{iw}" height="{ih}" fill="#fafafa" stroke="#cccccc"/>']
    for frac in (0, 0.5, 1):
        y = sy(top * frac)
        out.append(f'<text x="{pad_l - 4}" y="{y + 3:.1f}" text-anchor="end">{top * frac:.3g}{html.escape(unit)}</text>')
        out.append(f'<line x1="{pad_l}" x2="{pad_l + iw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eeeeee"/>')
    out.append(f'<text x="{pad_l}" y="{height - 20}">{x0:.3g}</text>')
    out.append(f'<text x="{pad_l + iw}" y="{height - 20}" text-anchor="end">{x1:.3g} s</text>')
    for label, y in hlines.items():
        out.append(f'<line class="hline" x1="{pad_l}" x2="{pad_l + iw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   f'stroke="#d62728" stroke-width="1.2" stroke-dasharray="5,3"><title>{html.escape(label)}</title></line>')
        out.append(f'<text x="{pad_l + iw - 2}" y="{sy(y) - 3:.1f}" text-anchor="end" fill="#d62728">'
                   f'{html.escape(label)}</text>')
    for i, (label, v) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        if v:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}"/>')
        last = f" {v[-1][1]:.3g}{unit}" if v else ""
        out.append(f'<text x="{pad_l + 4 + i * (iw // max(1, len(pts)))}" y="{height - 6}" fill="{color}">'
                   f'■ {html.escape(label)}{html.escape(last)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart_svg(values: Mapping[str, float], title: str = "", unit: str = "", width: int = 460,
                  bar_height: int = 22) -> str:
    """An SVG chart of horizontal bars, one per ``{label: value}``, each with its value written.

    >>> svg = bar_chart_svg({"time": 300.0, "spacetime": 4400.0}, title="GFLOP/s")
    >>> svg.count("<rect") == 2 and "4,400" in svg and "300" in svg and "spacetime" in svg
    True
    """
    pad_l, pad_r, pad_t = 90, 70, 24
    top = max([v for v in values.values() if v > 0], default=1.0)
    iw = width - pad_l - pad_r
    height = pad_t + len(values) * (bar_height + 6) + 6
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="Helvetica" font-size="11">',
           f'<text x="4" y="15" font-size="12" font-weight="bold">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(values.items()):
        y = pad_t + i * (bar_height + 6)
        w = max(0.0, v) / top * iw
        out.append(f'<text x="{pad_l - 6}" y="{y + bar_height * 0.7:.1f}" text-anchor="end">{html.escape(label)}</text>')
        out.append(f'<rect x="{pad_l}" y="{y}" width="{w:.1f}" height="{bar_height}" fill="{PALETTE[i % len(PALETTE)]}"/>')
        shown = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        out.append(f'<text x="{pad_l + w + 4:.1f}" y="{y + bar_height * 0.7:.1f}">{shown}{html.escape(unit)}</text>')
    out.append("</svg>")
    return "".join(out)
