"""Exit policies: all of a sample's visual tokens leave at once, before the layer the policy names.

`NoExit` is the stock model, `StaticExit` VTW's one withdrawal layer, `DynamicExit` DyVTE's per-sample decision
by exit heads.
"""

import torch

from ..engine import Decision, ExitPolicy, PrefillState, SubBatch, feature_tokens, resolve_exit_layer
from ..engine.features import HeadFeatures
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
        self._exits = resolve_exit_layer(self.exit_layer, state.input_ids.shape[0], state.num_layers,
                                         state.input_ids.device)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        return Decision(exit=self._exits[sub.rows] == layer_idx)


class DynamicExit(ExitPolicy):
    """DyVTE: head `i` scores each sample after layer `i`; the sample exits at the first `p_exit > threshold`.

    `threshold=None` takes the heads' calibrated default (one global threshold, or one per head where the heads
    were calibrated per layer). Only the samples that still have visual tokens reach the heads (the engine shows a
    policy the "still visual" sub-batch only), and head `i` runs once, before layer `i + 1`: no head runs for a
    layer a sample has passed or after its exit. The features come from `dyvte.engine.features.HeadFeatures`, the
    same code as in the label pass.
    """

    name = "dynamic"

    def __init__(self, heads: ExitHeads, threshold: float | None = None, force: bool = False):
        if threshold is not None and not 0.0 <= threshold <= 1.0 and not force:
            raise ValueError(
                f"threshold {threshold} is outside [0, 1]; pass force=True to use it anyway (above 1 never exits)."
            )
        self.heads, self.threshold = heads, threshold
        self._features: HeadFeatures | None = None  # this prefill's feature state

    def reset(self, state: PrefillState) -> None:
        text = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, self.heads.config.feature_span
        )
        self._features = HeadFeatures(state.adapter, self.heads.feature_groups, feature_tokens(text),
                                      state.visual_mask, state.input_ids.shape[1])

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> Decision:
        decision = Decision()
        if layer_idx > 0:  # exit_layer 0 is a baseline, never a head decision
            head = layer_idx - 1
            p_exit = self.heads.exit_probability(head, self.heads.assemble(self._features.after_layer(sub)))
            threshold = self.heads.layer_threshold(head) if self.threshold is None else self.threshold
            decision = Decision(exit=p_exit > threshold)
        return decision

    def observe(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> None:
        # the features read after this layer, from the sub-batch it runs on (the last head never decides: its exit
        # is the full model)
        if layer_idx + 1 < state.num_layers:
            self._features.observe(state.adapter.layers[layer_idx], sub)
