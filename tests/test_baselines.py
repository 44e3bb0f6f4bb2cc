"""The token-reduction baselines against slow references written from their papers' descriptions.

Each reference runs one unpadded sample (batch 1) through the stock eager layers over the full sequence
(`reference.edited_forward`): before each layer it decides, with Python loops over positions, which tokens leave
(hidden as keys from then on) and writes merged or pooled tokens into the positions they keep. The engine runs a
padded batch of three with the policy and must keep the same tokens (the KV cache of every layer equals the
reference's keys at its kept positions), give the same last-token logits within 1e-4, and generate the same
tokens as the reference's greedy loop without a KV cache; with eager attention and with SDPA.
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from autoprune_reference import autoprune_reference
from reference import additive_mask, density_peak_merge, edited_forward, edited_greedy, stock_inputs_embeds
from tiny_models import IMAGE_TOKEN, Sample, build_batch, build_model, sample_alone, siglip_llava
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dyvte import VisualExit
from dyvte.policies import (
    DART,
    AutoPrune,
    CDPruner,
    Decision,
    DivPrune,
    Downsample,
    ExitPolicy,
    PyramidDrop,
    RandomPrune,
    SparseVLM,
    StaticExit,
    ToMe,
    VisionZip,
    VisPruner,
)

L = 4
NEW = 6
SAMPLES = [Sample(left_pad=2), Sample(text_after=9), Sample(text_before=5, left_pad=1)]


def half_up(value: float) -> int:
    return math.floor(value + 0.5)


def visual_positions(ids: torch.Tensor, removed: torch.Tensor) -> list[int]:
    """Positions of one sample's visual tokens not yet removed, in order ([T] ids and removed)."""
    return [p for p in range(len(ids)) if ids[p] == IMAGE_TOKEN and not removed[p]]


def layers_of(model):
    return model.model.language_model.layers


def rotary(model, hidden):
    return model.model.language_model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None])


# --- references, one per method, for one unpadded sample ----------------------------------------------------------

def random_reference(model, batch, layer, keep_ratio, seed):
    ids = batch["input_ids"][0]
    generator_seed = seed * 2**32 + zlib.crc32(ids.numpy().astype("<i8").tobytes())

    def edit(layer_idx, hidden, removed):
        if layer_idx == layer:
            visual = visual_positions(ids, removed[0])
            order = torch.randperm(len(visual), generator=torch.Generator().manual_seed(generator_seed))
            for j in order[math.ceil(keep_ratio * len(visual)):].tolist():
                removed[0, visual[j]] = True
        return hidden, removed

    return edit


def downsample_reference(model, batch, rows, columns):
    """Average pooling over adaptive-pooling windows, each result at its window's top-left token."""
    ids = batch["input_ids"][0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size

    def edit(layer_idx, hidden, removed):
        if layer_idx != 0:
            return hidden, removed
        original = hidden.clone()
        visual = visual_positions(ids, removed[0])
        for p in visual:
            removed[0, p] = True  # all but the windows' top-left tokens (windows overlap when rows or columns
        for start in range(0, len(visual), side * side):  # do not divide the side)
            image = visual[start : start + side * side]
            for r in range(rows):
                for c in range(columns):
                    window = [image[y * side + x]
                              for y in range(r * side // rows, math.ceil((r + 1) * side / rows))
                              for x in range(c * side // columns, math.ceil((c + 1) * side / columns))]
                    hidden[0, window[0]] = original[0, window].mean(dim=0)
                    removed[0, window[0]] = False
        return hidden, removed

    return edit


def tome_reference(model, batch, r, first_layer):
    ids = batch["input_ids"][0]
    n_prompt = int((ids == IMAGE_TOKEN).sum())
    size = {p: 1.0 for p in range(len(ids))}

    def edit(layer_idx, hidden, removed):
        if layer_idx < first_layer:
            return hidden, removed
        layer = layers_of(model)[layer_idx]
        keys = layer.self_attn.k_proj(layer.input_layernorm(hidden))[0]
        keys = keys.view(len(ids), -1, layer.self_attn.head_dim).mean(dim=1)
        visual = visual_positions(ids, removed[0])
        a_set, b_set = visual[0::2], visual[1::2]
        merges = min(half_up(r * n_prompt), len(a_set) if b_set else 0)
        matches = []
        for a in a_set:
            similarity = [float(F.cosine_similarity(keys[a], keys[b], dim=0)) for b in b_set]
            best = max(range(len(b_set)), key=lambda j: similarity[j])
            matches.append((similarity[best], a, b_set[best]))
        groups = {b: [b] for b in b_set}
        for _, a, b in sorted(matches, key=lambda m: -m[0])[:merges]:
            groups[b].append(a)
            removed[0, a] = True
        original = hidden.clone()
        for b, members in groups.items():
            total = sum(size[m] for m in members)
            hidden[0, b] = sum(size[m] * original[0, m] for m in members) / total
            size[b] = total
        return hidden, removed

    return edit


def pdrop_reference(model, batch, layers, ratio):
    """Before each stage boundary, the boundary layer's own eager attention from the last prompt token."""
    ids = batch["input_ids"][0]
    n_prompt = int((ids == IMAGE_TOKEN).sum())

    def edit(layer_idx, hidden, removed):
        if layer_idx not in layers:
            return hidden, removed
        layer = layers_of(model)[layer_idx]
        _, weights = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden), position_embeddings=rotary(model, hidden),
            attention_mask=additive_mask(torch.ones_like(removed, dtype=torch.long), removed),
        )
        scores = weights[0, :, -1, :].mean(dim=0)
        keep = math.floor(n_prompt * ratio ** (layers.index(layer_idx) + 1))
        ranked = sorted(visual_positions(ids, removed[0]), key=lambda p: -float(scores[p]))
        for p in ranked[keep:]:
            removed[0, p] = True
        return hidden, removed

    return edit


def dart_reference(model, batch, layer, keep_ratio, image_pivots, text_pivots):
    ids = batch["input_ids"][0]
    first_visual = int((ids == IMAGE_TOKEN).nonzero()[0])
    text = [p for p in range(first_visual, len(ids)) if ids[p] != IMAGE_TOKEN]
    norms = {}

    def edit(layer_idx, hidden, removed):
        if layer_idx == layer - 1:
            decoder_layer = layers_of(model)[layer_idx]
            keys = decoder_layer.self_attn.k_proj(decoder_layer.input_layernorm(hidden))
            keys = keys.view(1, len(ids), -1, decoder_layer.self_attn.head_dim).transpose(1, 2)
            cos, sin = rotary(model, hidden)
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
            norms.update(enumerate(keys[0].abs().sum(dim=(0, 2)).tolist()))
        if layer_idx != layer:
            return hidden, removed
        states = model.model.language_model.norm(hidden)[0]
        visual = visual_positions(ids, removed[0])
        n_keep = math.ceil(keep_ratio * len(visual))
        pivots_image = sorted(visual, key=lambda p: -norms[p])[: min(image_pivots, n_keep)]
        pivots_text = sorted(text, key=lambda p: -norms[p])[:text_pivots]
        pivots = sorted(pivots_image + pivots_text)
        kept = list(pivots_image)
        candidates = [p for p in visual if p not in pivots_image]
        left = n_keep - len(kept)
        for i, pivot in enumerate(pivots):
            quota = left // len(pivots) + (1 if i < left % len(pivots) else 0)
            similarity = {c: float(F.cosine_similarity(states[pivot], states[c], dim=0)) for c in candidates}
            chosen = sorted(candidates, key=lambda c: similarity[c])[:quota]
            kept += chosen
            candidates = [c for c in candidates if c not in chosen]
        for p in visual:
            removed[0, p] = p not in kept
        return hidden, removed

    return edit


def visionzip_reference(model, batch, keep_ratio):
    """VisionZip's selection from the eager tower's own attention weights (`output_attentions`): the CLS row
    (CLIP), or the attention each patch receives averaged over heads and queries (SigLIP, no CLS)."""
    ids = batch["input_ids"][0]
    tower = model.model.vision_tower
    cls = int(model.config.vision_feature_select_strategy == "default")
    depth = len(tower.encoder.layers)
    feature = model.config.vision_feature_layer % (depth + 1)
    attention = tower.encoder.layers[feature - 1].self_attn
    captured = {}
    handle = attention.k_proj.register_forward_hook(lambda module, args, out: captured.update(keys=out))
    try:
        with torch.no_grad():
            out = tower(batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    weights = out.attentions[feature - 1]
    received = weights[:, :, 0, 1:].sum(dim=1) if cls else weights.mean(dim=(1, 2))  # [images, patches]
    features = out.hidden_states[feature][:, cls:]
    images, patches, _ = features.shape
    metric = captured["keys"].view(images, patches + cls, attention.num_heads, -1).mean(dim=2)[:, cls:]
    keep = half_up(keep_ratio * patches)
    contextual = half_up(keep * 10 / 64)
    dominant = keep - contextual
    slots, selected = [], []
    for image in range(images):
        top = sorted(received[image].topk(dominant).indices.tolist())
        rest = [p for p in range(patches) if p not in top]
        unit = metric[image, rest] / metric[image, rest].norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        merged = {t: [] for t in targets}
        for j in range(len(rest)):
            if j not in targets:
                merged[targets[int((unit[targets] @ unit[j]).argmax())]].append(j)
        tokens = [features[image, p] for p in top]
        for t in targets:
            joined = [features[image, rest[j]] for j in merged[t]]
            tokens.append(features[image, rest[t]] + (sum(joined) / len(joined) if joined else 0))
        slots.append(top + [rest[t] for t in targets])
        selected.append(torch.stack(tokens))
    with torch.no_grad():
        projected = model.model.multi_modal_projector(torch.stack(selected))

    def edit(layer_idx, hidden, removed):
        if layer_idx == 0:
            visual = visual_positions(ids, removed[0])
            for image in range(images):
                positions = visual[image * patches : (image + 1) * patches]
                for j, patch in enumerate(slots[image]):
                    hidden[0, positions[patch]] = projected[image, j]
                for patch in range(patches):
                    removed[0, positions[patch]] = patch not in slots[image]
        return hidden, removed

    return edit


def tower_outputs(model, pixel_values):
    """The eager tower's own attention weights and hidden states (`output_attentions`), and the index of the
    feature layer's output in `hidden_states`."""
    tower = model.model.vision_tower
    feature = model.config.vision_feature_layer % (len(tower.encoder.layers) + 1)
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
    return out, feature


def vispruner_reference(model, batch, keep_ratio, important_ratio, step):
    """VisPruner from the paper: the CLS row of the feature layer's eager attention (mean over heads) picks the
    important patches; near-duplicates leave the rest `step` at a time by bipartite matching, in Python loops."""
    ids = batch["input_ids"][0]
    out, feature = tower_outputs(model, batch["pixel_values"])
    importance = out.attentions[feature - 1][:, :, 0, 1:].mean(dim=1)
    features = out.hidden_states[feature][:, 1:]
    images, patches, _ = features.shape
    count = min(patches, max(1, half_up(keep_ratio * patches)))
    important, diverse = int(count * important_ratio), count - int(count * important_ratio)
    kept_per_image = []
    for image in range(images):
        order = sorted(range(patches), key=lambda p: -float(importance[image, p]))
        residual = order[important:]
        while diverse > 0 and min(step, len(residual) - diverse) > 0:
            removed = min(step, len(residual) - diverse)
            a_set, b_set = residual[0::2], residual[1::2]
            score = [max(float(F.cosine_similarity(features[image, a], features[image, b], dim=0)) for b in b_set)
                     for a in a_set]
            distinct = sorted(range(len(a_set)), key=lambda i: -score[i])[removed:]
            residual = [a_set[i] for i in distinct] + b_set
        kept_per_image.append(set(order[:important]) | (set(residual) if diverse > 0 else set()))

    def edit(layer_idx, hidden, removed):
        if layer_idx == 0:
            visual = visual_positions(ids, removed[0])
            for j, p in enumerate(visual):
                removed[0, p] = j % patches not in kept_per_image[j // patches]
        return hidden, removed

    return edit


def cdpruner_reference(model, batch, keep_ratio, sign=1):
    """CDPruner from the paper: the DPP kernel L = diag(q) S diag(q) over the visual input embeddings, q each
    token's min-max normalised mean cosine to the instruction tokens (the text after the image; `sign=-1`: negated,
    as the official code for CLIP); greedy MAP by determinants: each step adds the token that makes det(L_S)
    largest (float64)."""
    ids = batch["input_ids"][0]
    first_visual = int((ids == IMAGE_TOKEN).nonzero()[0])
    text = [p for p in range(first_visual, len(ids)) if ids[p] != IMAGE_TOKEN]

    def edit(layer_idx, hidden, removed):
        if layer_idx != 0:
            return hidden, removed
        visual = visual_positions(ids, removed[0])
        cosine = {(i, j): float(F.cosine_similarity(hidden[0, i], hidden[0, j], dim=0)) for i in visual
                  for j in visual + text}
        relevance = {i: sign * sum(cosine[i, t] for t in text) / len(text) for i in visual}
        low, high = min(relevance.values()), max(relevance.values())
        q = {i: (relevance[i] - low + 1e-6) / (high - low) for i in visual}
        chosen = []
        for _ in range(half_up(keep_ratio * len(visual))):
            def volume(candidate):
                subset = chosen + [candidate]
                kernel = torch.tensor([[q[i] * cosine[i, j] * q[j] for j in subset] for i in subset],
                                      dtype=torch.float64)
                return float(torch.linalg.det(kernel))
            chosen.append(max((i for i in visual if i not in chosen), key=volume))
        for p in visual:
            removed[0, p] = p not in chosen
        return hidden, removed

    return edit


def divprune_reference(model, batch, keep_ratio):
    """DivPrune from the paper: max-min diversity of the visual input embeddings under 1 - cosine, greedily: first
    the token whose nearest other token is farthest, then each time the token farthest from the chosen set."""
    ids = batch["input_ids"][0]

    def edit(layer_idx, hidden, removed):
        if layer_idx != 0:
            return hidden, removed
        visual = visual_positions(ids, removed[0])
        distance = {(i, j): 1 - float(F.cosine_similarity(hidden[0, i], hidden[0, j], dim=0)) for i in visual
                    for j in visual}
        chosen = [max(visual, key=lambda i: min(distance[i, j] for j in visual if j != i))]
        while len(chosen) < round(keep_ratio * len(visual)):
            chosen.append(max((i for i in visual if i not in chosen),
                              key=lambda i: min(distance[s, i] for s in chosen)))
        for p in visual:
            removed[0, p] = p not in chosen
        return hidden, removed

    return edit


def sparsevlm_reference(model, batch, layers, keep_ratios):
    """SparseVLM from the paper: raters are the text tokens after the image whose mean (over visual tokens) of the
    softmax over text of v t^T exceeds the mean; after each pruning layer, the visual tokens are ranked by that
    layer's eager attention from the raters; the best `round(r N)` stay, the best 30% (+1) of the others are
    clustered into a tenth (+1) of merged tokens in their centres' positions."""
    ids = batch["input_ids"][0]
    n_prompt = int((ids == IMAGE_TOKEN).sum())
    first_visual = int((ids == IMAGE_TOKEN).nonzero()[0])
    text = [p for p in range(first_visual, len(ids)) if ids[p] != IMAGE_TOKEN]
    raters, scores = [], {}

    def edit(layer_idx, hidden, removed):
        if layer_idx == 0:
            visual = visual_positions(ids, removed[0])
            relation = (hidden[0, visual] @ hidden[0, text].T).softmax(dim=1).mean(dim=0)
            raters.extend(t for t, value in zip(text, relation.tolist()) if value > float(relation.mean()))
        if layer_idx - 1 in layers:
            visual = visual_positions(ids, removed[0])
            count = min(half_up(keep_ratios[layers.index(layer_idx - 1)] * n_prompt), len(visual) - 1)
            ranked = sorted(visual, key=lambda p: -scores[p])
            pruned = sorted(ranked[count:])
            recycled = sorted(pruned, key=lambda p: -scores[p])[: int(len(pruned) * 0.3) + 1]
            merged = density_peak_merge(hidden[0, recycled], len(recycled) // 10 + 1) if pruned else {}
            hidden = hidden.clone()
            for p in pruned:
                removed[0, p] = True
            for centre, token in merged.items():
                hidden[0, recycled[centre]] = token
                removed[0, recycled[centre]] = False
        if layer_idx in layers:
            layer = layers_of(model)[layer_idx]
            _, weights = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden), position_embeddings=rotary(model, hidden),
                attention_mask=additive_mask(torch.ones_like(removed, dtype=torch.long), removed),
            )
            scores.clear()
            scores.update(enumerate(weights[0].mean(dim=0)[raters].mean(dim=0).tolist()))
        return hidden, removed

    return edit


CASES = {
    "random": (lambda m: RandomPrune(2, 0.5, seed=3), lambda m, b: random_reference(m, b, 2, 0.5, 3)),
    "downsample": (lambda m: Downsample(factor=2), lambda m, b: downsample_reference(m, b, 2, 2)),
    "downsample_ratio": (lambda m: Downsample(keep_ratio=0.35), lambda m, b: downsample_reference(m, b, 2, 3)),
    "tome": (lambda m: ToMe(r=0.125, first_layer=1), lambda m, b: tome_reference(m, b, 0.125, 1)),
    "pdrop": (lambda m: PyramidDrop(L, 0.5, layers=[1, 2, 3]), lambda m, b: pdrop_reference(m, b, [1, 2, 3], 0.5)),
    "dart": (lambda m: DART(2, 0.5, image_pivots=2, text_pivots=3),
             lambda m, b: dart_reference(m, b, 2, 0.5, 2, 3)),
    "visionzip": (lambda m: VisionZip(m, keep_ratio=0.75), lambda m, b: visionzip_reference(m, b, 0.75)),
    "vispruner": (lambda m: VisPruner(m, keep_ratio=0.5, important_ratio=0.25, step=2),
                  lambda m, b: vispruner_reference(m, b, 0.5, 0.25, 2)),
    "cdpruner": (lambda m: CDPruner(keep_ratio=0.4), lambda m, b: cdpruner_reference(m, b, 0.4)),
    "cdpruner_negated": (lambda m: CDPruner(keep_ratio=0.4, negate_relevance=True),
                         lambda m, b: cdpruner_reference(m, b, 0.4, sign=-1)),
    "divprune": (lambda m: DivPrune(keep_ratio=0.3), lambda m, b: divprune_reference(m, b, 0.3)),
    "sparsevlm": (lambda m: SparseVLM(L, (0.5, 0.3, 0.2), layers=[0, 1, 2]),
                  lambda m, b: sparsevlm_reference(m, b, [0, 1, 2], (0.5, 0.3, 0.2))),
    # a large gamma: the three samples get three schedules (k = 0.074, 0 and 0.157) in one batch
    "autoprune": (lambda m: AutoPrune(m, share=11 / 16, gamma=20.0, first_keep=1.25),
                  lambda m, b: autoprune_reference(m, b, 11.0, gamma=20.0, first_keep=1.25, accounting="equivalent")),
    "autoprune_official": (lambda m: AutoPrune(m, share=8 / 16, accounting="official"),
                           lambda m, b: autoprune_reference(m, b, 8.0, accounting="official")),
}


def then_exit(edit, alone, exit_layer):
    """`edit`, then every visual token removed from `exit_layer` on (a composed static exit)."""
    visual = alone["input_ids"] == IMAGE_TOKEN

    def composed(layer_idx, hidden, removed):
        hidden, removed = edit(layer_idx, hidden, removed)
        return hidden, removed | (visual if layer_idx >= exit_layer else torch.zeros_like(visual))

    return composed


@pytest.fixture(scope="module")
def reference_model():
    return build_model("llava", attn_implementation="eager", num_layers=L, seed=2)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def engine(request):
    return VisualExit(build_model("llava", attn_implementation=request.param, num_layers=L, seed=2))


@pytest.fixture(scope="module")
def batch(reference_model):
    return build_batch(reference_model, SAMPLES)


def reference_run(model, policy_edit, alone):
    embeds = stock_inputs_embeds(model, **alone)
    length = alone["input_ids"].shape[1]
    return edited_forward(model, embeds, alone["attention_mask"], torch.arange(length)[None], policy_edit)


def assert_keeps_the_reference_tokens(out, reference_model, make_reference):
    """Each sample of the engine's batched prefill `out` against the reference alone: the last logits within 1e-4,
    and every layer's KV cache the reference's keys at the positions it kept (same tokens, same merged states)."""
    cache = out.past_key_values
    for i in range(len(SAMPLES)):
        alone = sample_alone(reference_model, SAMPLES, i)
        logits, layer_keys = reference_run(reference_model, make_reference(reference_model, alone), alone)
        assert (out.logits[i, -1] - logits[0, -1]).abs().max() <= 1e-4
        for layer, (keys, kept) in enumerate(layer_keys):
            engine_keys = cache.layers[layer].keys[i][:, cache.key_valid[layer][i]]
            assert engine_keys.shape == keys[0][:, kept[0]].shape, f"layer {layer}: another number of tokens kept"
            assert (engine_keys - keys[0][:, kept[0]]).abs().max() <= 1e-4, f"layer {layer}: other tokens kept"


@pytest.mark.parametrize("method", list(CASES))
def test_baseline_keeps_and_merges_the_reference_tokens(method, engine, reference_model, batch):
    make_policy, make_reference = CASES[method]
    out = engine.prefill(**batch, policy=make_policy(engine.model))
    assert_keeps_the_reference_tokens(out, reference_model, make_reference)
    cache = out.past_key_values
    assert (cache.num_keys(L - 1) < batch["attention_mask"].sum(dim=1)).all(), "the policy should reduce tokens"


@pytest.mark.parametrize("method", list(CASES))
def test_baseline_generates_as_the_reference_without_cache_batched_and_alone(method, engine, reference_model, batch):
    make_policy, make_reference = CASES[method]
    policy = make_policy(engine.model)
    generated = engine.generate(**batch, policy=policy, max_new_tokens=NEW)
    for i in range(len(SAMPLES)):
        alone = sample_alone(reference_model, SAMPLES, i)
        expected = edited_greedy(reference_model, alone, make_reference(reference_model, alone), NEW)
        single = engine.generate(**sample_alone(engine.model, SAMPLES, i), policy=policy, max_new_tokens=NEW)
        new = expected[0, alone["input_ids"].shape[1]:].tolist()
        assert single[0, alone["input_ids"].shape[1]:].tolist()[: len(new)] == new
        assert generated[i, batch["input_ids"].shape[1]:].tolist()[: len(new)] == new


def test_tome_composes_with_exit(reference_model, batch):
    """Merged states written by one policy, then all visual tokens withdrawn by another: as the reference does."""
    engine = VisualExit(build_model("llava", num_layers=L, seed=2))
    out = engine.prefill(**batch, policy=ToMe(r=0.125, first_layer=0) + StaticExit(2))
    assert out.exit_layer.tolist() == [2] * 3
    for i in range(len(SAMPLES)):
        alone = sample_alone(reference_model, SAMPLES, i)
        logits, _ = reference_run(reference_model, then_exit(tome_reference(reference_model, alone, 0.125, 0), alone, 2),
                                  alone)
        assert (out.logits[i, -1] - logits[0, -1]).abs().max() <= 1e-4


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["visionzip", "downsample"])
def test_a_tower_without_cls_ranks_by_mean_attention(method, attn_implementation):
    """VisionZip on SigLIP: dominant patches by the attention they receive averaged over every query and head."""
    reference_model, model = siglip_llava("eager"), siglip_llava(attn_implementation)
    make_policy, make_reference = CASES[method]
    out = VisualExit(model).prefill(**build_batch(model, SAMPLES), policy=make_policy(model))
    for i in range(len(SAMPLES)):
        alone = sample_alone(reference_model, SAMPLES, i)
        logits, layer_keys = reference_run(reference_model, make_reference(reference_model, alone), alone)
        assert (out.logits[i, -1] - logits[0, -1]).abs().max() <= 1e-4
        kept = layer_keys[0][1][0]
        engine_keys = out.past_key_values.layers[0].keys[i][:, out.past_key_values.key_valid[0][i]]
        assert (engine_keys - layer_keys[0][0][0][:, kept]).abs().max() <= 1e-4


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["cdpruner", "divprune", "sparsevlm"])
def test_methods_without_tower_attention_run_on_a_tower_without_cls(method, attn_implementation):
    """CDPruner, DivPrune and SparseVLM read only the LLM's own states: on SigLIP they select as their references."""
    reference_model, model = siglip_llava("eager"), siglip_llava(attn_implementation)
    make_policy, make_reference = CASES[method]
    out = VisualExit(model).prefill(**build_batch(model, SAMPLES), policy=make_policy(model))
    assert_keeps_the_reference_tokens(out, reference_model, make_reference)


def test_vispruner_refuses_a_tower_without_cls_and_a_tiling_family():
    with pytest.raises(ValueError, match=r"VisPruner ranks important tokens by the \[CLS\] token's attention.*"
                                         "SiglipVisionModel.*use CDPruner or DivPrune"):
        VisPruner(siglip_llava("sdpa"))
    with pytest.raises(ValueError, match="VisPruner needs each image's visual tokens to be the vision tower's "
                                         "patches.*'qwen2_vl'"):
        VisPruner(build_model("qwen2_vl", num_layers=2))


@pytest.mark.parametrize("make_policy", [
    lambda m: VisionZip(m, keep_ratio=1.0), lambda m: Downsample(factor=1), lambda m: RandomPrune(1, keep_ratio=1.0),
    lambda m: ToMe(r=0.0), lambda m: DART(1, keep_ratio=1.0), lambda m: PyramidDrop(L, ratio=1.0),
    lambda m: VisPruner(m, keep_ratio=1.0), lambda m: CDPruner(keep_ratio=1.0), lambda m: DivPrune(keep_ratio=1.0),
    lambda m: SparseVLM(L, (1.0, 1.0, 1.0), layers=[0, 1, 2]), lambda m: AutoPrune(m, share=1.0, k0=0.0),
])
def test_keeping_everything_is_the_stock_model(make_policy, engine, batch):
    """Each baseline at its keep-all setting equals the stock model: VisionZip with every patch dominant or a target
    with nothing merged into it hands the projector the tower's own features; 1 x 1 pooling windows are the tokens;
    SparseVLM keeps all but one token per stage and recycles that one into a merged token of itself; AutoPrune's
    flat curve (k0 = 0) at the full budget keeps rates above 1, so every token, with nothing to recycle."""
    expected = engine.model(**batch).logits
    out = engine(**batch, policy=make_policy(engine.model))
    real = batch["attention_mask"].bool()
    assert (out.logits - expected)[real].abs().max() <= 1e-5
    assert out.past_key_values.num_keys(L - 1).tolist() == batch["attention_mask"].sum(dim=1).tolist()


def test_pyramid_drop_default_stages_scale_with_depth():
    assert PyramidDrop(32).layers == [8, 16, 24]
    assert PyramidDrop(12).layers == [3, 6, 9]
    assert PyramidDrop(40).layers == [10, 20, 30]
    assert PyramidDrop(3).layers == [1, 2]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RandomPrune(2, keep_ratio=1.5), r"RandomPrune: keep_ratio = 1.5 is outside \[0, 1\]"),
        (lambda: DART(2, keep_ratio=2.0), r"DART: keep_ratio = 2.0 is outside \[0, 1\].*more visual tokens"),
        (lambda: Downsample(keep_ratio=1.2), r"Downsample: keep_ratio = 1.2 is outside \(0, 1\]"),
        (lambda: Downsample(factor=2, keep_ratio=0.25), "Downsample: give either factor"),
        (lambda: ToMe(r=0.7), r"ToMe: r = 0.7 is outside \[0, 0.5\].*at most half"),
        (lambda: PyramidDrop(4, layers=[2, 2]), r"PyramidDrop: layers \[2, 2\] must be increasing"),
        (lambda: PyramidDrop(4, ratio=3), r"PyramidDrop: ratio = 3 is outside \[0, 1\]"),
        (lambda: DART(0), "DART: layer must be >= 1"),
        (lambda: DART(2, image_pivots=0, text_pivots=0), "DART needs pivots"),
        (lambda: CDPruner(keep_ratio=0.0), r"CDPruner: keep_ratio = 0.0 is outside \(0, 1\]"),
        (lambda: DivPrune(keep_ratio=1.5), r"DivPrune: keep_ratio = 1.5 is outside \(0, 1\]"),
        (lambda: SparseVLM(L, (0.5, 0.3)), r"SparseVLM: 2 keep_ratios for the paper's 3 pruning layers; give layers"),
        (lambda: SparseVLM(L, (0.5, 0.3), layers=[0, 1, 2]), r"SparseVLM: 3 pruning layers \[0, 1, 2\] but 2 "
                                                             "keep_ratios"),
        (lambda: SparseVLM(L, (0.5, 0.3, 0.2), layers=[1, 2, 3]), r"SparseVLM: layers \[1, 2, 3\] must be increasing "
                                                                   r"in \[0, 2\]"),
        (lambda: SparseVLM(L, (0.5, 0.3, 1.2), layers=[0, 1, 2]), r"SparseVLM: keep_ratios = 1.2 is outside"),
    ],
)
def test_bad_settings_name_the_method(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unsupported_families_and_towers_name_the_method_and_reason():
    qwen = build_model("qwen2_vl", num_layers=2)
    with pytest.raises(ValueError, match="VisionZip needs each image's visual tokens to be the vision tower's patches"
                                         ".*'qwen2_vl'"):
        VisionZip(qwen)
    engine = VisualExit(qwen)
    with pytest.raises(ValueError, match="Downsample needs each image's visual tokens.*'qwen2_vl' tiles, pools"):
        engine(**build_batch(qwen, [Sample()]), policy=Downsample())
    full = build_model("llava", num_layers=2)
    full.config.vision_feature_select_strategy = "full"  # CLS kept: the image tokens are not the patch grid
    with pytest.raises(ValueError, match="VisionZip needs the prompt's image tokens to be the tower's patches.*'full' "
                                         "and a CLS token"):
        VisionZip(full)


def test_visionzip_without_its_tower_run_says_so(reference_model):
    """Image features encoded before the policy existed: its hook never saw the tower, so it refuses."""
    engine = VisualExit(reference_model)
    batch = build_batch(reference_model, [Sample()])
    encoded = reference_model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "mm_encoder_outputs": {"image": encoded}}
    with pytest.raises(ValueError, match="VisionZip: the vision tower did not run for this prefill's images"):
        engine(**inputs, policy=VisionZip(reference_model))
    policy = VisionZip(reference_model)
    two = build_batch(reference_model, [Sample(), Sample()])
    reference_model.model.get_image_features(pixel_values=two["pixel_values"])  # the hook sees two images
    with pytest.raises(ValueError, match="VisionZip: the vision tower's last run encoded 2 images of 16 patches, but "
                                         "this prefill has 16 visual tokens"):
        engine(**inputs, policy=policy)


class ShiftVisual(ExitPolicy):
    """Before layer 0, adds `amount` to the hidden states of the visual slots (a stand-in for a merging policy)."""

    name = "shift"

    def __init__(self, amount: float):
        self.amount = amount

    def before_layer(self, layer_idx, sub, state):
        if layer_idx:
            return Decision()
        return Decision(hidden=sub.hidden + self.amount * sub.slots_of(state.visual_mask)[..., None])


def test_composed_hidden_rewrites_act_in_order(engine, batch):
    """Each later policy is shown the states the earlier ones wrote: +1 then +2 is +3."""
    composed = engine(**batch, policy=ShiftVisual(1.0) + ShiftVisual(2.0))
    single = engine(**batch, policy=ShiftVisual(3.0))
    real = batch["attention_mask"].bool()
    assert (composed.logits - single.logits)[real].abs().max() <= 1e-5
    assert (single.logits - engine(**batch).logits)[real].abs().max() > 1e-2  # the shift does change the output


def test_hidden_states_of_another_shape_are_refused(engine, batch):
    class Truncating(ExitPolicy):
        name = "truncating"

        def before_layer(self, layer_idx, sub, state):
            return Decision(hidden=sub.hidden[:, 1:])

    with pytest.raises(ValueError, match=r"policy 'truncating' returned hidden states of shape \[3, 29, 32\] for a "
                                         r"sub-batch of shape \[3, 30, 32\]"):
        engine(**batch, policy=Truncating())


def test_greedy_map_fills_by_relevance_once_the_chosen_tokens_span_the_rest():
    """Duplicated tokens: after the two distinct directions, no token adds volume; the rest come by relevance (the
    kernel's diagonal), never a chosen one again and never NaN."""
    from dyvte.policies.input_selectors import greedy_map

    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    relevance = torch.tensor([0.5, 0.9, 0.7, 0.2])
    kernel = relevance[:, None] * (unit @ unit.T) * relevance[None, :]
    assert greedy_map(kernel, 4).tolist() == [1, 2, 0, 3]
