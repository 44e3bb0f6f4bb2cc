"""AutoPrune (Wang et al., "Each Complexity Deserves a Pruning Policy", NeurIPS 2025), slow batch-1 reference.

Written from the official code (AutoLab-SAI-SJTU/AutoPrune@e4a9918, files below abbreviated `msl` =
`llava/model/language_model/modelling_sparse_llama.py`, `score` = `.../score.py`, `utils` = `.../utils.py`,
`arch` = `llava/model/llava_arch.py`, `clip` = `llava/model/multimodal_encoder/clip_encoder.py`). It imports
nothing from dyvte: one unpadded sample (batch 1) runs through the stock eager layers over the full sequence
(`reference.edited_forward`, tests/reference.py); before each layer, `edit` decides with Python loops which visual
positions leave (hidden as keys from then on) and writes recycled (merged) tokens into the positions they keep.

The algorithm, for a prompt with `N` visual tokens (one image) and `T` text tokens after it:

1. Layer 0 (msl 273-313): `A` = layer 0's attention probabilities [H, S, S] over the whole prompt. `MI0 =
   sum_h MI(A[h, text, visual]) / T` (`mutual_information`, msl 1741-1754). Each visual token's score is the
   vision tower's CLS attention to its patch at the feature layer, mean over the tower's heads (arch 141-145,
   clip 36-47), plus `0.3 * MI0 * mean_{h, text} A[h, text, j]`. The `v0 = min(int(2.5 * target), N)` best
   visual tokens stay for layer 1 (`target`: the budget in tokens; `first_keep = 2.5` is msl 287's constant).
2. Layer 1 (msl 329-340): `MI1 = sum_h MI(A1[h, text, visual])` over layer 1's own attention on the `v0` tokens
   (not divided by `T`, unlike step 1). Slope `k = max(k0 - gamma * MI1, 0)` (msl 2010-2027). Retention curve
   `p(l) = 0.75 / (1 + exp(k (l - (x0 + k))))` for `l = 1..L-1` (msl 1868-1875; note the shift `x0 + k`),
   scaled by one factor `s` found by bisection on [0, 20] (200 steps, msl 1897-1933) so that the simulated
   visual-token total (`simulated_counts`, msl 1935-1961) is closest to `L * target`.
3. After every layer `l >= 1` (msl 316-405, score 24-59): the visual tokens are ranked by
   `mean_{h, text} A_l[h, text, j]` (layer `l`'s own attention); the top `min(ceil((v0 - 1) * s * p(l)), v_l)`
   stay; of the `d` others the `int(0.3 d) + 1` best ranked are clustered by DPC-KNN (utils 155-213) into
   `min(int(n / 10) + 1, n)` merged tokens, which stay too; the rest leave.

Where this reference departs from the official code, on purpose (each is what dyvte's engine does):
- positions: kept and merged tokens keep prompt positions; a merged token sits at its cluster centre's position.
  The official code renumbers positions after every pruning (msl 306/388/397) and appends the merged tokens
  after the kept visual tokens (msl 380-384); during decoding it gives the new token the length of each layer's
  cache as position (msl 715-716).
- precision and ties: float32 (the official code computes attention and MI in float16, its softmax without
  upcast, utils 126-129); equal scores go to the earlier position (official: `torch.topk` order); DPC-KNN orders
  equal densities by index (official: uniform noise of 1e-6, utils 166-167); counts use `ceil(round(x, 9))`.
- the padding mask of LLaVA's expand-to-square images (arch 155-157, mm_utils 162-233): not applied (square
  images, and the HF processor does not pad).
- depth: the curve is evaluated at `l * 32 / L`, the official curve over 32 layers scaled to the model's depth
  (identical for `L = 32`).
- `accounting`: "official" normalises as msl 1935-1961 (the visual tokens entering layers 1..L-1 plus those left
  after layer L-1, which no layer computes; layer 0's `N` not counted); "equivalent" normalises the tokens entering
  layers 0..L-1 (dyvte's equivalent-tokens rule), so each sample meets `target` in dyvte's own unit.
"""

import math
from dataclasses import dataclass

import torch
from reference import additive_mask, density_peak_merge, edited_forward, stock_inputs_embeds

CURVE_HEIGHT = 0.75  # A of the logistic curve, msl 1875
CURVE_DEPTH = 32  # the official curve's layer axis (LLaVA-1.5-7B's decoder)
RECYCLE, CLUSTER = 0.3, 10  # msl 366 and 371
SCALE_HIGH, SCALE_STEPS = 20.0, 200  # msl 1903 and 1907
ACCOUNTINGS = ("official", "equivalent")


def mutual_information(attention: torch.Tensor, eps: float = 1e-6) -> float:
    """MI (bits) of one head's attention `attention` [T text queries, V visual keys], read as p(y|x) with p(x)
    uniform over the text queries; rows are not renormalised over the visual keys (msl 1741-1754)."""
    attention = attention.double()
    count = attention.shape[0]
    p_x = 1.0 / count
    p_xy = p_x * attention
    p_y = p_xy.sum(dim=0, keepdim=True)
    ratio = p_xy / (p_x * p_y + eps)
    return float((p_xy * torch.log2(ratio.clamp(min=eps))).sum())


def curve(k: float, num_layers: int, x0: float) -> list[float]:
    """The unscaled retention curve p(l), l = 1..L-1, evaluated at the official depth `l * 32 / L`."""
    return [CURVE_HEIGHT / (1 + math.exp(min(k * (l * CURVE_DEPTH / num_layers - (x0 + k)), 700.0)))
            for l in range(1, num_layers)]


def kept(base: int, rate: float) -> int:
    return math.ceil(round(base * rate, 9))


def recycled_clusters(dropped: int) -> int:
    """Merged tokens made of `dropped` pruned tokens (msl 366 and 371; 0 when nothing is dropped)."""
    if dropped == 0:
        return 0
    recycled = int(dropped * RECYCLE) + 1
    return min(recycled // CLUSTER + 1, recycled)


def simulated_counts(rates: list[float], n_visual: int, v0: int) -> list[int]:
    """Visual tokens entering layers 0..L-1 and left after layer L-1 ([L + 1]) under keep rates `rates` (one
    per layer 1..L-1), as msl 1935-1961 simulates them (rates clipped to 1, keeps relative to `v0 - 1`)."""
    counts = [n_visual, v0]
    for rate in rates:
        current = counts[-1]
        target = min(kept(v0 - 1, min(1.0, rate)), current)
        counts.append(target + recycled_clusters(current - target))
    return counts


def account(counts: list[int], accounting: str) -> int:
    return sum(counts[1:]) if accounting == "official" else sum(counts[:-1])


def keep_rates(k: float, n_visual: int, v0: int, target: float, num_layers: int, x0: float, accounting: str
               ) -> tuple[list[float], float]:
    """(keep rate of each layer 1..L-1, scale `s`): the curve of slope `k` scaled so that the accounted visual
    tokens come closest to `L * target` (bisection of msl 1903-1933, with its early exits)."""
    base = curve(k, num_layers, x0)
    goal = num_layers * target
    if accounting == "official":  # msl 1879-1895: an unscaled curve close enough is used as it is
        total, previous, used = 0, 0, v0
        for layer, rate in zip(range(1, num_layers), base):
            used = int(v0 * rate)
            total += used * (layer - previous)
            previous = layer
        total += used * (num_layers - previous)
        if abs(total - goal) < 1:
            return base, 1.0
    low, high, best, closest = 0.0, SCALE_HIGH, 1.0, math.inf
    for _ in range(SCALE_STEPS):
        middle = (low + high) / 2
        total = account(simulated_counts([middle * r for r in base], n_visual, v0), accounting)
        if abs(total - goal) < closest:
            closest, best = abs(total - goal), middle
            if closest < 0.01:
                break
        if total < goal:
            low = middle
        else:
            high = middle
    return [best * r for r in base], best


@torch.no_grad()
def cls_attention(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """[images, patches] the CLS token's attention to each patch in the tower's feature layer (the layer whose
    output the projector reads), mean over heads (clip 36-47, arch 145), from the eager tower's own weights."""
    tower = model.model.vision_tower
    feature = model.config.vision_feature_layer % (len(tower.encoder.layers) + 1)
    out = tower(pixel_values, output_attentions=True)
    return out.attentions[feature - 1][:, :, 0, 1:].mean(dim=1)


def layer_attention(model, layer_idx: int, hidden: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """[H, S, S] layer `layer_idx`'s own eager attention probabilities on its input `hidden` [1, S, d], the
    `removed` positions hidden as keys."""
    language_model = model.model.language_model
    layer = language_model.layers[layer_idx]
    cos_sin = language_model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])
    _, weights = layer.self_attn(
        hidden_states=layer.input_layernorm(hidden), position_embeddings=cos_sin,
        attention_mask=additive_mask(torch.ones_like(removed, dtype=torch.long), removed),
    )
    return weights[0]


@dataclass
class Trace:
    """What the reference decided for its sample (positions are prompt positions)."""

    mi0: float = 0.0
    mi1: float = 0.0
    k: float = 0.0
    scale: float = 0.0
    v0: int = 0
    rates: list | None = None  # keep rate of each layer 1..L-1 (after the layer)
    expected: list | None = None  # simulated visual tokens entering layers 0..L-1 and left after L-1
    visual: list | None = None  # [L] the visual positions each layer computes
    merged: list | None = None  # [L] the positions holding a merged token written before that layer


def autoprune_reference(model, batch, target: float, gamma: float = 0.2, k0: float = 0.4, x0: float = 14.9,
                        accounting: str = "official", first_keep: float = 2.5, trace: Trace | None = None):
    """`edit(layer_idx, hidden, removed)` of AutoPrune for `reference.edited_forward`, one unpadded sample.

    `target`: the budget in visual tokens of this sample (official `--target-token-num`: 64, 128 or 192 of a
    576-token LLaVA-1.5 image). Official defaults: gamma 0.2, k0 0.4, x0 14.9 (scripts/v1_5/eval/*.sh;
    model_vqa_loader.py 189-192). `trace` (optional) records what was decided."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(accounting)
    trace = Trace() if trace is None else trace
    ids = batch["input_ids"][0]
    image = model.config.image_token_id
    visual0 = [p for p in range(len(ids)) if ids[p] == image]
    text = [p for p in range(visual0[0], len(ids)) if ids[p] != image]  # the text after the image
    n_visual = len(visual0)
    num_layers = len(model.model.language_model.layers)
    cls_scores = cls_attention(model, batch["pixel_values"]).flatten()  # one image: its patches in prompt order
    trace.v0 = min(int(round(first_keep * target, 9)), n_visual)
    trace.visual, trace.merged = [], []
    state = {}

    def current_visual(removed):
        return [p for p in visual0 if not removed[0, p]]

    def relation(weights, visual):  # mean over heads and text queries of the attention to each visual position
        mean = weights.mean(dim=0)[text].mean(dim=0)
        return {p: float(mean[p]) for p in visual}

    def edit(layer_idx, hidden, removed):
        merged_here = []
        if layer_idx == 1:  # after layer 0: the v0 best by tower CLS attention + MI-weighted text attention
            ranked = sorted(current_visual(removed), key=lambda p: -state["scores"][p])
            for p in ranked[trace.v0:]:
                removed[0, p] = True
        elif layer_idx >= 2:  # after layer l - 1 >= 1: keep, recycle, drop
            visual = current_visual(removed)
            scores = state["scores"]
            count = min(kept(trace.v0 - 1, trace.rates[layer_idx - 2]), len(visual))
            ranked = sorted(visual, key=lambda p: -scores[p])
            dropped = sorted(ranked[count:])
            for p in dropped:
                removed[0, p] = True
            if dropped:
                recycled = sorted(dropped, key=lambda p: -scores[p])[: int(len(dropped) * RECYCLE) + 1]
                clusters = min(len(recycled) // CLUSTER + 1, len(recycled))
                hidden = hidden.clone()
                for centre, token in density_peak_merge(hidden[0, recycled], clusters).items():
                    hidden[0, recycled[centre]] = token
                    removed[0, recycled[centre]] = False
                    merged_here.append(recycled[centre])
        visual = current_visual(removed)
        trace.visual.append(visual)
        trace.merged.append(sorted(merged_here))
        if layer_idx == num_layers - 1:
            return hidden, removed
        weights = layer_attention(model, layer_idx, hidden, removed)  # this layer's attention, for the next cut
        if layer_idx == 0:
            per_head = [mutual_information(weights[h][text][:, visual]) for h in range(weights.shape[0])]
            trace.mi0 = sum(per_head) / len(text) if text else 0.0
            text_attention = relation(weights, visual)
            state["scores"] = {p: float(cls_scores[i]) + 0.3 * trace.mi0 * text_attention[p]
                               for i, p in enumerate(visual0)}
            return hidden, removed
        if layer_idx == 1:
            trace.mi1 = sum(mutual_information(weights[h][text][:, visual]) for h in range(weights.shape[0]))
            trace.k = max(k0 - gamma * trace.mi1, 0.0)
            trace.rates, trace.scale = keep_rates(trace.k, n_visual, trace.v0, target, num_layers, x0, accounting)
            trace.expected = simulated_counts(trace.rates, n_visual, trace.v0)
        state["scores"] = relation(weights, visual)
        return hidden, removed

    return edit


@dataclass
class AutoPruneRun:
    logits: torch.Tensor  # [V] last prompt token
    trace: Trace
    layer_keys: list  # reference.edited_forward's per-layer (keys, kept positions), to compare with a KV cache


def autoprune_run(model, alone: dict, target: float, **settings) -> AutoPruneRun:
    """One unpadded sample through AutoPrune's reference: last-token logits, what was decided, every layer's keys."""
    trace = Trace()
    edit = autoprune_reference(model, alone, target, trace=trace, **settings)
    embeds = stock_inputs_embeds(model, **alone)
    length = alone["input_ids"].shape[1]
    logits, layer_keys = edited_forward(model, embeds, alone["attention_mask"], torch.arange(length)[None], edit)
    return AutoPruneRun(logits[0, -1], trace, layer_keys)
