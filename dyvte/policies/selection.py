"""The token-selection methods of 2025: `VisPruner`, `CDPruner`, `DivPrune` (which visual tokens enter the LLM)
and `SparseVLM` (text-guided pruning inside the LLM, with the pruned tokens recycled into merged ones).

Each is one policy on the same engine as the other baselines (`baselines.py`): it composes with exit
(`CDPruner(...) + DynamicExit(heads)`), runs batched (each sample selects its own tokens), works with SDPA (the
attention a method reads is recomputed for its queries only) and leaves the KV cache of the tokens each layer
really computed. Kept and merged tokens stay at the position of a prompt slot, as everywhere in dyvte; where an
official implementation renumbers positions or places tokens elsewhere, the class docstring says so, as it
says which file and lines of the official code the class follows.

Settings that are a count of tokens in a paper (64 of LLaVA-1.5's 576) are shares here (`keep_ratio = 64/576`).
"""

import itertools
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..engine import Decision, ExitPolicy, PrefillState, SubBatch
from .baselines import _check_share, _images_of, _round_half_up


def _kept_count(keep_ratio: float, n: int) -> int:
    """`round(keep_ratio * n)` (half up), at least 1 and at most `n`."""
    return min(n, max(1, _round_half_up(keep_ratio * n)))


class VisPruner(ExitPolicy):
    """VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
    VLMs", ICCV 2025): before the LLM, each image keeps its important tokens by the vision tower's [CLS] attention
    and diverse tokens from the rest, found by removing near-duplicates.

    Follows Theia-4869/VisPruner@aefa01a, `llava/model/llava_arch.py` lines 141-186 (`encode_images`) and
    `llava/model/multimodal_encoder/clip_encoder.py` lines 36-51 (the CLS row `attentions[select_layer][:, :, 0,
    1:]`). An image of `P` patches keeps `T = round(keep_ratio * P)` tokens (paper: 64, 128 or 192 of 576):
    `T_imp = int(T * important_ratio)` (paper default 0.5) patches with the most [CLS] attention in the tower's
    feature layer (mean over heads); then, from the other patches ordered by that attention, rounds of removal
    until `T - T_imp` remain: the remaining ones alternate between set A (even places) and B (odd); each A token's
    score is its highest cosine similarity to a B token (the layer's output features); the `min(step, R - (T -
    T_imp))` A tokens with the highest scores leave, the other A tokens (by descending score) then the B tokens
    form the next order (paper: `step` 8). Sorting is stable (ties by order); with an odd number `R` of remaining
    tokens set A holds `ceil(R / 2)` (the official code fails there for batch > 1). The attention is recomputed for
    the CLS query only (`TowerFeatures`), so the tower keeps running with SDPA; the projector is per token, so
    pruning its output is pruning its input. Kept tokens keep their slots and positions (the official code feeds
    them at consecutive positions).

    Needs a tower with a [CLS] token (CLIP) and LLaVA-1.5's one grid per image; a SigLIP tower (no CLS) is
    refused naming the methods that run there (VisPruner's code supports CLIP towers only).
    """

    name = "vispruner"

    def __init__(self, model, keep_ratio: float = 64 / 576, important_ratio: float = 0.5, step: int = 8):
        _check_share("VisPruner", "keep_ratio", keep_ratio, low_open=True)
        _check_share("VisPruner", "important_ratio", important_ratio)
        if step < 1:
            raise ValueError(f"VisPruner: step (A tokens removed per round) must be >= 1, got {step}.")
        self.tower = get_adapter(model).tower_features("VisPruner", self)
        if not self.tower.has_cls:
            raise ValueError(
                f"VisPruner ranks important tokens by the [CLS] token's attention in the vision tower; this model's "
                f"tower ({self.tower.tower_name}) has no CLS token. On it use CDPruner or DivPrune "
                "(no tower attention needed) or VisionZip (ranks by the attention patches receive)."
            )
        self.keep_ratio, self.important_ratio, self.step = keep_ratio, important_ratio, step
        self._patches = 0  # tokens per image, this prefill
        self._kept: torch.Tensor | None = None  # [images, T] patch indices each image keeps

    def reset(self, state: PrefillState) -> None:
        read = self.tower.read(state.visual_mask)
        if read is None:
            self._kept = None
            return
        inputs, outputs = read
        probabilities, _ = self.tower.attention(inputs, cls_only=True)  # [images, heads, 1, 1 + P]
        importance = probabilities[:, :, 0, 1:].mean(dim=1)  # [images, P]
        features = F.normalize(outputs[:, 1:], dim=-1)  # [images, P, d]
        self._patches = features.shape[1]
        count = _kept_count(self.keep_ratio, self._patches)
        self._kept = torch.stack([self.select(importance[i], features[i], count) for i in range(len(features))])

    def select(self, importance: torch.Tensor, unit_features: torch.Tensor, count: int) -> torch.Tensor:
        """The `count` patch indices one image keeps, from its [CLS] attention [P] and unit features [P, d]."""
        important = int(count * self.important_ratio)
        diverse = count - important
        order = importance.argsort(descending=True, stable=True)
        residual = order[important:]
        while diverse > 0:
            removed = min(self.step, len(residual) - diverse)
            if removed <= 0:
                break
            a, b = residual[0::2], residual[1::2]
            scores = (unit_features[a] @ unit_features[b].T).max(dim=1).values
            distinct = scores.argsort(descending=True, stable=True)[removed:]
            residual = torch.cat([a[distinct], b])
        return torch.cat([order[:important], residual if diverse > 0 else residual[:0]]).sort().values

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx != 0 or self._kept is None:
            return Decision()
        row, slot = _images_of("VisPruner", sub, state.visual_mask, self._patches)
        images = self._kept.shape[0]
        chosen = (torch.arange(images, device=row.device)[:, None] * self._patches + self._kept.to(row.device)).flatten()
        keep = ~sub.slots_of(state.visual_mask)
        keep[row[chosen], slot[chosen]] = True
        return Decision(keep=keep)


def conditional_kernel(features: torch.Tensor, instruction: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """CDPruner's conditional DPP kernel [n, n] of `n` visual tokens `features` [n, d] given the instruction's
    tokens `instruction` [m, d]: `L = diag(q) S diag(q)`, `S` the cosine similarity of the visual tokens, `q` each
    token's relevance: its mean cosine similarity to the instruction tokens (negated with `negate`, as the official
    code does for CLIP's embeddings), min-max normalised as the official code, `(q - min q + 1e-6) / (max q -
    min q)` (1 for every token without instruction tokens)."""
    unit = F.normalize(features.float(), dim=-1)
    similarity = unit @ unit.T
    if not len(instruction):
        return similarity
    relevance = (unit @ F.normalize(instruction.float(), dim=-1).T).mean(dim=1)
    relevance = -relevance if negate else relevance
    spread = (relevance.max() - relevance.min()).clamp(min=1e-12)
    relevance = (relevance - relevance.min() + 1e-6) / spread
    return relevance[:, None] * similarity * relevance[None, :]


def greedy_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP inference of a DPP with kernel [n, n] (Chen et al., 2018, as CDPruner's code): `count` indices
    [count], in the order chosen, each the one adding the most to `log det` of the chosen set's kernel (by the
    incremental Cholesky update). Once no token adds a positive gain (> 1e-6: the chosen set already spans the
    rest, e.g. duplicated tokens), the rest are filled by the kernel's diagonal (relevance), largest first; the
    official code would divide by a zero gain there."""
    n = kernel.shape[0]
    vectors = kernel.new_zeros(count, n)
    gains = kernel.diagonal().clone()
    chosen: list[int] = []
    for i in range(count):
        j = int(gains.argmax())
        if gains[j] <= 1e-6:
            rest = torch.ones(n, dtype=torch.bool, device=kernel.device)
            rest[chosen] = False
            candidates = rest.nonzero().squeeze(1)
            order = kernel.diagonal()[candidates].argsort(descending=True, stable=True)
            chosen += candidates[order[: count - i]].tolist()
            break
        chosen.append(j)
        update = (kernel[j] - vectors[:i, j] @ vectors[:i]) / gains[j].sqrt()
        vectors[i] = update
        gains -= update.square()
        gains[j] = -float("inf")
    return torch.tensor(chosen, dtype=torch.long, device=kernel.device)


class CDPruner(ExitPolicy):
    """CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
    in MLLMs", NeurIPS 2025): before the LLM, each sample keeps the visual tokens a conditional DPP selects, the
    kernel weighing visual similarity by relevance to the instruction; greedy MAP inference.

    Follows Theia-4869/CDPruner@9541616, `llava/model/llava_arch.py` lines 140-187 (`encode_images`): the
    similarity is the cosine of the projected visual tokens (the LLM's input), the relevance the mean cosine to
    the instruction, min-max normalised (`conditional_kernel`), the kernel `q_i S_ij q_j`, and the fast greedy MAP
    loop (`greedy_map`). A sample with `n` visual tokens keeps `round(keep_ratio * n)` (paper: 64, 128
    or 192 of 576). The instruction: the official code embeds the question with CLIP's text tower and the image
    tokens with the tower's projection; Hugging Face LLaVA checkpoints carry no CLIP text tower, so here both sides
    are the LLM's input embeddings (the projected visual tokens and the text tokens after the first visual token),
    which every family has. The official code negates the relevance (line 159), a property its authors have
    "only observed in CLIP" (Theia-4869/CDPruner issue #14); these are not CLIP embeddings, so the relevance is not
    negated unless `negate_relevance=True`. Kept tokens keep their slots and positions. The official code's
    optional `theta` (commented out there) is not used.
    """

    name = "cdpruner"

    def __init__(self, keep_ratio: float = 64 / 576, negate_relevance: bool = False):
        _check_share("CDPruner", "keep_ratio", keep_ratio, low_open=True)
        self.keep_ratio, self.negate_relevance = keep_ratio, negate_relevance
        self._text: torch.Tensor | None = None  # [B, T] the instruction tokens, this prefill

    def reset(self, state: PrefillState) -> None:
        self._text = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
        )

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx != 0:
            return Decision()
        visual, text = sub.slots_of(state.visual_mask), sub.slots_of(self._text)
        keep = ~visual
        for row in range(len(sub)):
            slots = visual[row].nonzero().squeeze(1)
            if not len(slots):
                continue
            kernel = conditional_kernel(sub.hidden[row, slots], sub.hidden[row, text[row]], self.negate_relevance)
            keep[row, slots[greedy_map(kernel, _kept_count(self.keep_ratio, len(slots)))]] = True
        return Decision(keep=keep)


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """DivPrune's max-min diversity selection: `count` indices [count] of `features` [n, d], in the order chosen.
    Distance `1 - cosine`; the first is the token whose nearest other token is farthest, each next the token
    farthest (by its distance to the nearest chosen one) from those chosen; ties to the lower index, the chosen
    never again."""
    unit = F.normalize(features, dim=-1)
    distance = 1.0 - unit @ unit.T
    if len(features) == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    scores = distance.topk(2, dim=0, largest=False).values[1]
    chosen: list[int] = []
    for _ in range(count):
        if chosen:
            scores = distance[chosen].min(dim=0).values
            scores[chosen] = -float("inf")
        chosen.append(int(scores.argmax()))
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


class DivPrune(ExitPolicy):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models", CVPR
    2025): before layer `layer` (paper: 0, the LLM's input), each sample keeps the `round(keep_ratio * n)` of its
    `n` visual tokens that solve the max-min diversity problem greedily (`max_min_diverse`).

    Follows vbdi/divprune@799e2d9, `LLaVA/llava/model/llava_arch.py` lines 146-171 (`pairwise_cosine_similarity`,
    `DivPrune`) and 352-385 (applied to the visual input embeddings at `LAYER_INDEX=0`, keeping
    `int(round(SUBSET_RATIO * n))`; the paper's 0.098 keeps 56 of 576). Kept tokens keep their slots and
    positions (as the official code's `position_ids[:, keep_indexs]`). The official loop may pick a chosen token
    again when only exact duplicates are left; here it never does.
    """

    name = "divprune"

    def __init__(self, keep_ratio: float = 0.098, layer: int = 0):
        _check_share("DivPrune", "keep_ratio", keep_ratio, low_open=True)
        if layer < 0:
            raise ValueError(f"DivPrune: layer must be >= 0, got {layer}.")
        self.keep_ratio, self.layer = keep_ratio, layer

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx != self.layer:
            return Decision()
        visual = sub.slots_of(state.visual_mask)
        keep = ~visual
        for row in range(len(sub)):
            slots = visual[row].nonzero().squeeze(1)
            if not len(slots):
                continue
            count = min(len(slots), max(1, round(self.keep_ratio * len(slots))))
            keep[row, slots[max_min_diverse(sub.hidden[row, slots], count)]] = True
        return Decision(keep=keep)


def cluster_and_merge(tokens: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM's token recycling (density-peak clustering, DPC-KNN): `tokens` [m, d] into `clusters` merged
    tokens. Returns each cluster's centre (index into `tokens`, [clusters], by descending centre score) and its
    merged token [clusters, d], the sum of its members over `(count + 1e-6)` as the official code.

    Distances are Euclidean over `sqrt(d)`; a token's density is `exp(-mean of its squared distances to its
    `clusters` nearest tokens, itself included)`; its parent distance the distance to the nearest denser token
    (the largest distance of all for the densest); centres are the `clusters` tokens with the largest
    density x parent distance; every token joins its nearest centre. Equal densities are ordered by index (the
    official code adds uniform noise of 1e-6 instead)."""
    count, width = tokens.shape
    distance = torch.cdist(tokens[None], tokens[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / width**0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    index = torch.arange(count, device=tokens.device)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (index[None] < index[:, None]))
    parent = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = (parent * density).argsort(descending=True, stable=True)[:clusters]
    member = distance[centres].argmin(dim=0)
    member[centres] = torch.arange(clusters, device=tokens.device)
    sizes = torch.bincount(member, minlength=clusters).to(tokens.dtype)
    merged = tokens.new_zeros(clusters, width).index_add(0, member, tokens) / (sizes[:, None] + 1e-6)
    return centres, merged


def _clusters(recycled: int, cluster: float) -> int:
    """Merged tokens made of `recycled` tokens: `int(recycled * cluster) + 1` (official: `int(m / 10) + 1`)."""
    return int(round(recycled * cluster, 9)) + 1


PAPER_LAYERS = (2, 6, 15)  # SparseVLM's pruning layers in LLaVA-1.5-7B's 32
PAPER_KEEP = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}  # tokens kept after each, of 576


def sparsevlm_layers(num_layers: int, keep_ratios: list[float]) -> tuple[list[int], list[float]]:
    """The paper's pruning layers 2, 6, 15 of 32 scaled to `num_layers` (`round(L * l / 32)`, half up, at most
    `L - 2`) with their keep ratios; stages that land on one layer keep the later (smaller) ratio."""
    if len(keep_ratios) != len(PAPER_LAYERS):
        raise ValueError(
            f"SparseVLM: {len(keep_ratios)} keep_ratios for the paper's {len(PAPER_LAYERS)} pruning layers; give "
            "layers explicitly for another number of stages."
        )
    stages = {min(_round_half_up(num_layers * layer / 32), num_layers - 2): ratio
              for layer, ratio in zip(PAPER_LAYERS, keep_ratios)}
    return sorted(stages), [stages[layer] for layer in sorted(stages)]


class SparseVLM(ExitPolicy):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
    Inference", ICML 2025), v1.0: text raters rank the visual tokens in chosen decoder layers, the least rated
    leave after that layer, and part of them are recycled into a few merged tokens.

    Follows Gumpest/SparseVLMs@26a5f48: `llava/model/language_model/modelling_sparse_llama.py` lines 196-205 (raters)
    and 240-320 (pruning and recycling after the layers `pruning_loc`), `score.py` lines 9-46 (`attn_postprocess_
    topk`, the per-layer counts) and `utils.py` lines 179-239 (`cluster_and_merge`, here `cluster_and_merge`).
    Raters (once, on the LLM's input): the text tokens after the first visual token whose mean over the visual
    tokens of `softmax_text(v t^T)` (input embeddings) exceeds its mean. After each layer `layers[s]` (paper: 2, 6,
    15 of 32, scaled to the depth by default, `sparsevlm_layers`), each sample ranks its remaining visual tokens by that layer's
    attention from the raters (mean over heads and raters, recomputed for those queries, so SDPA stays on) and
    keeps the top `min(round(keep_ratios[s] * N), remaining - 1)` (`N`: its prompt's visual tokens; paper at 192:
    300, 200, 110 of 576). Recycling: of the pruned tokens, the `int(0.3 * pruned) + 1` best rated are clustered
    (`cluster_and_merge`) into `int(that / 10) + 1` merged tokens of layer `layers[s]`'s output, the rest leave. A
    merged token stays in its cluster centre's slot and position (the official code appends the merged tokens
    after the kept ones and renumbers positions). The official v2.0 options (attention bias correction, head
    selection) are not implemented.
    """

    name = "sparsevlm"

    def __init__(self, num_layers: int, keep_ratios=tuple(k / 576 for k in PAPER_KEEP[192]),
                 layers: list[int] | None = None, recycle: float = 0.3, cluster: float = 0.1):
        keep_ratios = [float(r) for r in keep_ratios]
        if layers is None:
            layers, keep_ratios = sparsevlm_layers(num_layers, keep_ratios)
        layers = [int(layer) for layer in layers]
        if len(layers) != len(keep_ratios):
            raise ValueError(
                f"SparseVLM: {len(layers)} pruning layers {layers} but {len(keep_ratios)} keep_ratios; give one keep "
                "ratio per pruning layer."
            )
        if not layers or not all(a < b for a, b in itertools.pairwise(layers)) or not 0 <= layers[0] or \
                layers[-1] > num_layers - 2:
            raise ValueError(
                f"SparseVLM: layers {layers} must be increasing in [0, {num_layers - 2}] for {num_layers} decoder "
                "layers (tokens leave after each of them); for a shallow model give them explicitly."
            )
        for ratio in keep_ratios:
            _check_share("SparseVLM", "keep_ratios", ratio)
        _check_share("SparseVLM", "recycle", recycle)
        _check_share("SparseVLM", "cluster", cluster, low_open=True)
        self.num_layers, self.keep_ratios, self.layers = num_layers, keep_ratios, layers
        self.recycle, self.cluster = recycle, cluster
        self._text: torch.Tensor | None = None  # [B, T] text after the first visual token
        self._raters: torch.Tensor | None = None  # [B, T] the raters, this prefill
        self._scores: torch.Tensor | None = None  # [B, T] the last pruning layer's rating

    def reset(self, state: PrefillState) -> None:
        if state.num_layers != self.num_layers:
            raise ValueError(
                f"SparseVLM was built for {self.num_layers} decoder layers; the model has {state.num_layers}."
            )
        state.adapter.check_query_attention("SparseVLM")
        self._text = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
        )
        self._raters = torch.zeros_like(self._text)
        self._scores = None

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx == 0:
            self._choose_raters(sub, state)
        keep = hidden = None
        if layer_idx - 1 in self.layers:
            keep, hidden = self._prune(self.layers.index(layer_idx - 1), sub, state)
        if layer_idx in self.layers:
            ranked = sub if hidden is None else replace(sub, hidden=hidden)
            adapter = state.adapter
            scores = adapter.query_attention(adapter.layers[layer_idx], ranked, sub.slots_of(self._raters), keep)
            self._scores = torch.zeros(state.visual_mask.shape, dtype=scores.dtype, device=scores.device)
            row, slot = sub.valid.nonzero(as_tuple=True)
            self._scores[sub.rows[row], sub.index[row, slot]] = scores[row, slot]
        return Decision(keep=keep, hidden=hidden)

    def _choose_raters(self, sub: SubBatch, state: PrefillState) -> None:
        visual, text = sub.slots_of(state.visual_mask), sub.slots_of(self._text)
        for row in range(len(sub)):
            text_slots = text[row].nonzero().squeeze(1)
            if not visual[row].any() or not len(text_slots):
                continue
            relation = (sub.hidden[row, visual[row]] @ sub.hidden[row, text_slots].T).softmax(dim=1).mean(dim=0)
            raters = text_slots[relation > relation.mean()]
            self._raters[sub.rows[row], sub.index[row, raters]] = True

    def _prune(self, stage: int, sub: SubBatch, state: PrefillState) -> tuple[torch.Tensor, torch.Tensor]:
        visual = sub.slots_of(state.visual_mask)
        prompt_visual = state.visual_mask.sum(dim=1)[sub.rows].tolist()
        keep, hidden = ~visual, sub.hidden.clone()
        for row in range(len(sub)):
            slots = visual[row].nonzero().squeeze(1)
            if not len(slots):
                continue
            scores = self._scores[sub.rows[row], sub.index[row, slots]]
            count = min(_round_half_up(self.keep_ratios[stage] * prompt_visual[row]), len(slots) - 1)
            order = scores.argsort(descending=True, stable=True)
            keep[row, slots[order[:count]]] = True
            pruned = slots[order[count:]].sort().values  # position order, as the official code
            if not len(pruned):
                continue
            recycled = int(len(pruned) * self.recycle) + 1
            best = scores[torch.isin(slots, pruned)].argsort(descending=True, stable=True)[:recycled]
            recycled_slots = pruned[best]
            centres, merged = cluster_and_merge(sub.hidden[row, recycled_slots], _clusters(recycled, self.cluster))
            hidden[row, recycled_slots[centres]] = merged
            keep[row, recycled_slots[centres]] = True
        return keep, hidden


def sparsevlm_share(keep_ratios: list[float], layers: list[int], num_layers: int, n_visual: int = 576,
                    recycle: float = 0.3, cluster: float = 0.1) -> float:
    """`(1/L) sum_l v_l / N` of SparseVLM on a prompt of `n_visual` visual tokens: the counts depend on `N` only."""
    left, total = n_visual, 0
    for layer in range(num_layers):
        total += left
        if layer in layers and left:
            kept = min(_round_half_up(keep_ratios[layers.index(layer)] * n_visual), left - 1)
            pruned = left - kept
            recycled = int(pruned * recycle) + 1
            left = kept + _clusters(recycled, cluster)
    return total / (num_layers * n_visual)
