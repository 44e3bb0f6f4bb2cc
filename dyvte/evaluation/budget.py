"""Equal-budget comparison: every method set to the same visual-token budget by one "equivalent tokens" rule.

The rule: a sample's equivalent visual tokens are the visual tokens its decoder layers really computed, averaged
over the layers, as a share of the visual tokens of its prompt, times `unit` (576, the tokens of a LLaVA-1.5
image):

    equivalent tokens = unit * (1/L) * sum_l v_l / N

`v_l`: the visual tokens layer `l` computed (a merged token counts once), `N`: the sample's visual tokens in the
prompt. Exit at layer `k` is `unit * k / L`; pruning before layer `K` to a share `r` is
`unit * (K + (L - K) r) / L`; pooling before the LLM to a share `r` is `unit * r`. A budget `B` asks for
`B / unit` of the full visual cost per layer; each method's one free setting is solved for it from this formula
(the method's other settings stay at their configured values), and the table reports the budget each run really
reached, measured from its KV cache.
"""

import math

from ..engine import ExitPolicy
from ..policies import (
    DART,
    CDPruner,
    DivPrune,
    Downsample,
    FastV,
    PyramidDrop,
    RandomPrune,
    SparseVLM,
    StaticExit,
    ToMe,
    VisionZip,
    VisPruner,
)
from ..policies.pruners import sparsevlm_share
from .tables import markdown_table, number

BUDGET_BY = ("tokens", "flops", "prefill_ms")  # what methods are matched on (`cost.py` for FLOPs and time)
BUDGET_METHODS = ("random", "fastv", "dart", "tome", "pdrop", "downsample", "visionzip", "vispruner", "cdpruner",
                  "divprune", "sparsevlm", "vtw", "dynamic")


def visual_share(tokens_per_layer: list[int], n_text: int, n_visual: int) -> float | None:
    """`(1/L) * sum_l v_l / N` of one sample: `tokens_per_layer` its prompt tokens per layer, `n_text` its text
    tokens (never pruned), `n_visual` its prompt's visual tokens; None without visual tokens."""
    if not n_visual:
        return None
    return sum(n - n_text for n in tokens_per_layer) / (len(tokens_per_layer) * n_visual)


def keep_ratio_after(share: float, layer: int, num_layers: int) -> float | None:
    """Keep ratio of one pruning before `layer` whose share is `share`; None when even keeping nothing costs
    more (`layer / L > share`)."""
    ratio = (share * num_layers - layer) / (num_layers - layer)
    return min(ratio, 1.0) if ratio >= 0 else None


def _solve(cost, share: float, low: float, high: float) -> float:
    """The setting `x` in [low, high] with `cost(x) = share`, for a `cost` monotone in `x` (bisection)."""
    rising = cost(high) > cost(low)
    for _ in range(60):
        middle = (low + high) / 2
        if (cost(middle) < share) == rising:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def pyramid_ratio(share: float, layers: list[int], num_layers: int) -> float | None:
    """PyramidDrop's per-stage ratio whose share is `share`; None when the first stage alone costs more."""
    bounds = [0, *layers, num_layers]

    def cost(ratio: float) -> float:
        return sum((bounds[s + 1] - bounds[s]) * ratio**s for s in range(len(bounds) - 1)) / num_layers

    return None if cost(0.0) > share else _solve(cost, share, 0.0, 1.0)


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
    return _solve(lambda r: tome_share(r, first_layer, num_layers), share, 0.0, 0.5)


def sparsevlm_ratios(share: float, base: list[float], layers: list[int], num_layers: int, n_visual: int
                     ) -> list[float] | None:
    """SparseVLM's keep ratios `min(1, x * base)` (the paper's per-layer proportions scaled by one `x`) whose share
    on a prompt of `n_visual` visual tokens is `share`; None when keeping nothing after the first pruning layer
    still costs more."""

    def ratios(x: float) -> list[float]:
        return [min(1.0, x * r) for r in base]

    def cost(x: float) -> float:
        return sparsevlm_share(ratios(x), layers, num_layers, n_visual)

    if cost(0.0) > share:
        return None
    return ratios(_solve(cost, share, 0.0, 1.0 / min(base)))


def budget_policy(method: str, share: float, num_layers: int, settings) -> tuple[ExitPolicy | None, str]:
    """`method` set to the budget `share` (its other settings from `settings`, a `PolicySettings`): the policy and
    its setting in words, or None and why the budget is out of its reach."""
    options = settings.baselines.get(method, {})
    if method in ("random", "fastv", "dart"):
        layer = settings.fastv_layer if method == "fastv" else options.get("layer", 2)
        ratio = keep_ratio_after(share, layer, num_layers)
        if ratio is None:
            return None, f"out of reach: pruning before layer {layer} costs {layer}/{num_layers} of the tokens alone"
        if method == "fastv":
            return FastV(layer, ratio), f"layer {layer}, keep {ratio:.3f}"
        if method == "random":
            return RandomPrune(layer, ratio, options.get("seed", 0)), f"layer {layer}, keep {ratio:.3f}"
        pivots = {k: options[k] for k in ("image_pivots", "text_pivots") if k in options}
        return DART(layer, ratio, **pivots), f"layer {layer}, keep {ratio:.3f}"
    if method == "pdrop":
        policy = PyramidDrop(num_layers, layers=options.get("layers"))
        ratio = pyramid_ratio(share, policy.layers, num_layers)
        if ratio is None:
            return None, f"out of reach: its first stage (layers 0-{policy.layers[0] - 1}) keeps every token"
        return PyramidDrop(num_layers, ratio, policy.layers), f"ratio {ratio:.3f} at layers {policy.layers}"
    if method == "tome":
        first_layer = options.get("first_layer", 0)
        r = tome_rate(share, first_layer, num_layers)
        if r is None:
            return None, f"out of reach: merging half the tokens per layer from layer {first_layer} costs more"
        return ToMe(r, first_layer), f"r {r:.4f} per layer from layer {first_layer}"
    if method == "downsample":
        return Downsample(keep_ratio=share), f"keep {share:.3f} (pooled grid)"
    if method == "visionzip":
        return VisionZip(settings.model, keep_ratio=share), f"keep {share:.3f}"
    if method == "vispruner":
        options = {k: v for k, v in options.items() if k != "keep_ratio"}
        return VisPruner(settings.model, keep_ratio=share, **options), f"keep {share:.3f}"
    if method == "cdpruner":
        return CDPruner(share, options.get("negate_relevance", False)), f"keep {share:.3f}"
    if method == "divprune":
        layer = options.get("layer", 0)
        ratio = share if layer == 0 else keep_ratio_after(share, layer, num_layers)
        if ratio is None or ratio <= 0:
            return None, f"out of reach: pruning before layer {layer} costs {layer}/{num_layers} of the tokens alone"
        return DivPrune(ratio, layer), f"layer {layer}, keep {ratio:.3f}"
    if method == "sparsevlm":
        base = SparseVLM(num_layers, **options)
        n_visual = getattr(settings.model.config, "image_seq_length", None) or 576
        ratios = sparsevlm_ratios(share, base.keep_ratios, base.layers, num_layers, n_visual)
        if ratios is None:
            return None, (f"out of reach: its first pruning comes after layer {base.layers[0]}, so "
                          f"{base.layers[0] + 1}/{num_layers} of the tokens stay alone")
        return (SparseVLM(num_layers, ratios, base.layers, base.recycle, base.cluster),
                f"keep {', '.join(f'{r:.3f}' for r in ratios)} after layers {base.layers}")
    if method == "vtw":
        exit_layer = math.floor(share * num_layers + 0.5)
        return StaticExit(exit_layer), f"exit at layer {exit_layer}"
    raise ValueError(f"unknown budget method {method!r}; methods: {', '.join(BUDGET_METHODS)}.")


def format_budget_table(rows: list[dict]) -> str:
    """One Markdown table: each budget's methods, then dynamic exit at the budget it reached itself. `total_tflops`
    per sample counts the decoder, the vision side and the method's own selection (`selection_tflops`);
    `selection_ms` is the method's own time per sample, `selection_share` its share of the prefill time."""
    columns = ("equivalent_tokens", "accuracy", "agreement", "flops_saved", "total_tflops", "selection_tflops",
               "prefill_ms", "selection_ms", "selection_share")
    body = [[number(row["budget"]) if row["budget"] is not None else "own", row["method"], row["setting"],
             *(number(row.get(c)) for c in columns)] for row in rows]
    return markdown_table(["budget", "method", "setting", *columns], body)
