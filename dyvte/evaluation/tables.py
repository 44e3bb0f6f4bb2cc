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


#: How a policy's answers move against the full model's (`dyvte.evaluation.compare.answer_flips`), in every table.
FLIPS = ("changed", "correct_to_wrong", "wrong_to_correct")


def flips_table(rows: list[tuple[list, dict]], labels: list[str]) -> str:
    """Answer flips per family, one row per `(label cells, flips by family)` of `rows` (`answer_flips` of each
    family, `dyvte.evaluation.compare`), one column per family, each cell `changed / correct→wrong / wrong→correct`
    as shares of the family's samples; "" when no row has families. `labels` names the label columns."""
    families = sorted({family for _, by_family in rows for family in by_family or {}})
    if not families:
        return ""
    body = [[*label, *(" / ".join(number(by_family[f][key]) for key in FLIPS) if by_family and f in by_family
                       else "—" for f in families)] for label, by_family in rows]
    header = [*labels, *(f"{family} (n={_count(rows, family)})" for family in families)]
    return ("Answers against the full model per family (changed / correct→wrong / wrong→correct):\n\n"
            + markdown_table(header, body))


def _count(rows: list[tuple[list, dict]], family: str) -> int:
    return next(by_family[family]["n"] for _, by_family in rows if by_family and family in by_family)
