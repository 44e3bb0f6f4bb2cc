"""Mergers: visual tokens merge into each other inside the LLM, so fewer run through each later layer (`ToMe`).

A merged token is written into the slot it keeps, at that slot's position (`Decision(hidden=...)`), and the tokens
merged into it leave; the policy composes with exit (`ToMe() + DynamicExit(heads)`) and runs batched.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..engine import Decision, ExitPolicy, PrefillState
from .settings import check_integer, check_share
from .tokens import round_half_up, setting_for_share


@dataclass
class ToMeSettings:
    """ToMe's settings (`tome.*`): the share `r` of each sample's prompt visual tokens merged before every layer from
    `first_layer` on (16 of LLaVA-1.5's 576 per layer)."""

    r: float = 16 / 576
    first_layer: int = 0

    def __post_init__(self):
        check_share("ToMe", "r", self.r, high=0.5, why="it is the share of a sample's visual tokens merged per layer, "
                    "and bipartite matching merges at most half of them")
        check_integer("ToMe", "first_layer", self.first_layer, 0)


class ToMe(ExitPolicy):
    """ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) on the decoder's visual tokens, the
    merging baseline of DyVTE's Table 4 (there at about 40% fewer LM TFLOPs on LLaVA-1.5-7B; the DyVTE paper gives
    no other setting).

    ToMe merges `r` tokens in every block; here, before every layer `i >= first_layer`, each sample merges
    `round(r * N)` visual tokens (`N`: its visual tokens in the prompt; the default `r = 16/576` merges 16 of a
    LLaVA-1.5 image's 576 per layer, about 45% fewer visual tokens per layer on average over 32 layers). Bipartite
    soft matching: the sample's remaining visual tokens, in position order, alternate between set A (even) and B
    (odd); each A token's match is its most similar B token by the cosine similarity of layer `i`'s keys (its own
    `input_layernorm` and `k_proj` on its input, before rotary, averaged over key heads: ToMe's metric); the
    `round(r * N)` A tokens with the most similar matches (at most all of A) merge into their matches. A merged
    token is the size-weighted mean of what it holds (`size`: how many prompt tokens it stands for), so later
    merges weight it by its size. It stays in its B token's slot and position; the merged A tokens leave.

    Not implemented: ToMe's proportional attention (`log size` added to the attention logits of merged keys):
    the engine hands the stock decoder layers a plain causal mask, so a merged token is attended as one token.
    """

    name = "tome"

    def __init__(self, r: float = ToMeSettings.r, first_layer: int = ToMeSettings.first_layer):
        settings = ToMeSettings(r, first_layer)
        self.r, self.first_layer = settings.r, settings.first_layer
        self._size: torch.Tensor | None = None  # [B, T] prompt tokens each slot stands for, this prefill

    def reset(self, state: PrefillState) -> None:
        self._size = torch.ones(state.input_ids.shape, device=state.input_ids.device)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx < self.first_layer or self.r == 0.0:
            return Decision()
        visual = sub.slots_of(state.visual_mask)
        prompt_visual = state.visual_mask.sum(dim=1)[sub.rows].tolist()
        row, slot = visual.nonzero(as_tuple=True)
        keys = state.adapter.layer_keys(state.adapter.layers[layer_idx], sub.hidden[row, slot][None])[0]
        metric = keys.new_zeros(*visual.shape, keys.shape[-1])
        metric[row, slot] = keys.mean(dim=1)
        metric = F.normalize(metric, dim=-1)
        hidden, keep = sub.hidden.clone(), torch.ones_like(visual)
        for b in range(len(sub)):
            slots = visual[b].nonzero().squeeze(1)
            a, bset = slots[0::2], slots[1::2]
            merged = min(round_half_up(self.r * prompt_visual[b]), len(a) if len(bset) else 0)
            if merged == 0:
                continue
            similarity = metric[b, a] @ metric[b, bset].T  # [|A|, |B|]
            best, match = similarity.max(dim=1)
            source = best.argsort(descending=True, stable=True)[:merged]
            positions = sub.index[b]
            size = self._size[sub.rows[b], positions.clamp(min=0)]
            weight = size[a[source], None].to(hidden.dtype)
            total = (hidden[b, bset] * size[bset, None]).index_add(
                0, match[source], hidden[b, a[source]] * weight
            )
            new_size = size[bset].index_add(0, match[source], size[a[source]])
            hidden[b, bset] = total / new_size[:, None].to(hidden.dtype)
            self._size[sub.rows[b], positions[bset]] = new_size
            keep[b, a[source]] = False
        return Decision(keep=keep, hidden=hidden)


def tome_share(r: float, first_layer: int, num_layers: int) -> float:
    """The share of ToMe merging `r` of the prompt's visual tokens per layer from `first_layer` on (at most half
    of the tokens left per layer, as bipartite matching), tokens counted as a continuous share."""
    left, total = 1.0, 0.0
    for layer in range(num_layers):
        if layer >= first_layer:
            left = max(left - r, left / 2)
        total += left
    return total / num_layers


def tome_rate(share: float, first_layer: int, num_layers: int) -> float | None:
    """ToMe's `r` whose share is `share`; None when merging half of the tokens every layer still costs more."""
    if tome_share(0.5, first_layer, num_layers) > share:
        return None
    return setting_for_share(lambda r: tome_share(r, first_layer, num_layers), share, 0.0, 0.5)


def tome_at_budget(settings: ToMeSettings, share: float, num_layers: int, n_visual: int
                   ) -> tuple[ToMeSettings | None, str]:
    """ToMe at the budget `share`: its `r` (merged per layer from its first layer)."""
    first_layer = settings.first_layer
    r = tome_rate(share, first_layer, num_layers)
    if r is None:
        return None, f"out of reach: merging half the tokens per layer from layer {first_layer} costs more"
    return replace(settings, r=r), f"r {r:.4f} per layer from layer {first_layer}"
