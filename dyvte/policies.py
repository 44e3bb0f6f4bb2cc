"""Exit policies: who decides, before each decoder layer, which visual tokens a sample still keeps.

A policy sees the sub-batch of samples that still have visual tokens, just before layer `i` runs on it (so its
hidden states are layer `i-1`'s output), and returns which of those samples exit now (all their visual tokens
leave) and, optionally, which visual tokens the others keep. Policies hold no per-call state: anything a policy
must remember between layers lives in the `PrefillState` of that call. `a + b` composes two policies.
"""

import math
from dataclasses import dataclass, field

import torch

from .features import feature_tokens, head_features
from .heads import ExitHeads
from .subbatch import SubBatch


@dataclass
class Decision:
    exit: torch.Tensor | None = None  # [b] bool: drop all visual tokens before this layer
    keep: torch.Tensor | None = None  # [b, n] bool: slots to keep (visual ones may be dropped), for pruning


@dataclass
class PrefillState:
    """What a policy may read about the current prefill call."""

    engine: object
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    visual_mask: torch.Tensor  # [B, T] visual tokens that may leave
    scratch: dict = field(default_factory=dict)  # per-call memory of the policies


class ExitPolicy:
    name = "policy"

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> Decision:
        raise NotImplementedError

    def __add__(self, other: "ExitPolicy") -> "ExitPolicy":
        return Compose([self, other])


class NoExit(ExitPolicy):
    """The stock model: every layer sees every visual token."""

    name = "none"

    def before_layer(self, layer_idx, sub, state) -> Decision:
        return Decision()


class StaticExit(ExitPolicy):
    """VTW: all visual tokens leave before layer `k` (one `k`, or one per sample)."""

    name = "vtw"

    def __init__(self, exit_layer):
        self.exit_layer = exit_layer

    def before_layer(self, layer_idx, sub, state) -> Decision:
        k = state.scratch.get("static_exit")
        if k is None:
            k = state.engine.resolve_exit_layer(self.exit_layer, state.input_ids.shape[0], state.input_ids.device)
            state.scratch["static_exit"] = k
        return Decision(exit=k[sub.rows] == layer_idx)


class DynamicExit(ExitPolicy):
    """DyVTE: head `i` scores each sample after layer `i`; the sample exits at the first `p_exit > threshold`."""

    name = "dynamic"

    def __init__(self, heads: ExitHeads, threshold: float | None = None, force: bool = False):
        threshold = heads.threshold if threshold is None else threshold
        if not 0.0 <= threshold <= 1.0 and not force:
            raise ValueError(
                f"threshold {threshold} is outside [0, 1]; pass force=True to use it anyway (above 1 never exits)."
            )
        self.heads, self.threshold = heads, threshold
        self.span = heads.meta.get("feature_span", "after_first_visual")

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx == 0:  # exit_layer 0 is a baseline, never a head decision
            return Decision()
        if "feature_tokens" not in state.scratch:
            text = state.engine.adapter.text_mask(state.input_ids, state.attention_mask, state.visual_mask, self.span)
            state.scratch["feature_tokens"] = feature_tokens(text)
        features = head_features(sub, state.scratch["feature_tokens"], state.input_ids.shape[1])
        p_exit = self.heads.exit_probability(layer_idx - 1, features)
        return Decision(exit=p_exit > self.threshold)


class FastV(ExitPolicy):
    """FastV: before layer `layer`, keep the `keep_ratio` visual tokens the last prompt token attends to most
    in layer `layer - 1`. The attention is recomputed for that one query only, so SDPA stays on elsewhere."""

    name = "fastv"

    def __init__(self, layer: int = 2, keep_ratio: float = 0.5):
        if layer < 1:
            raise ValueError(f"FastV ranks tokens by the attention of layer `layer - 1`; layer must be >= 1, got {layer}.")
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}.")
        self.layer, self.keep_ratio = layer, keep_ratio

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx == self.layer - 1:
            scores = state.engine.adapter.last_query_attention(state.engine.adapter.layers[layer_idx], sub)
            by_position = torch.zeros(state.visual_mask.shape, dtype=scores.dtype, device=scores.device)
            row, slot = sub.valid.nonzero(as_tuple=True)
            by_position[sub.rows[row], sub.index[row, slot]] = scores[row, slot]
            state.scratch["fastv_scores"] = by_position
            return Decision()
        if layer_idx != self.layer:
            return Decision()
        visual = sub.slots_of(state.visual_mask)
        scores = state.scratch["fastv_scores"][sub.rows[:, None], sub.index.clamp(min=0)]
        scores = scores.masked_fill(~visual, -1.0)
        keep = ~visual
        for row in range(len(sub)):  # per sample: its own number of visual tokens
            n_keep = math.ceil(self.keep_ratio * int(visual[row].sum()))
            if n_keep:
                keep[row, scores[row].topk(n_keep).indices] = True
        state.scratch.setdefault("fastv_kept", {}).update(
            {int(r): sub.index[i, keep[i] & visual[i]].tolist() for i, r in enumerate(sub.rows)}
        )
        return Decision(keep=keep)


class Compose(ExitPolicy):
    """Several policies at once: a sample exits if any says so; a token stays only if all keep it."""

    def __init__(self, policies: list[ExitPolicy]):
        self.policies = [q for p in policies for q in (p.policies if isinstance(p, Compose) else [p])]
        self.name = "+".join(p.name for p in self.policies)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        exits, keep = None, None
        for policy in self.policies:
            decision = policy.before_layer(layer_idx, sub, state)
            if decision.exit is not None:
                exits = decision.exit if exits is None else exits | decision.exit
            if decision.keep is not None:
                keep = decision.keep if keep is None else keep & decision.keep
        return Decision(exits, keep)
