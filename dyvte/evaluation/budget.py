"""Equal-budget comparison: every method set to the same visual-token budget by one "equivalent tokens" rule.

The rule: a sample's equivalent visual tokens are the visual tokens its decoder layers really computed, averaged
over the layers, as a share of the visual tokens of its prompt, times `unit` (576, the tokens of a LLaVA-1.5
image):

    equivalent tokens = unit * (1/L) * sum_l v_l / N

`v_l`: the visual tokens layer `l` computed (a merged token counts once), `N`: the sample's visual tokens in the
prompt. Exit at layer `k` is `unit * k / L`; pruning before layer `K` to a share `r` is
`unit * (K + (L - K) r) / L`; pooling before the LLM to a share `r` is `unit * r`. A budget `B` asks for
`B / unit` of the full visual cost per layer; each method's one free setting (its `budget_knob` in
`dyvte.policies.registry`) is solved for it from this formula by the method's own `at_budget` (the method's other
settings stay at their configured values), and the table reports the budget each run really reached, measured
from its KV cache.
"""

from .tables import FLIPS, flips_table, markdown_table, number

BUDGET_BY = ("tokens", "flops", "prefill_ms")  # what methods are matched on (`cost.py` for FLOPs and time)


def visual_share(tokens_per_layer: list[int], n_text: int, n_visual: int) -> float | None:
    """`(1/L) * sum_l v_l / N` of one sample: `tokens_per_layer` its prompt tokens per layer, `n_text` its text
    tokens (never pruned), `n_visual` its prompt's visual tokens; None without visual tokens."""
    if not n_visual:
        return None
    return sum(n - n_text for n in tokens_per_layer) / (len(tokens_per_layer) * n_visual)


def format_budget_table(rows: list[dict]) -> str:
    """One Markdown table: each budget's methods, then dynamic exit at the budget it reached itself; with families,
    below it each row's answer flips per family (`flips_table`). `changed`, `correct_to_wrong` and
    `wrong_to_correct` are the answers that move against the full model's; `total_tflops` per sample counts the
    decoder, the vision side and the method's own selection (`selection_tflops`); `selection_ms` is the method's
    own time per sample, `selection_share` its share of the prefill time."""
    columns = ("equivalent_tokens", "accuracy", "agreement", *FLIPS, "flops_saved", "total_tflops", "selection_tflops",
               "prefill_ms", "selection_ms", "selection_share")
    labels = [[number(row["budget"]) if row["budget"] is not None else "own", row["method"]] for row in rows]
    body = [[*label, row["setting"], *(number(row.get(c)) for c in columns)] for label, row in zip(labels, rows)]
    table = markdown_table(["budget", "method", "setting", *columns], body)
    by_family = flips_table([(label, row.get("flips_by_family")) for label, row in zip(labels, rows)
                             if "flips_by_family" in row], ["budget", "method"])
    return table + (f"\n\n{by_family}" if by_family else "")
