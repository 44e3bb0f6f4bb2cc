"""Keep-rate schedules: one keep rate per decoder layer; before each layer a sample keeps its most attended
visual tokens (G-Search's Sort & Reduce, `KeepRateSchedule`; P-Sigmoid's curve, `PSigmoid`). The rates come from
a search on a few samples (`dyvte.policies.search`). The attention is recomputed for the queries that rank (the
prompt's text, or its last token), so the model keeps running with SDPA.
"""

import math
from dataclasses import dataclass

import torch

from ..engine import Decision, ExitPolicy, PrefillState, SubBatch
from .settings import SettingError, check_choice, check_integer, check_number
from .tokens import attention_by_position, keep_most_attended, kept_count

QUERIES = ("text", "last")  # whose attention ranks the visual tokens: the prompt's text, or its last token


def check_first_layer(method: str, first_layer: int, num_layers: int) -> None:
    """The first layer that may prune is one of the model's `1..L-1` (layer 0 has no earlier layer to rank by)."""
    if not 1 <= first_layer < num_layers:
        raise SettingError(f"{method}: first_layer must be in [1, {num_layers - 1}] for {num_layers} layers, got "
                           f"{first_layer}.", "first_layer", first_layer,
                           f"must be in [1, {num_layers - 1}] (the model has num_hidden_layers={num_layers})")


@dataclass
class GSearchSettings:
    """G-Search's settings (`gsearch.*`): a saved search to load (`path`), or the search's own (`g_search`): its `n`
    calibration samples (the first of the val split), the objective `E - lam * r`, a searched layer every `every`
    from `first_layer` (the first that may prune), `trials` TPE runs per searched layer, and whose attention ranks
    the visual tokens (`queries`)."""

    path: str | None = None
    n: int = 32
    lam: float = 0.01
    every: int = 3
    first_layer: int = 2
    trials: int = 12
    queries: str = "text"

    def __post_init__(self):
        check_integer("G-Search", "n", self.n, 1)
        check_number("G-Search", "lam", self.lam, 0.0)
        check_integer("G-Search", "every", self.every, 1)
        check_integer("G-Search", "first_layer", self.first_layer, 1)
        check_integer("G-Search", "trials", self.trials, 2, why="the previous rate and 0 are always tried")
        check_choice("G-Search", "queries", self.queries, QUERIES)

    def check_depth(self, num_layers: int) -> None:
        """The search's first layer fits the model (a saved search to load has its own)."""
        if self.path is None:
            check_first_layer("G-Search", self.first_layer, num_layers)


@dataclass
class PSigmoidSettings:
    """P-Sigmoid's settings (`psigmoid.*`): a saved search to load (`path`), or the search's own
    (`p_sigmoid_search`): its `n` calibration samples, the `budget` (mean keep rate over `first_layer..L-1`), `k`
    searched in `[0, k_max]`, the curve's midpoint `alpha` (None: the middle of `first_layer..L-1`), `trials` TPE
    runs, and whose attention ranks the visual tokens (`queries`)."""

    path: str | None = None
    n: int = 32
    budget: float = 0.5
    k_max: float = 2.0
    alpha: float | None = None
    first_layer: int = 2
    trials: int = 12
    queries: str = "text"

    def __post_init__(self):
        check_integer("P-Sigmoid", "n", self.n, 1)
        check_number("P-Sigmoid", "budget", self.budget, 0.0, 1.0)
        check_number("P-Sigmoid", "k_max", self.k_max, 0.0, low_open=True)
        check_number("P-Sigmoid", "alpha", self.alpha, float("-inf"), optional=True)
        check_integer("P-Sigmoid", "first_layer", self.first_layer, 1)
        check_integer("P-Sigmoid", "trials", self.trials, 1)
        check_choice("P-Sigmoid", "queries", self.queries, QUERIES)

    def check_depth(self, num_layers: int) -> None:
        """The search's first layer fits the model (a saved search to load has its own)."""
        if self.path is None:
            check_first_layer("P-Sigmoid", self.first_layer, num_layers)


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

    def __init__(self, rates, queries: str = GSearchSettings.queries):
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
        check_choice("KeepRateSchedule", "queries", queries, QUERIES)
        self.rates, self.queries = rates, queries
        self._queries: torch.Tensor | None = None  # [B, T] this prefill's ranking queries (`queries="text"`)
        self._scores: torch.Tensor | None = None  # [B, T] the last ranked layer's attention

    def reset(self, state: PrefillState) -> None:
        if len(self.rates) != state.num_layers:
            raise ValueError(
                f"the schedule has {len(self.rates)} keep rates but the model has {state.num_layers} decoder "
                "layers."
            )
        self._scores = None
        self._queries = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
        ) if self.queries == "text" else None

    def before_layer(self, layer_idx, sub, state) -> Decision:
        rates = self.rates
        rate = rates[layer_idx]
        if rate == 0.0:
            return Decision(exit=torch.ones_like(sub.rows, dtype=torch.bool))
        keep = None
        if layer_idx and rate < rates[layer_idx - 1]:
            prompt_visual = state.visual_mask.sum(dim=1)[sub.rows].tolist()
            n_keep = torch.tensor([kept_count(rate, n) for n in prompt_visual], device=sub.rows.device)
            keep = keep_most_attended(sub, state.visual_mask, self._scores, n_keep)
        if layer_idx + 1 < len(rates) and 0.0 < rates[layer_idx + 1] < rate:
            self._rank(layer_idx, sub, state, keep)
        return Decision(keep=keep)

    def _rank(self, layer_idx: int, sub: SubBatch, state: PrefillState, keep: torch.Tensor | None) -> None:
        """Score every visual token by the attention it receives in this layer (over the tokens it really runs
        on), stored by position for the next layer's pruning."""
        adapter = state.adapter
        layer = adapter.layers[layer_idx]
        if self.queries == "last":
            scores = adapter.last_query_attention(layer, sub, keep)
        else:
            scores = adapter.query_attention(layer, sub, sub.slots_of(self._queries), keep)
        self._scores = attention_by_position(scores, sub, state.visual_mask.shape)


class PSigmoid(KeepRateSchedule):
    """P-Sigmoid: keep rate `r(i) = 2b / (1 + exp(k (i - alpha)))` for decoder layers `i >= first_layer` (0-based;
    the paper's layers 3..L are 2..L-1 here), 1 before; clipped to [0, 1].

    Over `first_layer..L-1` the rates average to the budget `b` (when no clipping happens: `b <= 0.5`), whatever
    `k >= 0`; `k` shapes the curve (0: flat at `b`, large: a step at `alpha`). `alpha` defaults to the midpoint.
    """

    name = "psigmoid"

    def __init__(self, budget: float, k: float, num_layers: int, alpha: float | None = PSigmoidSettings.alpha,
                 first_layer: int = PSigmoidSettings.first_layer, queries: str = PSigmoidSettings.queries):
        PSigmoidSettings(budget=budget, alpha=alpha, first_layer=first_layer, queries=queries)  # refuses bad ones
        check_first_layer("PSigmoid", first_layer, num_layers)
        check_number("PSigmoid", "k", k, 0.0, why="a negative k makes the rates increase with depth")
        alpha = (first_layer + num_layers - 1) / 2 if alpha is None else float(alpha)
        rates = [1.0] * first_layer
        for i in range(first_layer, num_layers):
            exponent = min(k * (i - alpha), 700.0)  # exp overflows a float past ~709; the rate is 0 by then
            rate = min(1.0, 2 * budget / (1 + math.exp(exponent)))
            rates.append(min(rate, rates[-1]))
        super().__init__(rates, queries)
        self.budget, self.k, self.alpha, self.first_layer = budget, k, alpha, first_layer
