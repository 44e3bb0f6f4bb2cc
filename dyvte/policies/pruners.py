"""In-LLM pruners: visual tokens leave before (or after) chosen decoder layers, a few at a time (`FastV`,
`RandomPrune`, `PyramidDrop`, `DART`, `SparseVLM`, which also recycles part of the pruned tokens into merged ones, and
`AutoPrune`, which sets each sample's keep rate per layer from the text-visual mutual information and recycles too).

Each is one policy on the same engine as exit: it composes with exit (`FastV(...) + DynamicExit(heads)`), runs
batched (each sample prunes its own tokens), works with SDPA (the attention a method ranks by is recomputed for its
queries only, `adapter.query_attention`) and leaves the KV cache of the tokens each layer really computed (so
`engine.generate` decodes against it and FLOPs are counted from it). Kept tokens keep their positions: the engine
never renumbers them; where a paper's code does, the class docstring says so.
"""

import math
import zlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..engine import Decision, ExitPolicy, PrefillState, SubBatch
from .settings import (
    SettingError,
    check_choice,
    check_integer,
    check_layers,
    check_number,
    check_share,
    check_shares,
)
from .tokens import attention_by_position, keep_most_attended, kept_count, round_half_up, setting_for_share


@dataclass
class FastVSettings:
    """FastV's settings (`fastv.*`): before decoder layer `layer`, keep the `keep_ratio` most attended visual
    tokens."""

    layer: int = 2
    keep_ratio: float = 0.5

    def __post_init__(self):
        check_integer("FastV", "layer", self.layer, 1, why="it ranks tokens by the attention of layer `layer - 1`")
        check_share("FastV", "keep_ratio", self.keep_ratio)

    def check_depth(self, num_layers: int) -> None:
        """`layer` is one of the model's layers: FastV before a layer past the last would never prune."""
        if self.layer >= num_layers:
            raise SettingError(f"FastV prunes before decoder layer `layer`; the model has layers 0...{num_layers - 1}, "
                               f"got layer={self.layer} (fastv.layer).", "layer", self.layer,
                               f"FastV prunes before a decoder layer in [1, {num_layers - 1}] (the model has "
                               f"num_hidden_layers={num_layers})")


class FastV(ExitPolicy):
    """FastV: before layer `layer`, keep the `keep_ratio` visual tokens the last prompt token attends to most
    in layer `layer - 1`. The attention is recomputed for that one query only, so SDPA stays on elsewhere."""

    name = "fastv"

    def __init__(self, layer: int = FastVSettings.layer, keep_ratio: float = FastVSettings.keep_ratio):
        self.settings = FastVSettings(layer, keep_ratio)
        self.layer, self.keep_ratio = layer, keep_ratio
        self._scores: torch.Tensor | None = None  # [B, T] layer `layer - 1`'s attention of this prefill

    def reset(self, state: PrefillState) -> None:
        self.settings.check_depth(state.num_layers)  # refused, as an out-of-range exit layer is
        self._scores = None

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx == self.layer - 1:
            scores = state.adapter.last_query_attention(state.adapter.layers[layer_idx], sub)
            self._scores = attention_by_position(scores, sub, state.visual_mask.shape)
            return Decision()
        if layer_idx != self.layer:
            return Decision()
        n_visual = sub.slots_of(state.visual_mask).sum(dim=1).tolist()  # per sample: the visual tokens it still has
        n_keep = torch.tensor([kept_count(self.keep_ratio, n) for n in n_visual], device=sub.rows.device)
        return Decision(keep=keep_most_attended(sub, state.visual_mask, self._scores, n_keep))


def _visual_slots(sub: SubBatch, visual_mask: torch.Tensor, row: int) -> torch.Tensor:
    """The slots of row `row` that hold visual tokens, in position order ([n_visual] long)."""
    return sub.slots_of(visual_mask)[row].nonzero().squeeze(1)


@dataclass
class RandomPruneSettings:
    """Random pruning's settings (`random.*`): before layer `layer`, keep a random `keep_ratio` of each sample's
    visual tokens, drawn from `seed` and the sample's token ids."""

    layer: int = 2
    keep_ratio: float = 0.5
    seed: int = 0

    def __post_init__(self):
        check_integer("RandomPrune", "layer", self.layer, 0)
        check_share("RandomPrune", "keep_ratio", self.keep_ratio)
        check_integer("RandomPrune", "seed", self.seed, 0, 2**31 - 1)


class RandomPrune(ExitPolicy):
    """Random pruning: before layer `layer`, each sample keeps `ceil(keep_ratio * n)` of the `n` visual tokens it
    still has, chosen uniformly at random.

    The baseline that benchmarks of token reduction (Wen et al., "Token Pruning in Multimodal Large Language
    Models: Are We Solving the Right Problem?", 2025) found hard to beat; no paper default, so FastV's layer 2 and
    50%. A sample's draw depends only on `seed` and its own prompt: `torch.randperm(n, generator)` with the
    generator seeded `seed * 2**32 + crc32(ids)`, `ids` the little-endian int64 bytes of its real token ids; the
    first `ceil(keep_ratio * n)` entries name the kept tokens among its visual slots in position order. So a
    sample prunes the same tokens in any batch and any prefill, and different prompts draw differently.
    """

    name = "random"

    def __init__(self, layer: int = RandomPruneSettings.layer, keep_ratio: float = RandomPruneSettings.keep_ratio,
                 seed: int = RandomPruneSettings.seed):
        settings = RandomPruneSettings(layer, keep_ratio, seed)
        self.layer, self.keep_ratio, self.seed = settings.layer, settings.keep_ratio, settings.seed

    def sample_seed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        """The generator seed of one sample ([T] ids and mask)."""
        ids = input_ids[attention_mask.bool()].to(torch.int64).cpu().numpy().astype("<i8").tobytes()
        return self.seed * 2**32 + zlib.crc32(ids)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx != self.layer:
            return Decision()
        visual = sub.slots_of(state.visual_mask)
        keep = ~visual
        for row, sample in enumerate(sub.rows.tolist()):
            slots = _visual_slots(sub, state.visual_mask, row)
            generator = torch.Generator().manual_seed(
                self.sample_seed(state.input_ids[sample], state.attention_mask[sample])
            )
            chosen = torch.randperm(len(slots), generator=generator)[: kept_count(self.keep_ratio, len(slots))]
            keep[row, slots[chosen.to(slots.device)]] = True
        return Decision(keep=keep)


@dataclass
class PyramidDropSettings:
    """PyramidDrop's settings (`pdrop.*`): the share kept at each stage boundary (`ratio`, compounding), and the
    boundaries (`layers`; None: the paper's 8, 16, 24 of 32 scaled to the model's depth)."""

    ratio: float = 0.5
    layers: list[int] | None = None

    def __post_init__(self):
        check_share("PyramidDrop", "ratio", self.ratio)
        check_layers("PyramidDrop", "layers", self.layers, 1, "must be null or an increasing list of layers >= 1")

    def stage_layers(self, num_layers: int) -> list[int]:
        """The stage boundaries on a model of `num_layers` decoder layers: `layers`, or the paper's scaled to the
        depth (`round(L * 8/32)`, ...; coinciding ones once)."""
        if self.layers is None:
            scaled = {round_half_up(num_layers * stage / 32) for stage in (8, 16, 24)}
            layers = sorted(layer for layer in scaled if 1 <= layer < num_layers)
        else:
            layers = [int(layer) for layer in self.layers]
        if not layers or layers[-1] >= num_layers:
            raise SettingError(f"PyramidDrop: layers {layers} must be increasing stage boundaries in [1, "
                               f"{num_layers - 1}] for {num_layers} decoder layers.", "layers", self.layers,
                               f"must be increasing stage boundaries in [1, {num_layers - 1}] (the model has "
                               f"num_hidden_layers={num_layers})")
        return layers

    def check_depth(self, num_layers: int) -> None:
        self.stage_layers(num_layers)


class PyramidDrop(ExitPolicy):
    """PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
    Redundancy Reduction", CVPR 2025): the decoder in stages; before each stage boundary `layers[s]`, each sample
    keeps `floor(N * ratio^(s+1))` of its `N` prompt visual tokens, those the last prompt token attends to most.

    Paper defaults: boundaries 8, 16, 24 of LLaVA-1.5-7B's 32 layers, ratio 0.5 (50%, 25%, 12.5% kept); by
    default the boundaries are scaled to the model's depth (`round(L * 8/32)`, ...; coinciding ones once). The
    ranking attention is that of the boundary layer itself (its own `input_layernorm`, `q_proj`, `k_proj` and
    rotary on its input), as the paper's code computes it before the layer runs on the kept tokens; recomputed for
    the one query, so SDPA stays on. That is why this is not a `KeepRateSchedule` preset: a schedule ranks by the
    previous layer's attention and rounds up. The paper's code renumbers the kept tokens' positions after each
    drop; here kept tokens and text keep their positions (the engine's convention, as in FastV's and DART's code).
    """

    name = "pdrop"

    def __init__(self, num_layers: int, ratio: float = PyramidDropSettings.ratio, layers: list[int] | None = None):
        settings = PyramidDropSettings(ratio, layers)
        self.num_layers, self.ratio, self.layers = num_layers, settings.ratio, settings.stage_layers(num_layers)

    def reset(self, state: PrefillState) -> None:
        if state.num_layers != self.num_layers:
            raise ValueError(
                f"PyramidDrop was built for {self.num_layers} decoder layers; the model has {state.num_layers}."
            )

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx not in self.layers:
            return Decision()
        kept_share = self.ratio ** (self.layers.index(layer_idx) + 1)
        prompt_visual = state.visual_mask.sum(dim=1)[sub.rows].tolist()
        n_keep = torch.tensor([math.floor(round(kept_share * n, 9)) for n in prompt_visual], device=sub.rows.device)
        scores = state.adapter.last_query_attention(state.adapter.layers[layer_idx], sub)
        by_position = attention_by_position(scores, sub, state.visual_mask.shape)
        return Decision(keep=keep_most_attended(sub, state.visual_mask, by_position, n_keep))


@dataclass
class DARTSettings:
    """DART's settings (`dart.*`): before layer `layer`, keep `keep_ratio` of each sample's visual tokens (128 of
    576), chosen by `image_pivots` visual and `text_pivots` text pivots."""

    layer: int = 2
    keep_ratio: float = 128 / 576
    image_pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self):
        check_integer("DART", "layer", self.layer, 1, why="its pivots come from the keys of layer `layer - 1`")
        check_share("DART", "keep_ratio", self.keep_ratio)
        check_integer("DART", "image_pivots", self.image_pivots, 0)
        check_integer("DART", "text_pivots", self.text_pivots, 0)
        if self.image_pivots + self.text_pivots == 0:
            raise SettingError(f"DART needs pivots: image_pivots = {self.image_pivots} and text_pivots = "
                               f"{self.text_pivots} must be >= 0 and not both 0.", "text_pivots", self.text_pivots,
                               "must be >= 1 when dart.image_pivots is 0: DART needs pivots")


def pyramid_ratio(share: float, layers: list[int], num_layers: int) -> float | None:
    """PyramidDrop's per-stage ratio whose share is `share`; None when the first stage alone costs more."""
    bounds = [0, *layers, num_layers]

    def cost(ratio: float) -> float:
        return sum((bounds[s + 1] - bounds[s]) * ratio**s for s in range(len(bounds) - 1)) / num_layers

    return None if cost(0.0) > share else setting_for_share(cost, share, 0.0, 1.0)


def pdrop_at_budget(settings: PyramidDropSettings, share: float, num_layers: int, n_visual: int
                    ) -> tuple[PyramidDropSettings | None, str]:
    """PyramidDrop at the budget `share`: its per-stage ratio at its stage boundaries."""
    layers = settings.stage_layers(num_layers)
    ratio = pyramid_ratio(share, layers, num_layers)
    if ratio is None:
        return None, f"out of reach: its first stage (layers 0-{layers[0] - 1}) keeps every token"
    return replace(settings, ratio=ratio), f"ratio {ratio:.3f} at layers {layers}"


class DART(ExitPolicy):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
    More", 2025): keep the visual tokens that duplicate each other least, attention-free (SDPA stays on).

    Before layer `layer` (paper: 2), each sample keeps `ceil(keep_ratio * n)` of the `n` visual tokens it has
    (paper: 128 of 576, `keep_ratio = 0.222`). Pivots: its `image_pivots` visual tokens and its `text_pivots` text
    tokens after the first visual token (paper: 4 and 4) with the largest L1 norm of their keys in layer
    `layer - 1` (after rotary). Then pivot by pivot, in position order, the visual tokens least similar to the
    pivot (cosine similarity of the hidden states entering layer `layer` after the decoder's final norm, as the
    paper's code) among those not yet kept join the kept set; image pivots are kept, text pivots only choose.
    The budget is exact: the official code gives each of the 8 pivots `floor(B / 8)` tokens and keeps the 4
    image pivots on top (132 for B = 128); here the `B - image pivots` tokens are shared out as evenly as
    possible, the earlier pivots taking one more. With fewer than `image_pivots` tokens to keep, the top ones are
    the pivots and nothing else is kept.
    """

    name = "dart"

    def __init__(self, layer: int = DARTSettings.layer, keep_ratio: float = DARTSettings.keep_ratio,
                 image_pivots: int = DARTSettings.image_pivots, text_pivots: int = DARTSettings.text_pivots):
        settings = DARTSettings(layer, keep_ratio, image_pivots, text_pivots)
        self.layer, self.keep_ratio = settings.layer, settings.keep_ratio
        self.image_pivots, self.text_pivots = settings.image_pivots, settings.text_pivots
        self._key_norms: torch.Tensor | None = None  # [B, T] L1 norm of layer `layer - 1`'s keys, this prefill
        self._text: torch.Tensor | None = None  # [B, T] the text tokens after each sample's first visual token

    def reset(self, state: PrefillState) -> None:
        self._key_norms = None
        self._text = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
        )

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx == self.layer - 1:
            adapter = state.adapter
            keys = adapter.layer_keys(adapter.layers[layer_idx], sub.hidden).transpose(1, 2)
            keys = adapter.rotate(keys, sub.cos, sub.sin)
            norms = keys.abs().sum(dim=(1, 3))  # [b, n] L1 over every key head and dimension
            self._key_norms = attention_by_position(norms, sub, state.visual_mask.shape)
            return Decision()
        if layer_idx != self.layer:
            return Decision()
        normed = F.normalize(state.adapter.norm(sub.hidden), dim=-1)
        slot_norms = self._key_norms[sub.rows[:, None], sub.index.clamp(min=0)]
        visual, text = sub.slots_of(state.visual_mask), sub.slots_of(self._text)
        keep = ~visual
        for b in range(len(sub)):
            kept = self._choose(normed[b], slot_norms[b], visual[b].nonzero().squeeze(1), text[b].nonzero().squeeze(1))
            keep[b, kept] = True
        return Decision(keep=keep)

    def _choose(self, normed: torch.Tensor, key_norms: torch.Tensor, visual: torch.Tensor, text: torch.Tensor
                ) -> torch.Tensor:
        """The kept visual slots of one sample: `normed` [n, d] unit hidden states, `key_norms` [n], `visual` and
        `text` the slots of its visual and text tokens in position order."""
        n_keep = kept_count(self.keep_ratio, len(visual))
        image_pivots = visual[key_norms[visual].topk(min(self.image_pivots, n_keep)).indices]
        text_pivots = text[key_norms[text].topk(min(self.text_pivots, len(text))).indices]
        pivots = torch.cat([image_pivots, text_pivots]).sort().values
        kept = [int(s) for s in image_pivots]
        candidates = visual[~torch.isin(visual, image_pivots)]
        left = n_keep - len(kept)
        for i, pivot in enumerate(pivots.tolist()):
            quota = left // len(pivots) + (i < left % len(pivots))
            similarity = normed[candidates] @ normed[pivot]
            chosen = similarity.argsort(stable=True)[:quota]
            kept += candidates[chosen].tolist()
            candidates = candidates[~torch.isin(candidates, candidates[chosen])]
        return torch.tensor(kept, dtype=torch.long, device=visual.device)


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
    tied = (density[None, :] == density[:, None]) & (index[None] < index[:, None])
    denser = (density[None, :] > density[:, None]) | tied
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


def keep_and_recycle(sub: SubBatch, row: int, slots: torch.Tensor, scores: torch.Tensor, count: int,
                     keep: torch.Tensor, hidden: torch.Tensor, recycle: float, cluster: float) -> None:
    """SparseVLM's pruning with token recycling (also AutoPrune's), for row `row` of `sub`, in place: of its
    visual `slots` ([v], position order) scored `scores` ([v]), the `count` best stay (`keep` [b, n]); of the
    others (the pruned), the `int(recycle * pruned) + 1` best scored are clustered (`cluster_and_merge`) into
    `int(that * cluster) + 1` merged tokens of `sub.hidden`, each written into its centre's slot of `hidden`
    [b, n, d] and kept; the rest leave. Ties go to the earlier slot; nothing is pruned when `count` >= v."""
    order = scores.argsort(descending=True, stable=True)
    keep[row, slots[order[:count]]] = True
    pruned = slots[order[count:]].sort().values  # position order, as the official code
    if not len(pruned):
        return
    recycled = int(len(pruned) * recycle) + 1
    best = scores[torch.isin(slots, pruned)].argsort(descending=True, stable=True)[:recycled]
    recycled_slots = pruned[best]
    centres, merged = cluster_and_merge(sub.hidden[row, recycled_slots], _clusters(recycled, cluster))
    hidden[row, recycled_slots[centres]] = merged
    keep[row, recycled_slots[centres]] = True


PAPER_LAYERS = (2, 6, 15)  # SparseVLM's pruning layers in LLaVA-1.5-7B's 32
PAPER_KEEP = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}  # tokens kept after each, of 576


def sparsevlm_layers(num_layers: int, keep_ratios: list[float]) -> tuple[list[int], list[float]]:
    """The paper's pruning layers 2, 6, 15 of 32 scaled to `num_layers` (`round(L * l / 32)`, half up, at most
    `L - 2`) with their keep ratios (one per paper layer); stages that land on one layer keep the later (smaller)
    ratio."""
    stages = {min(round_half_up(num_layers * layer / 32), num_layers - 2): ratio
              for layer, ratio in zip(PAPER_LAYERS, keep_ratios)}
    return sorted(stages), [stages[layer] for layer in sorted(stages)]


@dataclass
class SparseVLMSettings:
    """SparseVLM's settings (`sparsevlm.*`): the share of each sample's prompt visual tokens kept after each pruning
    layer (`keep_ratios`; the paper's 192-token preset: 300, 200, 110 of 576), the pruning layers (`layers`; None:
    the paper's 2, 6, 15 of 32 scaled to the depth), and the share of the pruned tokens recycled (`recycle`) and of
    those, the merged tokens made (`cluster`)."""

    keep_ratios: tuple[float, ...] = tuple(k / 576 for k in PAPER_KEEP[192])
    layers: list[int] | None = None
    recycle: float = 0.3
    cluster: float = 0.1

    def __post_init__(self):
        check_shares("SparseVLM", "keep_ratios", self.keep_ratios)
        count = len(self.keep_ratios)
        if self.layers is None and count != len(PAPER_LAYERS):
            raise SettingError(f"SparseVLM: {count} keep_ratios for the paper's {len(PAPER_LAYERS)} pruning layers; "
                               "give layers explicitly for another number of stages.", "keep_ratios",
                               self.keep_ratios, f"must hold {len(PAPER_LAYERS)} keep ratios, one per paper pruning "
                               "layer, unless sparsevlm.layers names the layers")
        expected = f"must be null or {count} increasing layers >= 0, one per sparsevlm.keep_ratios entry"
        if isinstance(self.layers, (list, tuple)) and len(self.layers) != count:
            raise SettingError(f"SparseVLM: {len(self.layers)} pruning layers {self.layers} but {count} keep_ratios; "
                               "give one keep ratio per pruning layer.", "layers", self.layers, expected)
        check_layers("SparseVLM", "layers", self.layers, 0, expected)
        check_share("SparseVLM", "recycle", self.recycle)
        check_share("SparseVLM", "cluster", self.cluster, low_open=True)

    def stage_layers(self, num_layers: int) -> tuple[list[int], list[float]]:
        """The pruning layers on a model of `num_layers` decoder layers and their keep ratios: as given, or the
        paper's scaled to the depth (`sparsevlm_layers`); tokens leave after each, so the last is at most `L - 2`."""
        keep_ratios = [float(ratio) for ratio in self.keep_ratios]
        if self.layers is None:
            layers, keep_ratios = sparsevlm_layers(num_layers, keep_ratios)
        else:
            layers = [int(layer) for layer in self.layers]
        if layers[0] < 0 or layers[-1] > num_layers - 2:
            raise SettingError(f"SparseVLM: layers {layers} must be increasing in [0, {num_layers - 2}] for "
                               f"{num_layers} decoder layers (tokens leave after each of them); for a shallow model "
                               "give them explicitly.", "layers", self.layers,
                               f"must be increasing layers in [0, {num_layers - 2}] (the model has "
                               f"num_hidden_layers={num_layers}; tokens leave after each)")
        return layers, keep_ratios

    def check_depth(self, num_layers: int) -> None:
        self.stage_layers(num_layers)


class SparseVLM(ExitPolicy):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
    Inference", ICML 2025), v1.0: text raters rank the visual tokens in chosen decoder layers, the least rated
    leave after that layer, and part of them are recycled into a few merged tokens.

    Follows Gumpest/SparseVLMs@26a5f48: `llava/model/language_model/modelling_sparse_llama.py` lines 196-205 (raters)
    and 240-320 (pruning and recycling after the layers `pruning_loc`), `score.py` lines 9-46 (`attn_postprocess_
    topk`, the per-layer counts) and `utils.py` lines 179-239 (`cluster_and_merge`, here `cluster_and_merge`).
    Raters (once, on the LLM's input): the text tokens after the first visual token whose mean over the visual
    tokens of `softmax_text(v t^T)` (input embeddings) exceeds its mean. After each layer `layers[s]` (paper: 2, 6,
    15 of 32, scaled to the depth by default, `sparsevlm_layers`), each sample ranks its remaining visual tokens by
    that layer's attention from the raters (mean over heads and raters, recomputed for those queries, so SDPA stays
    on) and keeps the top `min(round(keep_ratios[s] * N), remaining - 1)` (`N`: its prompt's visual tokens; paper
    at 192: 300, 200, 110 of 576). Recycling: of the pruned tokens, the `int(0.3 * pruned) + 1` best rated are clustered
    (`cluster_and_merge`) into `int(that / 10) + 1` merged tokens of layer `layers[s]`'s output, the rest leave. A
    merged token stays in its cluster centre's slot and position (the official code appends the merged tokens
    after the kept ones and renumbers positions). The official v2.0 options (attention bias correction, head
    selection) are not implemented.
    """

    name = "sparsevlm"

    def __init__(self, num_layers: int, keep_ratios=SparseVLMSettings.keep_ratios, layers: list[int] | None = None,
                 recycle: float = SparseVLMSettings.recycle, cluster: float = SparseVLMSettings.cluster):
        settings = SparseVLMSettings(tuple(keep_ratios), layers, recycle, cluster)
        self.layers, self.keep_ratios = settings.stage_layers(num_layers)
        self.num_layers, self.recycle, self.cluster = num_layers, settings.recycle, settings.cluster
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
            count = min(round_half_up(self.keep_ratios[stage] * prompt_visual[row]), len(slots) - 1)
            keep_and_recycle(sub, row, slots, scores, count, keep, hidden, self.recycle, self.cluster)
        return keep, hidden


def sparsevlm_share(keep_ratios: list[float], layers: list[int], num_layers: int, n_visual: int = 576,
                    recycle: float = 0.3, cluster: float = 0.1) -> float:
    """`(1/L) sum_l v_l / N` of SparseVLM on a prompt of `n_visual` visual tokens: the counts depend on `N` only."""
    left, total = n_visual, 0
    for layer in range(num_layers):
        total += left
        if layer in layers and left:
            kept = min(round_half_up(keep_ratios[layers.index(layer)] * n_visual), left - 1)
            pruned = left - kept
            recycled = int(pruned * recycle) + 1
            left = kept + _clusters(recycled, cluster)
    return total / (num_layers * n_visual)


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
    return ratios(setting_for_share(cost, share, 0.0, 1.0 / min(base)))


def sparsevlm_at_budget(settings: SparseVLMSettings, share: float, num_layers: int, n_visual: int
                        ) -> tuple[SparseVLMSettings | None, str]:
    """SparseVLM at the budget `share` (on a prompt of `n_visual` visual tokens): its keep ratios, scaled together."""
    layers, keep_ratios = settings.stage_layers(num_layers)
    ratios = sparsevlm_ratios(share, keep_ratios, layers, num_layers, n_visual)
    if ratios is None:
        return None, (f"out of reach: its first pruning comes after layer {layers[0]}, so {layers[0] + 1}/"
                      f"{num_layers} of the tokens stay alone")
    return (replace(settings, keep_ratios=tuple(ratios), layers=layers),
            f"keep {', '.join(f'{r:.3f}' for r in ratios)} after layers {layers}")


AUTOPRUNE_ACCOUNTINGS = ("equivalent", "official")  # what AutoPrune's budget counts (`autoprune_accounted`)
CURVE_HEIGHT = 0.75  # height of AutoPrune's retention curve (msl 1875)
CURVE_DEPTH = 32  # the official curve's layer axis: LLaVA-1.5-7B's 32 decoder layers
SCALE_HIGH, SCALE_STEPS = 20.0, 200  # the bisection of the curve's scale: on [0, 20], 200 halvings (msl 1903, 1907)
TEXT_WEIGHT = 0.3  # weight of MI0 x text attention in layer 0's score (msl 286)
RECYCLE, CLUSTER = 0.3, 0.1  # recycled share of the pruned tokens and merged tokens per recycled one (msl 366, 371)


def autoprune_curve(k: float, num_layers: int, x0: float) -> list[float]:
    """AutoPrune's unscaled retention curve of slope `k` for layers `l = 1..L-1`: `p(l) = 0.75 / (1 + exp(k (l' -
    (x0 + k))))` (msl 1868-1875; the shift is `x0 + k`), at `l' = l * 32 / L`, the official curve over
    LLaVA-1.5-7B's 32 layers scaled to the model's depth (the raw index at `L = 32`)."""
    return [CURVE_HEIGHT / (1 + math.exp(min(k * (layer * CURVE_DEPTH / num_layers - (x0 + k)), 700.0)))
            for layer in range(1, num_layers)]


def _recycled_clusters(dropped: int) -> int:
    """Merged tokens made of `dropped` pruned tokens: a tenth (+1) of the best 30% (+1); none of none."""
    return _clusters(int(dropped * RECYCLE) + 1, CLUSTER) if dropped else 0


def autoprune_counts(rates: list[float], n_visual: int, v0: int) -> list[int]:
    """The visual tokens entering layers 0..L-1 and those left after layer L-1 ([L + 1]) of a sample with
    `n_visual` visual tokens that keeps `v0` after layer 0, then after each layer `l >= 1` keeps `min(ceil((v0 - 1)
    * min(1, rates[l - 1])), left)` and recycles the others into merged tokens (`cal_sum_tokens_no_membership`, msl
    1935-1961). The policy's real counts are these: a rate above 1 keeps every token there, as many."""
    counts = [n_visual, v0]
    for rate in rates:
        left = counts[-1]
        keep = min(kept_count(min(1.0, rate), v0 - 1), left)
        counts.append(keep + _recycled_clusters(left - keep))
    return counts


def autoprune_accounted(counts: list[int], accounting: str) -> int:
    """The visual tokens AutoPrune's budget counts of `autoprune_counts`: those entering layers 0..L-1
    (`"equivalent"`: dyvte's equivalent-tokens rule) or, as the official code, those entering layers 1..L-1 plus
    those left after layer L-1, which no layer computes (`"official"`, msl 1935-1961)."""
    return sum(counts[1:]) if accounting == "official" else sum(counts[:-1])


def autoprune_rates(k: float, n_visual: int, v0: int, target: float, num_layers: int, x0: float, accounting: str
                    ) -> tuple[list[float], float]:
    """(keep rate after each layer 1..L-1, the scale `s`): the curve of slope `k` scaled by the `s` in [0, 20]
    whose accounted tokens come closest to `L * target` (`generate_keep_percent_abs`, msl 1868-1933: a bisection
    of 200 halvings that stops at a difference below 0.01, here also once the halving stops moving, which changes
    nothing). With "official" accounting, an unscaled curve whose own count is within 1 of the goal is used as it
    is (msl 1879-1895)."""
    base = autoprune_curve(k, num_layers, x0)
    goal = num_layers * target
    if accounting == "official":
        total, previous, used = 0, 0, v0
        for layer, rate in zip(range(1, num_layers), base):
            used = int(v0 * rate)
            total += used * (layer - previous)
            previous = layer
        total += used * (num_layers - previous)
        if abs(total - goal) < 1:
            return base, 1.0
    low, high, best, closest, previous = 0.0, SCALE_HIGH, 1.0, math.inf, None
    for _ in range(SCALE_STEPS):
        middle = (low + high) / 2
        if middle == previous:  # the halving no longer moves: every later step repeats this one
            break
        previous = middle
        total = autoprune_accounted(autoprune_counts([middle * rate for rate in base], n_visual, v0), accounting)
        if abs(total - goal) < closest:
            closest, best = abs(total - goal), middle
            if closest < 0.01:
                break
        if total < goal:
            low = middle
        else:
            high = middle
    return [best * rate for rate in base], best


def mutual_information(probabilities: torch.Tensor, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """[b] AutoPrune's mutual information (bits) between each row's text queries and the `keys` slots ([b, n] bool)
    they attend to, summed over heads. Per head, `A` = the queries' attention to those keys [T, V] (rows of
    `probabilities` [b, heads, w, n]; filler queries all zero; not renormalised over the keys) read as p(key |
    query) with p(query) = 1/T (`queries` [b] = T): `sum p_xy log2(clamp(p_xy / (p_x p_y + 1e-6), 1e-6))`
    (`mutual_information`, msl 1741-1754). A row without queries has 0."""
    count = queries.clamp(min=1).to(probabilities.dtype)[:, None, None, None]
    joint = probabilities * keys[:, None, None, :] / count
    ratio = joint / (joint.sum(dim=2, keepdim=True) / count + 1e-6)
    return (joint * torch.log2(ratio.clamp(min=1e-6))).sum(dim=(1, 2, 3))


@dataclass
class AutoPruneSettings:
    """AutoPrune's settings (`autoprune.*`): the budget `share` (official `--target-token-num` as a share of each
    sample's visual tokens; 192 of 576), the slope's `k0` and `gamma` (`k = max(k0 - gamma * MI, 0)`), the curve's
    midpoint `x0` (in the official 32-layer units), the first cut's `first_keep` (`first_keep x` the target stay
    after layer 0) and what the budget counts (`accounting`: "equivalent", dyvte's rule, or "official")."""

    share: float = 192 / 576
    gamma: float = 0.2
    k0: float = 0.4
    x0: float = 14.9
    first_keep: float = 2.5
    accounting: str = "equivalent"

    def __post_init__(self):
        check_share("AutoPrune", "share", self.share, low_open=True)
        check_number("AutoPrune", "gamma", self.gamma, 0.0, 1e6)
        check_number("AutoPrune", "k0", self.k0, 0.0, 1e6)
        check_number("AutoPrune", "x0", self.x0, -1e6, 1e6)
        check_number("AutoPrune", "first_keep", self.first_keep, 0.0, 1e6, low_open=True)
        check_choice("AutoPrune", "accounting", self.accounting, AUTOPRUNE_ACCOUNTINGS)

    def first_cut(self, n_visual: int) -> int:
        """`v0`: the visual tokens a sample of `n_visual` keeps after layer 0, `min(int(first_keep * target), N)`."""
        return min(int(round(self.first_keep * self.share * n_visual, 9)), n_visual)

    def out_of_reach(self, num_layers: int, n_visual: int) -> str | None:
        """Why a sample of `n_visual` visual tokens cannot meet `share` on `num_layers` layers, whatever its mutual
        information (None when it can): below, keeping nothing after layer 1 still costs more (layer 0 computes all
        `N` tokens, layer 1 keeps `v0`); above, the steepest curve (`k = k0`, a sample without MI) at the largest
        scale (20) still prunes the last layers."""
        goal, v0, unit = num_layers * self.share * n_visual, self.first_cut(n_visual), num_layers * n_visual
        least = autoprune_accounted(autoprune_counts([0.0] * (num_layers - 1), n_visual, v0), self.accounting)
        if least > goal + 1e-9:
            return (f"layer 0 computes all {n_visual} visual tokens and layer 1 keeps first_keep = {self.first_keep:g}"
                    f" x the target ({v0}), so AutoPrune spends at least {least / unit:.4f} of them per layer on "
                    f"{num_layers} layers ({self.accounting} accounting), more than share = {self.share:.4f}")
        steepest = [SCALE_HIGH * rate for rate in autoprune_curve(self.k0, num_layers, self.x0)]
        most = autoprune_accounted(autoprune_counts(steepest, n_visual, v0), self.accounting)
        if most < goal - 1e-9:
            return (f"its steepest curve (k = k0 = {self.k0:g}, a sample without mutual information) prunes the last "
                    f"layers at any scale, so AutoPrune spends at most {most / unit:.4f} of the visual tokens per "
                    f"layer on {num_layers} layers, less than share = {self.share:.4f} (k0 = 0, a flat curve, "
                    "reaches every share)")
        return None

    def check_reach(self, num_layers: int, n_visual: int) -> None:
        """Refuse a `share` out of reach for images of `n_visual` visual tokens on `num_layers` layers."""
        why = self.out_of_reach(num_layers, n_visual)
        if why is not None:
            raise SettingError(f"AutoPrune: share = {self.share} is out of reach: {why}.", "share", self.share,
                               f"is out of AutoPrune's reach on this model ({n_visual} visual tokens per image, "
                               f"num_hidden_layers={num_layers}): {why}")


def autoprune_at_budget(settings: AutoPruneSettings, share: float, num_layers: int, n_visual: int
                        ) -> tuple[AutoPruneSettings | None, str]:
    """AutoPrune at the budget `share` (on images of `n_visual` visual tokens): its `share` itself, each sample's
    schedule meeting it in the settings' accounting (dyvte's own with "equivalent"); None when out of reach."""
    solved = replace(settings, share=share)
    why = solved.out_of_reach(num_layers, n_visual)
    if why is not None:
        return None, f"out of reach: {why}"
    return solved, f"share {share:.3f} ({settings.accounting} accounting)"


@dataclass
class AutoPruneDecisions:
    """What AutoPrune decided for each sample of the last prefill, by batch row (None where not decided: no visual
    tokens, or the sample left before layer 1 ranked): `v0` kept after layer 0, layer 0's and layer 1's mutual
    information `mi0` (over heads, per text query) and `mi1` (over heads), the slope `k`, the curve's scale `s`, and
    the keep rate after each layer 1..L-1 (`rates`)."""

    v0: list[int]
    mi0: list[float | None]
    mi1: list[float | None]
    k: list[float | None]
    scale: list[float | None]
    rates: list[list[float] | None]


class AutoPrune(ExitPolicy):
    """AutoPrune (Wang et al., "Each Complexity Deserves a Pruning Policy", NeurIPS 2025): the mutual information
    between the text and the visual tokens in the first layers sets, per sample, a logistic curve of how many visual
    tokens each later layer keeps, scaled so that the sample meets the budget; the pruned are partly recycled.

    Follows AutoLab-SAI-SJTU/AutoPrune@e4a9918 (`msl` = `llava/model/language_model/modelling_sparse_llama.py`; the
    official code prunes every layer's output, `msl` 243-405), for a sample with `N` visual tokens, budget `target =
    share * N` (official `--target-token-num` 64/128/192 of 576; gamma 0.2, k0 0.4, x0 14.9 in every released
    script, `eval/model_vqa_loader.py` 189-192) and `T` text tokens after its first visual token:
    1. After layer 0 (`msl` 273-313): `MI0 = sum_h MI(A_0[h, text, visual]) / T` (`mutual_information`, `msl`
       1741-1754), and each visual token's score is the vision tower's [CLS] attention to its patch in the
       feature layer, mean over the tower's heads (`llava/model/multimodal_encoder/clip_encoder.py` 36-47,
       `llava/model/llava_arch.py` 141-145), plus `0.3 * MI0 * mean_{h, text} A_0[h, text, j]`; the best `v0 =
       min(int(first_keep * target), N)` stay (`first_keep` 2.5).
    2. At layer 1 (`msl` 329-340): `MI1 = sum_h MI(A_1[h, text, visual])` on the `v0` kept tokens (not divided by
       T); slope `k = max(k0 - gamma * MI1, 0)` (`calculate_dynamic_k`, `msl` 2010-2027); keep rates
       `s * p(l)` of the curve `autoprune_curve` with the scale `s` of `autoprune_rates` (`msl` 1868-1961).
    3. After each layer `l >= 1` (`msl` 316-405; `score.py` 24-59): the visual tokens are ranked by `mean_{h,
       text} A_l[h, text, j]` of layer `l`'s own attention on the tokens it ran on; the best `min(ceil((v0 - 1) *
       s p(l)), left)` stay; of the others, the best 30% (+1) are clustered (DPC-KNN, `cluster_and_merge`) into a
       tenth (+1) of merged tokens (`msl` 359-393), which stay as visual tokens for the later cuts.
    `A_l`: layer `l`'s attention probabilities, recomputed for the text queries only (`adapter.query_probabilities`,
    so SDPA stays on; the official code computes every layer's full fp16 attention by hand).

    Where dyvte differs: batched with left padding, every quantity per sample (the official evaluation asserts batch
    size 1, `eval/model_vqa_loader.py` 76); the budget counts the visual tokens entering layers 0..L-1, dyvte's
    equivalent tokens, by default (`accounting="equivalent"`; "official" counts layers 1..L-1 and the tokens left
    after the last layer, `msl` 1935-1961, so the official "64 tokens" are about 81 equivalent tokens on
    LLaVA-1.5-7B); the budget is a share of each sample's tokens, not a count of a 576-token image; the curve is
    evaluated at `l * 32 / L`, the official 32-layer curve scaled to the model's depth (identical at 32 layers);
    kept and merged tokens keep prompt positions, a merged token in its cluster centre's slot (the official code
    appends merged tokens after the kept ones and renumbers positions, `msl` 306, 380-388, 715); MI in float32 from
    the model's probabilities (official: fp16); ties to the earlier position, equal DPC densities by index (official:
    `torch.topk` order and 1e-6 noise); the [CLS] scores of patches in the padding of LLaVA's expand-to-square
    images are not zeroed (`llava_arch.py` 155-157; the HF processor does not pad); a sample with several images
    ranks all its visual tokens as one pool, each by its own image's [CLS] attention (the official code takes one
    image); without text after the image, MI0 is 0 and the [CLS] attention alone ranks (the official divides by 0).

    Refuses (naming AutoPrune and the reason): towers without a [CLS] token (SigLIP) and families whose visual tokens
    are not the tower's patches one to one (LLaVA-NeXT, Qwen2-VL, InternVL: `adapter.tower_features`), decoders
    whose attention `query_probabilities` cannot recompute (`check_query_attention`), and a `share` out of reach
    for a sample (`AutoPruneSettings.out_of_reach`). The last prefill's per-sample decisions are in `decisions`.
    """

    name = "autoprune"

    def __init__(self, model, share: float = AutoPruneSettings.share, gamma: float = AutoPruneSettings.gamma,
                 k0: float = AutoPruneSettings.k0, x0: float = AutoPruneSettings.x0,
                 first_keep: float = AutoPruneSettings.first_keep, accounting: str = AutoPruneSettings.accounting):
        self.settings = AutoPruneSettings(share, gamma, k0, x0, first_keep, accounting)
        adapter = get_adapter(model)
        self.tower = adapter.tower_features("AutoPrune", self)
        if not self.tower.has_cls:
            raise ValueError(
                f"AutoPrune scores the visual tokens after layer 0 by the vision tower's [CLS] attention; this model's "
                f"tower ({self.tower.tower_name}) has no CLS token (the official code has no other score). On it use "
                "SparseVLM (text raters in the LLM), CDPruner or DivPrune."
            )
        adapter.check_query_attention("AutoPrune")
        self.num_layers = adapter.num_layers
        self.decisions: AutoPruneDecisions | None = None
        self._n_visual: list[int] = []  # per sample, this prefill
        self._text: torch.Tensor | None = None  # [B, T] the text after each sample's first visual token
        self._cls: torch.Tensor | None = None  # [B, T] each visual token's [CLS] attention in the tower
        self._scores: torch.Tensor | None = None  # [B, T] the last ranked layer's scores, for the next cut

    def per_sample(self) -> list[dict]:
        """The last prefill's decisions, one dict per sample (`v0`, `mi0`, `mi1`, `k`, `scale`), for reports."""
        decided = self.decisions
        if decided is None:
            return []
        return [{"v0": v0, "mi0": mi0, "mi1": mi1, "k": k, "scale": scale}
                for v0, mi0, mi1, k, scale in zip(decided.v0, decided.mi0, decided.mi1, decided.k, decided.scale)]

    def reset(self, state: PrefillState) -> None:
        if state.num_layers != self.num_layers:
            raise ValueError(f"AutoPrune was built for {self.num_layers} decoder layers; the model has "
                             f"{state.num_layers}.")
        read = self.tower.read(state.visual_mask)
        self._n_visual = state.visual_mask.sum(dim=1).tolist()
        for sample, n_visual in enumerate(self._n_visual):
            why = self.settings.out_of_reach(self.num_layers, n_visual) if n_visual else None
            if why is not None:
                raise ValueError(f"AutoPrune: sample {sample} has {n_visual} visual tokens, and share = "
                                 f"{self.settings.share} is out of reach for it: {why}.")
        batch = len(self._n_visual)
        self.decisions = AutoPruneDecisions([self.settings.first_cut(n) for n in self._n_visual], [None] * batch,
                                            [None] * batch, [None] * batch, [None] * batch, [None] * batch)
        self._text = state.adapter.text_mask(
            state.input_ids, state.attention_mask, state.visual_mask, "after_first_visual"
        )
        self._cls = torch.zeros(state.visual_mask.shape, device=state.visual_mask.device)
        if read is not None:
            probabilities, _ = self.tower.attention(read[0], cls_only=True)  # [images, heads, 1, 1 + P]
            self._cls[state.visual_mask] = probabilities[:, :, 0, 1:].mean(dim=1).flatten().float()
        self._scores = None

    def before_layer(self, layer_idx, sub, state) -> Decision:
        keep = hidden = None
        if layer_idx == 1:
            v0 = torch.tensor(self.decisions.v0, device=sub.rows.device)[sub.rows]
            keep = keep_most_attended(sub, state.visual_mask, self._scores, v0)
        elif layer_idx >= 2:
            keep, hidden = self._prune(layer_idx - 1, sub, state)
        if layer_idx < self.num_layers - 1:  # rank on the tokens this layer runs on, for the cut after it
            self._rank(layer_idx, sub if hidden is None else replace(sub, hidden=hidden), state, keep)
        return Decision(keep=keep, hidden=hidden)

    def _rank(self, layer_idx: int, sub: SubBatch, state: PrefillState, keep: torch.Tensor | None) -> None:
        """Score the visual tokens by layer `layer_idx`'s attention from the text (and, in layer 0, the tower's
        [CLS] attention and MI0); in layer 1, each sample's schedule from MI1."""
        adapter = state.adapter
        keys = sub.valid if keep is None else keep & sub.valid
        probabilities, _, used = adapter.query_probabilities(adapter.layers[layer_idx], sub, sub.slots_of(self._text),
                                                             keys)
        probabilities = probabilities.float()
        queries = used.sum(dim=1)
        attention = probabilities.sum(dim=2).mean(dim=1) / queries.clamp(min=1)[:, None]  # [b, n] mean of heads, text
        visual = sub.slots_of(state.visual_mask) & keys
        scores = attention
        if layer_idx <= 1:
            information = mutual_information(probabilities, visual, queries)
            if layer_idx == 0:
                mi0 = information / queries.clamp(min=1)
                scores = self._cls[sub.rows[:, None], sub.index.clamp(min=0)] + TEXT_WEIGHT * mi0[:, None] * attention
                for sample, value in zip(sub.rows.tolist(), mi0.tolist()):
                    self.decisions.mi0[sample] = value
            else:
                self._schedule(sub.rows.tolist(), information.tolist())
        self._scores = attention_by_position(scores, sub, state.visual_mask.shape)

    def _schedule(self, samples: list[int], mi1: list[float]) -> None:
        settings, decisions = self.settings, self.decisions
        for sample, information in zip(samples, mi1):
            n_visual = self._n_visual[sample]
            if not n_visual:
                continue
            k = max(settings.k0 - settings.gamma * information, 0.0)
            rates, scale = autoprune_rates(k, n_visual, decisions.v0[sample], settings.share * n_visual,
                                           self.num_layers, settings.x0, settings.accounting)
            decisions.mi1[sample], decisions.k[sample] = information, k
            decisions.rates[sample], decisions.scale[sample] = rates, scale

    def _prune(self, layer: int, sub: SubBatch, state: PrefillState
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The cut after layer `layer >= 1`: (keep, hidden), or (None, None) when no sample prunes there."""
        visual = sub.slots_of(state.visual_mask)
        cuts = []
        for row, sample in enumerate(sub.rows.tolist()):
            slots = visual[row].nonzero().squeeze(1)
            if len(slots):
                rate = self.decisions.rates[sample][layer - 1]
                cuts.append((row, sample, slots, min(kept_count(rate, self.decisions.v0[sample] - 1), len(slots))))
        if all(count == len(slots) for _, _, slots, count in cuts):
            return None, None
        keep, hidden = ~visual, sub.hidden.clone()
        for row, sample, slots, count in cuts:
            scores = self._scores[sample, sub.index[row, slots]]
            keep_and_recycle(sub, row, slots, scores, count, keep, hidden, RECYCLE, CLUSTER)
        return keep, hidden
