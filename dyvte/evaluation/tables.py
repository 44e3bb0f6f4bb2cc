"""Markdown tables, written one way for every report (policy comparison, withdrawal curve, ablations)."""


def markdown_table(header: list[str], rows: list[list]) -> str:
    """`| a | b |` lines: the header, the `|---|` rule, then one line per row (cells are written with `str`)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def number(value, digits: int = 4) -> str:
    """A metric for a table: `—` for a missing value, 4 significant digits for a float."""
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
