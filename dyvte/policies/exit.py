"""Exit policies: all of a sample's visual tokens leave at once, before the layer the policy names.

`NoExit` is the stock model, `StaticExit` VTW's one withdrawal layer, `DynamicExit` DyVTE's per-sample decision
by exit heads.
"""

import math
from dataclasses import dataclass, replace

import torch

from ..engine import Decision, ExitPolicy, PrefillState, SubBatch, feature_tokens, resolve_exit_layer
from ..engine.features import HeadFeatures
from ..heads import ExitHeads
from .settings import SettingError, check_flag, check_integer, check_number


class NoExit(ExitPolicy):
    """The stock model: every layer sees every visual token."""

    name = "none"

    def before_layer(self, layer_idx, sub, state) -> Decision:
        return Decision()


@dataclass
class VTWSettings:
    """VTW's settings (`vtw.*`): its exit `layer` (None: searched by `dyvte.policies.search.vtw_search`, the first
    layer from `start_layer` whose next-token KL from the full model stays below `eta` on `n` val samples)."""

    layer: int | None = None
    eta: float = 0.003
    start_layer: int = 5
    n: int = 20

    def __post_init__(self):
        check_integer("VTW", "layer", self.layer, 0, optional=True)
        check_number("VTW", "eta", self.eta, 0.0)  # 0: no layer is below it, so no withdrawal
        check_integer("VTW", "start_layer", self.start_layer, 0)
        check_integer("VTW", "n", self.n, 1)

    def check_depth(self, num_layers: int) -> None:
        """A given exit layer is one of the model's `0..L`."""
        if self.layer is not None and self.layer > num_layers:
            raise SettingError(f"VTW: layer {self.layer} is outside [0, {num_layers}] (the model has {num_layers} "
                               "decoder layers).", "layer", self.layer,
                               f"the exit layer must be in [0, {num_layers}] (the model has "
                               f"num_hidden_layers={num_layers})")


def vtw_at_budget(settings: VTWSettings, share: float, num_layers: int, n_visual: int
                  ) -> tuple[VTWSettings, str]:
    """VTW at the budget `share`: exit at layer `round(share * L)` (exit at `k` computes `k / L` of the tokens)."""
    exit_layer = math.floor(share * num_layers + 0.5)
    return replace(settings, layer=exit_layer), f"exit at layer {exit_layer}"


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


@dataclass
class DynamicSettings:
    """Dynamic exit's settings (`threshold` and `force`, top-level keys): the exit threshold (None: the heads'
    calibrated one), in [0, 1] unless `force` (above 1 never exits)."""

    threshold: float | None = None
    force: bool = False

    def __post_init__(self):
        check_number("DynamicExit", "threshold", self.threshold, 0.0, optional=True)
        check_flag("DynamicExit", "force", self.force)
        if self.threshold is not None and self.threshold > 1.0 and not self.force:
            raise SettingError(f"threshold {self.threshold} is outside [0, 1]; pass force=True to use it anyway "
                               "(above 1 never exits).", "threshold", self.threshold,
                               "must be in [0, 1]; pass force=true to use it anyway (above 1 never exits)")


class DynamicExit(ExitPolicy):
    """DyVTE: head `i` scores each sample after layer `i`; the sample exits at the first `p_exit > threshold`.

    `threshold=None` takes the heads' calibrated default (one global threshold, or one per head where the heads
    were calibrated per layer). Only the samples that still have visual tokens reach the heads (the engine shows a
    policy the "still visual" sub-batch only), and head `i` runs once, before layer `i + 1`: no head runs for a
    layer a sample has passed or after its exit. The features come from `dyvte.engine.features.HeadFeatures`, the
    same code as in the label pass.
    """

    name = "dynamic"

    def __init__(self, heads: ExitHeads, threshold: float | None = DynamicSettings.threshold,
                 force: bool = DynamicSettings.force):
        settings = DynamicSettings(threshold, force)
        self.heads, self.threshold = heads, settings.threshold
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
