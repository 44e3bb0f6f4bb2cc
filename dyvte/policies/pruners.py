"""In-LLM pruners: visual tokens leave before (or after) chosen decoder layers, a few at a time (`FastV`,
`RandomPrune`, `PyramidDrop`, `DART`, `SparseVLM`, which also recycles part of the pruned tokens into merged ones).

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

from ..engine import Decision, ExitPolicy, PrefillState, SubBatch
from .settings import SettingError, check_integer, check_layers, check_share, check_shares
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
