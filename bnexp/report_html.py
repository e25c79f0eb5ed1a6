"""``bnexp report --html FILE``: one self-contained page of a comparison, to look
at a sweep's result without TensorBoard or to send it to someone.

Everything is in the one file: the style inline, each figure an SVG image in a
``data:`` URI (an image of its own, so that the ids inside matplotlib's SVGs
never collide), no script, no font, nothing fetched. The tables are the ones
``bnexp report`` prints (:mod:`bnexp.report`), whole.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Iterable

import bnexp
from bnexp.report import (Group, PlotError, Report, factorial_grids, figure, group_curves, groups_grid, intervals_grid,
                          refuse_taken, short_keys, verdict_grid, write_new)
from bnexp.runs import format_value
from bnexp.tables import Grid

# The page's panels of curves, each a row: (heading, tags drawn side by side).
CURVE_ROWS = (("Loss", ("train/loss", "val/loss")), ("Accuracy", ("train/acc", "val/acc")),
              ("Gradient norm", ("grad_norm/total",)))
VERDICT_CLASS = {"better": "better", "worse": "worse"}

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .caption { color: #555; font-size: .92em; }
table { border-collapse: collapse; margin: .6em 0 .3em; font-variant-numeric: tabular-nums; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; } td { white-space: nowrap; }
th { background: #f3f3f3; } td.num { text-align: right; } tr.section-end td { border-bottom: 2px solid #888; }
td.better { background: #dff3df; } td.worse { background: #f8dcdc; } td.undecided { color: #666; }
img { max-width: 100%; } details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; }
.scroll { overflow-x: auto; }
"""


def page_file(path: Path) -> Path:
    """The file ``--html PATH`` writes: a name without an extension gets .html."""
    return path if path.suffix else path.with_name(path.name + ".html")


def check_page_file(path: Path, overwrite: bool) -> Path:
    """The file to write, or PlotError before anything is computed: a name that is not
    .html/.htm, a directory, or a file that exists and ``overwrite`` is off."""
    path = page_file(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise PlotError(f"{path}: '{path.suffix}' is no web page; allowed: a name ending in .html or .htm")
    refuse_taken(path, overwrite, "a file name ending in .html")
    return path


def write_page(report: Report, path: Path, overwrite: bool = False, title: str = "") -> Path:
    """Write the page of ``report`` to ``path`` (atomically; an existing file only
    with ``overwrite``) and return the file written."""
    path = check_page_file(path, overwrite)
    text = page(report, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_new(path, lambda f: f.write(text), overwrite, mode="w")
    return path


def page(report: Report, title: str = "") -> str:
    """The whole page, as text."""
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>bnexp report: {esc(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>bnexp report: {esc(title)}</h1>", _meta(report)]
    if (verdicts := verdict_grid(report)).rows:
        parts += ["<h2 id=\"verdict\">Verdict</h2>", _grid(verdicts)]
    parts += ["<h2 id=\"groups\">Groups</h2>", _grid(groups_grid(report)), _grid(intervals_grid(report))]
    parts += ["<h2 id=\"curves\">Curves</h2>", _curves(report)]
    if report.factorials:
        parts += ["<h2 id=\"factorial\">Main effects and interactions</h2>", *map(_grid, factorial_grids(report)),
                  _interaction_plots(report)]
    parts += ["<h2 id=\"configs\">Each group's config</h2>", _configs(report), _notes(report), "</body></html>\n"]
    return "\n".join(parts)


def _meta(report: Report) -> str:
    runs = sum(len(g.runs) for g in report.groups)
    by = f" by {', '.join(report.keys)}" if report.keys else ""
    lines = [f"{runs} runs in {len(report.groups)} groups{by}; {report.options.describe()}."]
    if report.baseline:
        lines.append(f"Each group against the {report.baseline.text(report.groups)}.")
    lines.append(f"Written by bnexp {bnexp.__version__} on {time.strftime('%Y-%m-%d %H:%M')}.")
    return "".join(f"<p class=\"meta\">{html.escape(line)}</p>" for line in lines)


def _grid(grid: Grid) -> str:
    """``grid`` as an HTML table, its title above and caption below."""
    esc = html.escape
    out = [f"<h3>{esc(grid.title)}</h3>"] if grid.title else []
    out.append("<div class=\"scroll\"><table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in grid.header) + "</tr></thead><tbody>")
    for r, row in enumerate(grid.rows):
        cells = []
        for i, cell in enumerate(row):
            text = str(cell)
            cls = "num" if i >= grid.keys and grid.header[i] not in ("status", "verdict") else ""
            if grid.header[i] == "verdict":
                cls = VERDICT_CLASS.get(text.split(" (")[0], "undecided")
            cells.append(f"<td class=\"{cls}\">{esc(text)}</td>" if cls else f"<td>{esc(text)}</td>")
        row_class = ' class="section-end"' if r in grid.sections else ""
        out.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if grid.caption:
        out += [f"<p class=\"caption\">{esc(line)}</p>" for line in grid.caption.splitlines()]
    return "\n".join(out)


def _svg_image(fig, alt: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="svg")
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/svg+xml;base64,{data}\">"


def _labels(groups: Iterable[Group], keys: list[str]) -> dict[str, str]:
    """Short legend names: the grouping values, as the tables' short key names say them."""
    short = short_keys(keys)
    return {g.label: ",".join(f"{s}={format_value(g.key[k])}" for s, k in zip(short, keys)) or g.label for g in groups}


def _curves(report: Report) -> str:
    """One figure per row of CURVE_ROWS: each group's mean over seeds, ±std shaded."""
    curves = {g.label: group_curves(g) for g in report.groups}
    labels = _labels(report.groups, report.keys)
    out = ["<p class=\"caption\">Each line is a group's mean over its completed seeds at the steps all of them "
           "logged; the shaded band is ± one standard deviation over the seeds.</p>"]
    for heading, tags in CURVE_ROWS:
        present = [t for t in tags if any(t in c for c in curves.values())]
        if not present:
            continue
        fig = figure(report.groups, curves, [("curve", t) for t in present], ncols=len(present), labels=labels)
        out += [f"<h3>{html.escape(heading)}</h3>", _svg_image(fig, f"{heading}: {', '.join(present)} per group, seed bands")]
    if len(out) == 1:
        out.append("<p>No curves: these runs have no readable TensorBoard event files.</p>")
    return "\n".join(out)


def _interaction_plots(report: Report) -> str:
    """Per metric of the grid: the mean of each value of the first key (x) at each value
    of the second (one line each), averaged over any other keys. Parallel lines: no
    interaction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report.keys[:2]
    xs = list(dict.fromkeys(format_value(g.key[a]) for g in report.groups))
    lines = list(dict.fromkeys(format_value(g.key[b]) for g in report.groups))
    metrics = list(report.factorials)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.3), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        for lv in lines:
            ys = []
            for x in xs:
                cell = [g.columns[m].mean for g in report.groups
                        if format_value(g.key[a]) == x and format_value(g.key[b]) == lv and g.columns[m].mean is not None]
                ys.append(sum(cell) / len(cell) if cell else float("nan"))
            ax.plot(xs, ys, marker="o", label=f"{b}={lv}")
        ax.set_title(m)
        ax.set_xlabel(a)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return "<h3>Interaction plots</h3>" + _svg_image(fig, f"interaction of {a} and {b}")


def _configs(report: Report) -> str:
    """Per group: its runs and the config they share (seed left out); the keys whose
    value differs between groups in bold."""
    esc = html.escape
    varying = set(report.keys)
    out = []
    for g in report.groups:
        configs = [r.config for r in g.runs if r.config is not None]
        shared = {k: v for k, v in configs[0].items() if k != "seed" and all(c.get(k) == v for c in configs)} if configs else {}
        seeds = ", ".join(str(c.get("seed")) for c in configs)
        rows = "".join(f"<tr><td>{'<b>' + esc(k) + '</b>' if k in varying else esc(k)}</td><td>{esc(format_value(v))}</td></tr>"
                       for k, v in sorted(shared.items()))
        runs = "".join(f"<li>{esc(str(r.path))} ({esc(r.status)})</li>" for r in g.runs)
        out.append(f"<details><summary>{esc(g.label)}</summary><p>seeds: {esc(seeds)}</p><ul>{runs}</ul>"
                   f"<table><thead><tr><th>key</th><th>value</th></tr></thead><tbody>{rows}</tbody></table></details>")
    return "\n".join(out)


def _notes(report: Report) -> str:
    from bnexp.report import duplicates_text

    lines = [f"unreadable: {r.path}: {r.problem}" for r in report.unreadable]
    lines += [line for line in [duplicates_text(report.groups)] if line]
    if not lines:
        return ""
    return "<h2 id=\"notes\">Notes</h2>" + "".join(f"<p class=\"caption\">{html.escape(line)}</p>" for line in lines)
