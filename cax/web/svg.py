"""The throughput chart, drawn on the server as SVG.

Sites are often cut off from the internet, and a page of ``cax web`` loads nothing but itself
and its stylesheet: no charting script, no font.  A stacked bar per day (one colour per site)
with a hover title per bar says what a person needs -- how much arrived where, each day -- and
is a few dozen elements.  Every text that came from the runs DB (site names) is escaped.
"""

from __future__ import annotations

import math
from typing import Any

from markupsafe import Markup, escape

WIDTH, HEIGHT = 960, 320
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 16, 56
#: Colours of the sites, in the order of the view's ``sites`` (repeated past the eighth).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#17becf")


def human_bytes(value: float) -> str:
    """Bytes in SI units, as ``cax status`` prints sizes: ``3.0 MB``."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (the y axis' top)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def throughput_chart(view: dict[str, Any]) -> Markup:
    """The SVG of a ``views.throughput`` value: stacked bars of bytes per site and day."""
    days: list[str] = view["days"]
    sites: list[str] = view["sites"]
    totals = [sum(view["bytes"][s][i] for s in sites) for i in range(len(days))]
    top = nice_top(max(totals, default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    bar = max(slot * 0.8, 1.0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="throughput-chart" '
           f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
           f'aria-label="bytes registered per site per day">']
    for k in range(5):  # the y axis: 0, 1/4, ... of the top, with gridlines
        y = TOP + plot_h - plot_h * k / 4
        out.append(f'<line x1="{LEFT}" y1="{_num(y)}" x2="{WIDTH - RIGHT}" y2="{_num(y)}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{_num(y + 4)}" text-anchor="end" font-size="11">'
                   f'{escape(human_bytes(top * k / 4))}</text>')
    for i, day in enumerate(days):
        x = LEFT + slot * i + (slot - bar) / 2
        y = TOP + plot_h
        for n, site in enumerate(sites):
            size = view["bytes"][site][i]
            if not size:
                continue
            h = plot_h * size / top
            y -= h
            copies = view["copies"][site][i]
            out.append(
                f'<rect class="bar" x="{_num(x)}" y="{_num(y)}" width="{_num(bar)}" '
                f'height="{_num(max(h, 0.5))}" fill="{PALETTE[n % len(PALETTE)]}" '
                f'data-site="{escape(site)}" data-day="{escape(day)}" data-bytes="{size}">'
                f'<title>{escape(site)} {escape(day)}: {escape(human_bytes(size))} in '
                f'{copies} cop{"y" if copies == 1 else "ies"}</title></rect>')
        if i % 5 == 0 or i == len(days) - 1:
            out.append(f'<text x="{_num(LEFT + slot * i + slot / 2)}" y="{TOP + plot_h + 16}" '
                       f'text-anchor="middle" font-size="11">{escape(day[5:])}</text>')
    out.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" '
               f'y2="{TOP + plot_h}" stroke="#333"/>')
    x = LEFT
    for n, site in enumerate(sites):  # the legend, under the axis
        out.append(f'<rect x="{x}" y="{HEIGHT - 18}" width="12" height="12" '
                   f'fill="{PALETTE[n % len(PALETTE)]}"/>')
        out.append(f'<text class="legend" x="{x + 16}" y="{HEIGHT - 8}" font-size="12">'
                   f'{escape(site)}</text>')
        x += 24 + 8 * len(site)
    if not sites:
        out.append(f'<text x="{LEFT + plot_w / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" '
                   f'font-size="14">no copies registered in these days</text>')
    out.append("</svg>")
    return Markup("".join(out))
