"""Exit policies: all of a sample's visual tokens leave at once, before the layer the policy names.

`NoExit` is the stock model, `StaticExit` VTW's one withdrawal layer, `DynamicExit` DyVTE's per-sample decision
by exit heads.
"""

import torch

from ..engine import Decision, ExitPolicy, PrefillState, SubBatch, feature_tokens, head_features
from ..heads import ExitHeads


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
        self._exits: torch.Tensor | None = None  # [B] this prefill's exit layers

    def reset(self, state: PrefillState) -> None:
        self._exits = state.engine.resolve_exit_layer(
            self.exit_layer, state.input_ids.shape[0], state.input_ids.device
        )

    def before_layer(self, layer_idx, sub, state) -> Decision:
        return Decision(exit=self._exits[sub.rows] == layer_idx)


class DynamicExit(ExitPolicy):
    """DyVTE: head `i` scores each sample after layer `i`; the sample exits at the first `p_exit > threshold`.

    Only the samples that still have visual tokens reach the heads (the engine shows a policy the "still visual"
    sub-batch only), and head `i` runs once, before layer `i + 1`, so no head runs twice or after a sample's exit.
    """

    name = "dynamic"

    def __init__(self, heads: ExitHeads, threshold: float | None = None, force: bool = False):
        threshold = heads.threshold if threshold is None else threshold
        if not 0.0 <= threshold <= 1.0 and not force:
            raise ValueError(
                f"threshold {threshold} is outside [0, 1]; pass force=True to use it anyway (above 1 never exits)."
            )
        self.heads, self.threshold = heads, threshold
        self._tokens: torch.Tensor | None = None  # [B, T] this prefill's tokens averaged into the features

    def reset(self, state: PrefillState) -> None:
        text = state.engine.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, self.heads.config.feature_span
        )
        self._tokens = feature_tokens(text)

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> Decision:
        if layer_idx == 0:  # exit_layer 0 is a baseline, never a head decision
            return Decision()
        features = head_features(sub, self._tokens, state.input_ids.shape[1])
        p_exit = self.heads.exit_probability(layer_idx - 1, features)
        return Decision(exit=p_exit > self.threshold)
