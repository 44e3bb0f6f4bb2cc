"""Counting and ranking visual tokens: the helpers policies of every kind share.

A share of tokens becomes a count by `kept_count` (rounded up: FastV, the keep-rate schedules, random pruning,
DART) or `rounded_count` (half up, at least one: the methods that select before the LLM); pruning by attention
ranks each sample's visual tokens by the attention they receive (`attention_by_position`) and keeps the top ones
(`keep_most_attended`). A policy's `at_budget` sets its knob to a budget by the equal-budget rule
(`dyvte.evaluation.budget`): a share `s` of the visual tokens each layer computes, on average over the layers;
`keep_ratio_after` and `setting_for_share` are that rule's formulas the policies share.
"""

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from ..engine import SubBatch


def round_half_up(value: float) -> int:
    return math.floor(round(value, 9) + 0.5)


def kept_count(rate: float, n_visual: int) -> int:
    """`ceil(rate * n_visual)`, rounded first so that e.g. 0.3 of 10 tokens keeps 3, not 4 through float error."""
    return math.ceil(round(rate * n_visual, 9))


def rounded_count(keep_ratio: float, n: int) -> int:
    """`round(keep_ratio * n)` (half up), at least 1 and at most `n`."""
    return min(n, max(1, round_half_up(keep_ratio * n)))


def attention_by_position(scores: torch.Tensor, sub: SubBatch, shape: torch.Size) -> torch.Tensor:
    """Per-slot scores [b, n] of `sub` laid out by input position, [B, T] (0 where `sub` has no slot)."""
    by_position = torch.zeros(shape, dtype=scores.dtype, device=scores.device)
    row, slot = sub.valid.nonzero(as_tuple=True)
    by_position[sub.rows[row], sub.index[row, slot]] = scores[row, slot]
    return by_position


def keep_most_attended(sub: SubBatch, visual_mask: torch.Tensor, scores: torch.Tensor, n_keep: torch.Tensor
                       ) -> torch.Tensor:
    """[b, n] slots to keep: every non-visual slot and each row's `n_keep[row]` visual slots with the highest
    `scores` (by input position, [B, T]); ties go to the earlier position."""
    visual = sub.slots_of(visual_mask)
    slot_scores = scores[sub.rows[:, None], sub.index.clamp(min=0)]
    ranked = slot_scores.masked_fill(~visual, -1.0).argsort(dim=1, descending=True, stable=True)
    rank = ranked.argsort(dim=1)  # 0 for the most attended visual token of the row
    return ~visual | (visual & (rank < n_keep[:, None]))


def keep_ratio_after(share: float, layer: int, num_layers: int) -> float | None:
    """Keep ratio of one pruning before `layer` whose share is `share`; None when even keeping nothing costs
    more (`layer / L > share`)."""
    ratio = (share * num_layers - layer) / (num_layers - layer)
    return min(ratio, 1.0) if ratio >= 0 else None


def setting_for_share(cost: Callable[[float], float], share: float, low: float, high: float) -> float:
    """The setting `x` in [low, high] with `cost(x) = share`, for a `cost` monotone in `x` (bisection)."""
    rising = cost(high) > cost(low)
    for _ in range(60):
        middle = (low + high) / 2
        if (cost(middle) < share) == rising:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def prune_at_budget(settings, share: float, num_layers: int, n_visual: int):
    """One pruning before `settings.layer` (FastV, random pruning, DART) at the budget `share`: its `keep_ratio`
    after that layer; (settings, words), or (None, why it is out of reach)."""
    layer = settings.layer
    ratio = keep_ratio_after(share, layer, num_layers)
    if ratio is None:
        return None, f"out of reach: pruning before layer {layer} costs {layer}/{num_layers} of the tokens alone"
    return replace(settings, keep_ratio=ratio), f"layer {layer}, keep {ratio:.3f}"
