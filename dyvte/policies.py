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


QUERIES = ("text", "last")


def kept_count(rate: float, n_visual: int) -> int:
    """`ceil(rate * n_visual)`, rounded first so that e.g. 0.3 of 10 tokens keeps 3, not 4 through float error."""
    return math.ceil(round(rate * n_visual, 9))


class KeepRateSchedule(ExitPolicy):
    """G-Search's Sort & Reduce: before layer `i`, each sample keeps the `ceil(rates[i] * N)` visual tokens (`N`:
    its visual tokens in the prompt) that received the most attention in layer `i - 1`, among those it still has.

    `rates` holds one keep rate per decoder layer, non-increasing with depth. A rate of 0 withdraws all visual
    tokens (an exit, as `StaticExit`). The attention is that of the prompt's text tokens after the first visual
    token (`queries="text"`, averaged over them) or of the last prompt token (`"last"`), recomputed for those
    queries only, so SDPA stays on. Pruned tokens leave the hidden states and later layers' KV cache; the kept
    ones keep their positions.
    """

    name = "schedule"

    def __init__(self, rates, queries: str = "text"):
        rates = [float(r) for r in rates]
        if not rates:
            raise ValueError("rates is empty; give one keep rate per decoder layer.")
        for i, rate in enumerate(rates):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rates[{i}] = {rate} is outside [0, 1].")
            if i and rate > rates[i - 1]:
                raise ValueError(
                    f"rates must not increase with depth: rates[{i}] = {rate} > rates[{i - 1}] = {rates[i - 1]}."
                )
        if 0.0 < rates[0] < 1.0:
            raise ValueError(
                f"rates[0] = {rates[0]}: layer 0 has no earlier layer to rank visual tokens by; use 1.0, or 0.0 to "
                "withdraw them all."
            )
        if queries not in QUERIES:
            raise ValueError(f"queries must be one of {', '.join(QUERIES)}; got {queries!r}.")
        self.rates, self.queries = rates, queries

    def before_layer(self, layer_idx, sub, state) -> Decision:
        rates = self.rates
        if len(rates) != state.engine.num_layers:
            raise ValueError(
                f"the schedule has {len(rates)} keep rates but the model has {state.engine.num_layers} decoder layers."
            )
        rate = rates[layer_idx]
        if rate == 0.0:
            return Decision(exit=torch.ones_like(sub.rows, dtype=torch.bool))
        keep = self._keep_top(rate, sub, state) if layer_idx and rate < rates[layer_idx - 1] else None
        if layer_idx + 1 < len(rates) and 0.0 < rates[layer_idx + 1] < rate:
            self._rank(layer_idx, sub, state, keep)
        return Decision(keep=keep)

    def _rank(self, layer_idx: int, sub: SubBatch, state: PrefillState, keep: torch.Tensor | None) -> None:
        """Score every visual token by the attention it receives in this layer (over the tokens it really runs
        on), stored by position for the next layer's pruning."""
        adapter = state.engine.adapter
        layer = adapter.layers[layer_idx]
        if self.queries == "last":
            scores = adapter.last_query_attention(layer, sub, keep)
        else:
            if "schedule_queries" not in state.scratch:
                state.scratch["schedule_queries"] = adapter.text_mask(
                    state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
                )
            scores = adapter.query_attention(layer, sub, sub.slots_of(state.scratch["schedule_queries"]), keep)
        by_position = torch.zeros(state.visual_mask.shape, dtype=scores.dtype, device=scores.device)
        row, slot = sub.valid.nonzero(as_tuple=True)
        by_position[sub.rows[row], sub.index[row, slot]] = scores[row, slot]
        state.scratch["schedule_scores"] = by_position

    def _keep_top(self, rate: float, sub: SubBatch, state: PrefillState) -> torch.Tensor:
        visual = sub.slots_of(state.visual_mask)
        prompt_visual = state.visual_mask.sum(dim=1)[sub.rows].tolist()
        n_keep = torch.tensor([kept_count(rate, n) for n in prompt_visual], device=visual.device)
        scores = state.scratch["schedule_scores"][sub.rows[:, None], sub.index.clamp(min=0)]
        ranked = scores.masked_fill(~visual, -1.0).argsort(dim=1, descending=True, stable=True)
        rank = ranked.argsort(dim=1)  # 0 for the most attended visual token of the row
        return ~visual | (visual & (rank < n_keep[:, None]))


class PSigmoid(KeepRateSchedule):
    """P-Sigmoid: keep rate `r(i) = 2b / (1 + exp(k (i - alpha)))` for decoder layers `i >= first_layer` (0-based;
    the paper's layers 3..L are 2..L-1 here), 1 before; clipped to [0, 1].

    Over `first_layer..L-1` the rates average to the budget `b` (when no clipping happens: `b <= 0.5`), whatever
    `k >= 0`; `k` shapes the curve (0: flat at `b`, large: a step at `alpha`). `alpha` defaults to the midpoint.
    """

    name = "psigmoid"

    def __init__(self, budget: float, k: float, num_layers: int, alpha: float | None = None, first_layer: int = 2,
                 queries: str = "text"):
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"budget must be in [0, 1], got {budget}.")
        if k < 0:
            raise ValueError(f"k must be >= 0 (a negative k makes the rates increase with depth), got {k}.")
        if not 1 <= first_layer < num_layers:
            raise ValueError(f"first_layer must be in [1, {num_layers - 1}] for {num_layers} layers, got {first_layer}.")
        alpha = (first_layer + num_layers - 1) / 2 if alpha is None else float(alpha)
        rates = [1.0] * first_layer
        for i in range(first_layer, num_layers):
            exponent = min(k * (i - alpha), 700.0)  # exp overflows a float past ~709; the rate is 0 by then
            rate = min(1.0, 2 * budget / (1 + math.exp(exponent)))
            rates.append(min(rate, rates[-1]))
        super().__init__(rates, queries)
        self.budget, self.k, self.alpha, self.first_layer = budget, k, alpha, first_layer


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
