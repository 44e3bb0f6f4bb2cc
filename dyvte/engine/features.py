"""Exit-head features, computed the same way in the label pass and at inference.

`[mean of the prompt's text tokens except the last, last prompt token]` at a layer's output (DyVTE's
"mean text + last text"). Which tokens are text comes from the family adapter's `text_mask` (by default the text
after the first visual token, i.e. the question; `all_text` takes every non-visual prompt token).
"""

import torch

from .subbatch import SubBatch


def feature_tokens(text_mask: torch.Tensor) -> torch.Tensor:
    """[B, T_prompt] the tokens averaged into the first half of the features: the text but the last prompt
    token, which is the second half (prompts are left-padded, so it is the last column)."""
    tokens = text_mask.clone()
    tokens[:, -1] = False
    return tokens


def head_features(sub: SubBatch, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """[len(sub), 2d] features of each row of `sub` (prompt of length `prompt_length`, answer tokens after it)."""
    index = sub.index.clamp(min=0, max=prompt_length - 1)
    in_prompt = sub.valid & (sub.index < prompt_length)
    weights = (in_prompt & tokens[sub.rows[:, None], index]).to(sub.hidden.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.bmm(weights[:, None, :], sub.hidden).squeeze(1)  # no [b, n, d] temporary: heads stay cheap
    last_slot = (sub.index == prompt_length - 1).int().argmax(dim=1)
    last = sub.hidden[torch.arange(len(sub), device=index.device), last_slot]
    return torch.cat([mean, last], dim=-1)
