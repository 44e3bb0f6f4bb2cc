"""Exit-head features, computed the same way in the label pass and at inference.

`[mean of the prompt's text tokens except the last, last prompt token]` at a layer's output (DyVTE's
"mean text + last text"). By default the mean covers the text after the first visual token (the question),
`all_text` takes every non-visual prompt token.
"""

import torch

from .subbatch import SubBatch

FEATURE_SPANS = ("after_first_visual", "all_text")


def feature_tokens(prompt_mask: torch.Tensor, visual_mask: torch.Tensor, span: str) -> torch.Tensor:
    """[B, T_prompt] the prompt tokens averaged into the first half of the features (left-padded prompts)."""
    if span not in FEATURE_SPANS:
        raise ValueError(f"features.span must be one of {FEATURE_SPANS}, got {span!r}.")
    text = prompt_mask.bool() & ~visual_mask
    if span == "after_first_visual":
        after = visual_mask.long().cumsum(dim=1) > 0
        # A prompt without an image has no "after": use all its text rather than nothing.
        text = torch.where(visual_mask.any(dim=1, keepdim=True), text & after, text)
    text[:, -1] = False  # the last prompt token is the second half
    return text


def head_features(sub: SubBatch, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """[len(sub), 2d] features of each row of `sub` (prompt of length `prompt_length`, answer tokens after it)."""
    index = sub.index.clamp(min=0, max=prompt_length - 1)
    in_prompt = sub.valid & (sub.index < prompt_length)
    weights = (in_prompt & tokens[sub.rows[:, None], index]).to(sub.hidden.dtype)
    mean = (sub.hidden * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)
    last_slot = (sub.index == prompt_length - 1).int().argmax(dim=1)
    last = sub.hidden[torch.arange(len(sub), device=index.device), last_slot]
    return torch.cat([mean, last], dim=-1)
