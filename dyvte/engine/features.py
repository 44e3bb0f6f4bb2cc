"""Exit-head features, computed the same way in the label pass and at inference.

After decoder layer `i`, a head can read four groups of features of each sample (`FEATURE_GROUPS`):
- `text` [2d]: `[mean of the prompt's text tokens except the last, last prompt token]` (DyVTE's "mean text + last
  text"). Which tokens are text comes from the family adapter's `text_mask` (by default the text after the first
  visual token, i.e. the question; `all_text` takes every non-visual prompt token).
- `visual` [2d]: `[mean of the visual tokens, last visual token]` (the paper's Table 3 alternatives).
- `attention` [heads]: per attention head of layer `i`, the share of the last prompt token's attention that goes
  to visual tokens (the paper's Table 6 "attention status"; the text share is one minus it). Recomputed for that
  one query from the layer's input and the keys the layer's own `k_proj` computes (caught by a forward hook), so
  SDPA stays the model's attention and no key is projected twice.
- `lens` [4]: the logit lens of the last prompt token at layer `i` (the final norm and `lm_head` applied to its
  state): top-1 probability, entropy, top-1 minus top-2 probability, and whether the top-1 token is the one of
  layer `i - 1` (0 at layer 0). Evidence that the answer has formed.
"""

import torch

from .subbatch import SubBatch

FEATURE_GROUPS = ("text", "visual", "attention", "lens")
LENS_FEATURES = 4


def feature_tokens(text_mask: torch.Tensor) -> torch.Tensor:
    """[B, T_prompt] the tokens averaged into the first half of the features: the text but the last prompt
    token, which is the second half (prompts are left-padded, so it is the last column)."""
    tokens = text_mask.clone()
    tokens[:, -1] = False
    return tokens


def group_widths(hidden_size: int, num_heads: int) -> dict[str, int]:
    """Width of each feature group for a decoder of `hidden_size` with `num_heads` attention heads."""
    return {"text": 2 * hidden_size, "visual": 2 * hidden_size, "attention": num_heads, "lens": LENS_FEATURES}


def _last_prompt_slot(sub: SubBatch, prompt_length: int) -> torch.Tensor:
    """[b] the slot of each row's last prompt token (answer tokens may follow it in the label pass)."""
    return (sub.index == prompt_length - 1).int().argmax(dim=1)


def _masked_mean(sub: SubBatch, weights: torch.Tensor) -> torch.Tensor:
    """[b, d] mean of `sub.hidden` over the slots marked in `weights` [b, n] (as one bmm: no [b, n, d] temporary)."""
    weights = weights.to(sub.hidden.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.bmm(weights[:, None, :], sub.hidden).squeeze(1)


def head_features(sub: SubBatch, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """`text` features [len(sub), 2d] of each row of `sub` (prompt of length `prompt_length`, answer tokens after
    it): the mean over `tokens` ([B, T_prompt], see `feature_tokens`) and the last prompt token."""
    index = sub.index.clamp(min=0, max=prompt_length - 1)
    in_prompt = sub.valid & (sub.index < prompt_length)
    mean = _masked_mean(sub, in_prompt & tokens[sub.rows[:, None], index])
    last = sub.hidden[torch.arange(len(sub), device=index.device), _last_prompt_slot(sub, prompt_length)]
    return torch.cat([mean, last], dim=-1)


def visual_features(sub: SubBatch, visual_mask: torch.Tensor) -> torch.Tensor:
    """`visual` features [len(sub), 2d]: the mean over each row's visual slots and its last visual slot."""
    visual = sub.slots_of(visual_mask)
    last_slot = (visual.int() * torch.arange(1, visual.shape[1] + 1, device=visual.device)).argmax(dim=1)
    last = sub.hidden[torch.arange(len(sub), device=visual.device), last_slot] * visual.any(dim=1, keepdim=True)
    return torch.cat([_masked_mean(sub, visual), last], dim=-1)


class HeadFeatures:
    """The feature groups heads read, layer by layer, for one batch: `observe` the sub-batch a layer is about to
    run on, then `after_layer` with its output (`DynamicExit` calls them from its own `observe` and `before_layer`).
    The label pass and `DynamicExit` both go through this class, so the features a head is trained on are the ones
    it sees.

    `groups` picks what is computed; state kept between layers (the attention status of the layer running, the
    previous layer's lens top-1) is stored per batch row, so sub-batches may lose rows in between. The attention
    status needs `observe` with the very sub-batch the layer then runs on: it is computed during that layer
    call, from the keys of the layer's `k_proj`."""

    def __init__(self, adapter, groups, text_tokens: torch.Tensor, visual_mask: torch.Tensor, prompt_length: int):
        unknown = set(groups) - set(FEATURE_GROUPS)
        if unknown:
            raise ValueError(f"unknown feature groups {sorted(unknown)}; known: {', '.join(FEATURE_GROUPS)}.")
        self.adapter, self.groups = adapter, tuple(groups)
        self.text_tokens, self.visual_mask, self.prompt_length = text_tokens, visual_mask, prompt_length
        batch = visual_mask.shape[0]
        heads = adapter.text_config.num_attention_heads
        self.attention = torch.zeros(batch, heads, device=visual_mask.device)
        self.previous_top1 = torch.full((batch,), -1, dtype=torch.long, device=visual_mask.device)
        self._pending = None  # (layer, sub, hook handle) until the layer's k_proj has run on `sub`

    def observe(self, layer, sub: SubBatch) -> None:
        """Arm the attention status of `layer` for the rows of `sub`: computed when the layer runs on `sub` next,
        from its input `sub.hidden` and the keys its `k_proj` returns."""
        if "attention" not in self.groups:
            return
        self._check_captured()
        handle = layer.self_attn.k_proj.register_forward_hook(self._attention_from_keys)
        self._pending = (layer, sub, handle)

    def _attention_from_keys(self, module, args, projected_keys: torch.Tensor) -> None:
        layer, sub, handle = self._pending
        handle.remove()
        self._pending = None
        if projected_keys.shape[:2] != sub.hidden.shape[:2]:
            raise RuntimeError(
                f"the attention-status features were armed for a sub-batch of {list(sub.hidden.shape[:2])} slots, "
                f"but the layer's k_proj ran on {list(projected_keys.shape[:2])}: call HeadFeatures.observe "
                "with the sub-batch the layer runs on next."
            )
        last = torch.zeros_like(sub.valid)
        last[torch.arange(len(sub), device=last.device), _last_prompt_slot(sub, self.prompt_length)] = True
        attention = self.adapter.query_attention(layer, sub, last, per_head=True, projected_keys=projected_keys)
        visual = sub.slots_of(self.visual_mask)
        self.attention[sub.rows] = (attention * visual[:, None, :]).sum(dim=-1).to(self.attention.dtype)

    def _check_captured(self) -> None:
        if self._pending is not None:
            self._pending[2].remove()
            self._pending = None
            raise RuntimeError(
                "the attention-status features of the previous layer were never computed: its k_proj did not run "
                "on the armed sub-batch (a layer without a k_proj call, or a layer that was skipped)."
            )

    @torch.no_grad()
    def after_layer(self, sub: SubBatch) -> dict[str, torch.Tensor]:
        """The features of each row of `sub` after the layer just run, one [len(sub), width] tensor per group."""
        out = {}
        if "text" in self.groups:
            out["text"] = head_features(sub, self.text_tokens, self.prompt_length)
        if "visual" in self.groups:
            out["visual"] = visual_features(sub, self.visual_mask)
        if "attention" in self.groups:
            self._check_captured()
            out["attention"] = self.attention[sub.rows].to(sub.hidden.dtype)
        if "lens" in self.groups:
            out["lens"] = self._lens(sub)
        return out

    def _lens(self, sub: SubBatch) -> torch.Tensor:
        last = sub.hidden[torch.arange(len(sub), device=sub.hidden.device), _last_prompt_slot(sub, self.prompt_length)]
        log_p = self.adapter.lm_head(self.adapter.norm(last)).float().log_softmax(dim=-1)
        top2 = log_p.topk(2, dim=-1)
        p1, p2 = top2.values.exp().unbind(dim=-1)
        entropy = -(log_p.exp() * log_p).sum(dim=-1)
        top1 = top2.indices[:, 0]
        same = (top1 == self.previous_top1[sub.rows]).float()
        self.previous_top1[sub.rows] = top1
        return torch.stack([p1, entropy, p1 - p2, same], dim=-1).to(sub.hidden.dtype)
