"""What a method's own decisions cost, and matching methods on a cost other than tokens (`budget_by`).

`SelectionMeter` wraps a policy and measures the work the policy itself does (its `reset`, `before_layer` and
`observe` calls: CDPruner's kernel and MAP loop, ToMe's matching, the attention FastV or SparseVLM recompute,
VisionZip's and VisPruner's tower attention, the exit heads): wall time around those calls, and, when counting,
the matrix-multiply FLOPs PyTorch's `FlopCounterMode` sees inside them (the convention of `dyvte.flops`: 2 per
multiply-add, elementwise work left out). Every method's overhead is thus counted in its own row.

Matching on a cost (`budget_by=flops` or `prefill_ms`): a budget `B` (in equivalent tokens of a `unit`-token
image) is the cost of the model with `B / unit` of each image's visual tokens on every layer, measured as the cost of
`RandomPrune(layer=0, keep_ratio=B / unit)` (uniform, and its selection costs nothing measurable) on calibration
batches; each method's one free setting is then solved by bisection so that its measured cost on the same batches
is at most that target (`solve_setting`). Costs are per sample: FLOPs of the whole prefill (decoder, vision tower
and projector, the method's own selection) or the measured prefill wall time.
"""

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import flops
from ..engine import ExitPolicy, PrefillState, SubBatch, VisualExit
from .budget import visual_share


class SelectionMeter(ExitPolicy):
    """`policy` with its own calls timed (`seconds`) and, while `counting`, their matmul FLOPs counted (`flops`)."""

    def __init__(self, policy: ExitPolicy):
        self.policy, self.name = policy, policy.name
        self.seconds, self.flops, self.counting = 0.0, 0, False

    def _metered(self, call, *args):
        start = time.perf_counter()
        if self.counting:
            with FlopCounterMode(display=False) as counter:
                result = call(*args)
            self.flops += counter.get_total_flops()
        else:
            result = call(*args)
        self.seconds += time.perf_counter() - start
        return result

    def reset(self, state: PrefillState) -> None:
        self._metered(self.policy.reset, state)

    def before_layer(self, layer_idx: int, sub: SubBatch, state: PrefillState):
        return self._metered(self.policy.before_layer, layer_idx, sub, state)

    def observe(self, layer_idx: int, sub: SubBatch, state: PrefillState) -> None:
        self._metered(self.policy.observe, layer_idx, sub, state)


@torch.no_grad()
def prefill_cost(engine: VisualExit, batches: list[dict], policy: ExitPolicy, by: str, unit: int) -> float:
    """The mean per-sample cost of `policy`'s prefill on `batches`: equivalent tokens (`by="tokens"`), total FLOPs
    (decoder from the tokens each layer computed, vision, the policy's own; `"flops"`) or wall milliseconds (the
    faster of two runs; `"prefill_ms"`)."""
    shape = flops.DecoderShape.from_config(engine.model.config)
    meter = SelectionMeter(policy)
    meter.counting = by == "flops"
    total, samples = 0.0, 0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
        samples += inputs["input_ids"].shape[0]
        if by == "prefill_ms":
            times = []
            for _ in range(2):
                start = time.perf_counter()
                engine.prefill(**inputs, policy=policy)
                times.append(time.perf_counter() - start)
            total += 1000 * min(times)
            continue
        out = engine.prefill(**inputs, policy=meter)
        counts = torch.stack([out.cache.num_keys(layer) for layer in range(shape.num_layers)], dim=1)
        n_visual = (out.visual_mask & inputs["attention_mask"].bool()).sum(dim=1)
        n_text = inputs["attention_mask"].sum(dim=1) - n_visual
        if by == "tokens":
            shares = [visual_share(c, t, v) for c, t, v in zip(counts.tolist(), n_text.tolist(), n_visual.tolist())]
            total += unit * sum(s for s in shares if s is not None)
            samples -= shares.count(None)
        else:
            total += sum(flops.prefill_flops_from_counts(shape, c) for c in counts.tolist())
            total += sum(flops.vision_flops(engine.model.config, **inputs)) + meter.flops
            meter.flops = 0
    return total / max(samples, 1)


def solve_setting(make_policy: Callable[[float], ExitPolicy | None], cost: Callable[[ExitPolicy], float],
                  target: float, low: float, high: float, steps: int = 12) -> tuple[float, float] | None:
    """The largest setting `x` in [low, high] (cost rising with `x`) whose policy's measured cost is at most
    `target`, by bisection: `(x, its cost)`, or None when even `low` costs more (out of reach). `make_policy(x)` may
    return None for a setting the method cannot take (counted as too costly)."""

    def measured(x: float) -> float:
        policy = make_policy(x)
        return float("inf") if policy is None else cost(policy)

    low_cost = measured(low)
    if low_cost > target:
        return None
    high_cost = measured(high)
    if high_cost <= target:
        return high, high_cost
    for _ in range(steps):
        middle = (low + high) / 2
        middle_cost = measured(middle)
        if middle_cost <= target:
            low, low_cost = middle, middle_cost
        else:
            high = middle
    return low, low_cost
