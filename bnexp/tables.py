"""Tables that fit the terminal: a cell is never broken across lines (a number
split as "0.667 / 5 ±" is misread), so a table too wide for the terminal is
folded into several tables, each repeating the key columns (metric, group)
that say what a row is. Headers may wrap at their spaces. The same tables
render as Markdown, whole. A cell is a string or a ``rich.text.Text`` (a styled one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What a column of a Rich table costs beyond its text: one space of padding on
# each side and one vertical line (plus one line closing the table).
COLUMN_COST = 3
TEXT_COLUMNS = {"status", "verdict", "job"}  # words, left-aligned like the key columns; numbers align right


@dataclass
class Grid:
    header: list[str]
    rows: list[list[str]]
    keys: int = 1  # the leading columns that name a row: repeated in every folded part
    title: str | None = None
    caption: str | None = None
    sections: set[int] = field(default_factory=set)  # row indices after which a line separates sections
    wrap: set[int] = field(default_factory=set)  # columns of free text, which may wrap at spaces (a job's overrides)

    def column(self, i: int) -> list[str]:
        return [row[i] for row in self.rows]


def _cell_len(text) -> int:
    from rich.cells import cell_len

    return cell_len(str(text))


def _words(text) -> list[str]:
    return str(text).split() or [""]


def needed(grid: Grid, i: int) -> int:
    """Column ``i``'s narrowest width: its widest cell whole (or its longest word, for
    a column of free text), its header's longest word."""
    cells = [w for c in grid.column(i) for w in _words(c)] if i in grid.wrap else grid.column(i)
    return max([_cell_len(c) for c in cells] + [_cell_len(w) for w in _words(grid.header[i])])


def width_of(widths: list[int]) -> int:
    return sum(widths) + COLUMN_COST * len(widths) + 1


def fold(grid: Grid, width: int) -> list[Grid]:
    """``grid`` as tables no wider than ``width``, in column order: the key columns
    in each, the others packed greedily. A value column too wide even beside the
    keys gets a table of its own (and overflows: the terminal is narrower than a
    number and its name)."""
    keys = list(range(grid.keys))
    base = [needed(grid, i) for i in keys]
    parts: list[list[int]] = []
    for i in range(grid.keys, len(grid.header)):
        if parts and width_of(base + [needed(grid, j) for j in parts[-1]] + [needed(grid, i)]) <= width:
            parts[-1].append(i)
        else:
            parts.append([i])
    out = []
    for n, cols in enumerate(parts or [[]]):
        pick = keys + cols
        title = grid.title if n == 0 else None
        out.append(Grid([grid.header[i] for i in pick], [[row[i] for i in pick] for row in grid.rows], grid.keys,
                        title, grid.caption if n == len(parts) - 1 else None, grid.sections,
                        {j for j, i in enumerate(pick) if i in grid.wrap}))
    return out


def widths(grid: Grid, width: int) -> list[int] | None:
    """Column widths for ``grid`` within ``width``: None where every column fits at its
    natural width (Rich's own layout then); else each column's :func:`needed` width
    and the room left given, left to right, to headers that would wrap."""
    natural = [max([_cell_len(c) for c in grid.column(i)] + [_cell_len(grid.header[i])]) for i in range(len(grid.header))]
    if width_of(natural) <= width:
        return None
    out = [needed(grid, i) for i in range(len(grid.header))]
    room = width - width_of(out)
    for i, want in enumerate(natural):
        give = max(0, min(room, want - out[i]))
        out[i] += give
        room -= give
    return out


def _justify(grid: Grid, i: int) -> str:
    return "left" if i < grid.keys or grid.header[i] in TEXT_COLUMNS else "right"


def rich_tables(grid: Grid, width: int) -> list:
    """Rich tables of ``grid`` that fit ``width`` columns (see :func:`fold`); their title
    and caption are the caller's to print, at the console's width."""
    from rich.table import Table
    from rich.text import Text

    out = []
    for part in fold(grid, width):
        table = Table(show_header=True, header_style="bold")
        sizes = widths(part, width)
        for i, h in enumerate(part.header):
            table.add_column(h, justify=_justify(part, i), width=sizes[i] if sizes else None)
        for r, row in enumerate(part.rows):
            cells = []
            for i, c in enumerate(row):
                cell = c.copy() if isinstance(c, Text) else Text(c)
                # A number is never broken: no_wrap (Rich's overflow="ignore" would also drop the justification).
                cell.justify, cell.no_wrap = _justify(part, i), i not in part.wrap
                cells.append(cell)
            table.add_row(*cells, end_section=r in part.sections)
        out.append(table)
    return out


def markdown(grid: Grid) -> list[str]:
    """``grid`` as one Markdown table (keys left-aligned, values right-aligned)."""
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, grid.header)) + " |",
             "|" + "|".join("---" if _justify(grid, i) == "left" else "---:" for i in range(len(grid.header))) + "|"]
    return lines + ["| " + " | ".join(esc(str(c)) for c in row) + " |" for row in grid.rows]
