"""Counting and ranking visual tokens: the helpers policies of every kind share.

A share of tokens becomes a count by `kept_count` (rounded up: FastV, the keep-rate schedules, random pruning,
DART) or `rounded_count` (half up, at least one: the methods that select before the LLM); pruning by attention
ranks each sample's visual tokens by the attention they receive (`attention_by_position`) and keeps the top ones
(`keep_most_attended`).
"""

import math

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
