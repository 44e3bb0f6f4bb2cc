"""Input selectors: which visual tokens enter the LLM, chosen before decoder layer 0 (`Downsample`, `VisionZip`,
`VisPruner`, `CDPruner`, `DivPrune`; DivPrune may also prune before a later layer).

Each is one policy on the same engine as exit: it composes with exit (`CDPruner(...) + DynamicExit(heads)`), runs
batched (each sample selects its own tokens), works with SDPA (the attention a method reads is recomputed for its
queries only) and leaves the KV cache of the tokens each layer really computed. Kept, pooled and merged tokens stay
at the position of a prompt slot, as everywhere in dyvte; where an official implementation renumbers positions or
places tokens elsewhere, the class docstring says so, as it says which paper (and which file and lines of the
official code) the class follows. The methods that read the vision tower (`Downsample`'s patch grid, `VisionZip`
and `VisPruner`'s tower attention) get it from the family adapter (`patch_grid`, `tower_features`).

Settings that are a count of tokens in a paper (64 of LLaVA-1.5's 576) are shares here (`keep_ratio = 64/576`),
so one setting fits every image size.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..engine import Decision, ExitPolicy, PrefillState, SubBatch
from .settings import SettingError, check_flag, check_integer, check_share
from .tokens import keep_ratio_after, round_half_up, rounded_count


def _images_of(method: str, sub: SubBatch, visual_mask: torch.Tensor, tokens_per_image: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every visual slot of `sub` in batch order (`row`, `slot`, [V] each); image `k` holds entries
    `k * tokens_per_image ...` of them. Fails naming the sample whose visual tokens are not whole images."""
    visual = sub.slots_of(visual_mask)
    counts = visual.sum(dim=1)
    partial = (counts % tokens_per_image).nonzero().squeeze(1).tolist()
    if partial:
        raise ValueError(
            f"{method}: sample {int(sub.rows[partial[0]])} has {int(counts[partial[0]])} visual tokens, not whole "
            f"images of {tokens_per_image} tokens (was it pruned before {method} ran?)."
        )
    return visual.nonzero(as_tuple=True)


@dataclass
class DownsampleSettings:
    """Downsample's settings (`downsample.*`): the pooling window's side `factor` (2: 2x2, 576 -> 144 tokens), or
    the share of each image's tokens to pool to, `keep_ratio` (with `factor` None)."""

    factor: int | None = 2
    keep_ratio: float | None = None

    def __post_init__(self):
        check_integer("Downsample", "factor", self.factor, 1, optional=True)
        check_share("Downsample", "keep_ratio", self.keep_ratio, low_open=True, optional=True)
        if self.factor is not None and self.keep_ratio is not None:
            raise SettingError("Downsample: give either factor (pooling window side) or keep_ratio, not both.",
                               "keep_ratio", self.keep_ratio, "set downsample.factor=null to pool to a keep_ratio")


def downsample_at_budget(settings: DownsampleSettings, share: float, num_layers: int, n_visual: int
                         ) -> tuple[DownsampleSettings, str]:
    """Downsample at the budget `share`: pooling to `keep_ratio = share` (pooling before the LLM costs its share)."""
    return replace(settings, factor=None, keep_ratio=share), f"keep {share:.3f} (pooled grid)"


def keep_share_at_budget(settings, share: float, num_layers: int, n_visual: int):
    """A selection before the LLM (VisionZip, VisPruner, CDPruner) at the budget `share`: `keep_ratio = share`."""
    return replace(settings, keep_ratio=share), f"keep {share:.3f}"


class Downsample(ExitPolicy):
    """Fewer visual tokens before the LLM by average pooling of the projector output, as LLaVA-style models pool
    their token grid (2x2 pooling: 576 -> 144 tokens); with random pruning, the baseline recent benchmarks of
    token reduction found hard to beat (Wen et al., 2025).

    `Downsample(factor=f)` (default 2) pools each image's `s x s` grid of projected tokens to `ceil(s/f) x ceil(s/f)`;
    `Downsample(keep_ratio=r)` to `h x w` with `h = round(s * sqrt(r))`, `w = round(r * s * s / h)` (about `r` of
    the tokens). Windows are those of `torch.nn.functional.adaptive_avg_pool2d` (`f x f` when `f` divides `s`).
    Before layer 0, each pooled token is written into the slot of its window's top-left token, at that token's
    position; the window's other tokens leave. Text keeps its positions, so the text after the image does not move
    closer as it would in a model trained on the pooled grid.
    Families: LLaVA-1.5 (`llava`, a CLIP or SigLIP tower, one grid per image); others fail naming the reason.
    """

    name = "downsample"

    def __init__(self, factor: int | None = None, keep_ratio: float | None = None):
        if factor is None and keep_ratio is None:
            factor = DownsampleSettings.factor
        settings = DownsampleSettings(factor, keep_ratio)
        self.factor, self.keep_ratio = settings.factor, settings.keep_ratio

    def output_grid(self, side: int) -> tuple[int, int]:
        """(rows, columns) of the pooled grid of an image of `side x side` tokens."""
        if self.factor is not None:
            return -(-side // self.factor), -(-side // self.factor)
        rows = min(side, max(1, round_half_up(side * math.sqrt(self.keep_ratio))))
        return rows, min(side, max(1, round_half_up(self.keep_ratio * side * side / rows)))

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx != 0:
            return Decision()
        side, _ = state.adapter.patch_grid("Downsample")
        rows, columns = self.output_grid(side)
        row, slot = _images_of("Downsample", sub, state.visual_mask, side * side)
        width = sub.hidden.shape[-1]
        grids = sub.hidden[row, slot].view(-1, side, side, width).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grids, (rows, columns)).permute(0, 2, 3, 1).reshape(-1, width)
        top = torch.arange(rows, device=row.device) * side // rows
        left = torch.arange(columns, device=row.device) * side // columns
        corners = (top[:, None] * side + left[None, :]).flatten()  # each window's top-left token in its image
        images = row.numel() // (side * side)
        chosen = (torch.arange(images, device=row.device)[:, None] * side * side + corners[None]).flatten()
        hidden = sub.hidden.clone()
        hidden[row[chosen], slot[chosen]] = pooled.to(hidden.dtype)
        keep = ~sub.slots_of(state.visual_mask)
        keep[row[chosen], slot[chosen]] = True
        return Decision(keep=keep, hidden=hidden)


@dataclass
class VisionZipSettings:
    """VisionZip's settings (`visionzip.*`): the share of each image's tokens kept (64 of 576: 54 dominant + 10
    contextual)."""

    keep_ratio: float = 64 / 576

    def __post_init__(self):
        check_share("VisionZip", "keep_ratio", self.keep_ratio, low_open=True)


class VisionZip(ExitPolicy):
    """VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR
    2025): before the LLM, each image keeps its dominant tokens and a few merged contextual tokens.

    Paper defaults for LLaVA-1.5: 64 tokens of 576 (54 dominant + 10 contextual), also 128 (108 + 20) and 192
    (162 + 30); here `keep_ratio = 64/576` keeps `round(keep_ratio * P)` of an image's `P` tokens, split in the
    paper's 54 : 10 proportion (`contextual = round(keep * 10/64)`). On the vision tower's feature layer (the one
    whose output the projector reads, `config.vision_feature_layer`): dominant tokens are the patches with the
    most attention from the CLS token (summed over heads), or, for a tower without CLS (SigLIP), with the most
    attention received on average over all queries. The other patches are the contextual candidates: every
    `len // contextual`-th of them (in patch order) is a target, each other candidate joins its most similar
    target (cosine of the layer's keys averaged over heads), and a contextual token is its target plus the mean
    of the candidates that joined it (the paper's code). Merging happens on the tower's features; the model's own
    projector then projects the kept tokens.

    The tower's attention is recomputed for the needed queries from that layer's own `layer_norm1`, `q_proj`
    and `k_proj`, so the tower keeps running with SDPA. Its input and output are read by a forward hook on that
    layer, registered while this policy lives (removed when it is garbage-collected); the tower runs once per
    prefill, as without VisionZip. Positions: the paper's code feeds dominant then contextual tokens at consecutive
    positions; here a dominant token stays in its patch's slot and a contextual token takes its target's slot.
    Not kept: the CLS token (the paper's code keeps it as a 65th token; LLaVA's prompt has no slot for it).
    Families: LLaVA-1.5 (`llava`, a CLIP or SigLIP tower, one grid per image); others fail naming the reason.
    """

    name = "visionzip"

    def __init__(self, model, keep_ratio: float = VisionZipSettings.keep_ratio):
        self.keep_ratio = VisionZipSettings(keep_ratio).keep_ratio
        self.tower = get_adapter(model).tower_features("VisionZip", self)
        self.has_cls = self.tower.has_cls
        self._patches = 0  # tokens per image, this prefill
        self._kept: torch.Tensor | None = None  # [images, keep] patch index each kept token sits at
        self._features: torch.Tensor | None = None  # [images, keep, d] their projected features

    def token_counts(self, patches: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of an image of `patches` tokens."""
        keep = rounded_count(self.keep_ratio, patches)
        contextual = round_half_up(keep * 10 / 64)
        return keep - contextual, contextual

    def reset(self, state: PrefillState) -> None:
        read = self.tower.read(state.visual_mask)
        if read is None:
            self._kept = self._features = None
            return
        inputs, outputs = read
        self._patches = outputs.shape[1] - int(self.has_cls)
        probabilities, keys = self.tower.attention(inputs, cls_only=self.has_cls)  # [i, h, q, length]
        images = inputs.shape[0]
        first = int(self.has_cls)
        received = probabilities[:, :, 0, first:].sum(dim=1) if self.has_cls else probabilities.mean(dim=(1, 2))
        metric = F.normalize(keys.mean(dim=1)[:, first:], dim=-1)  # [images, patches, head_dim]
        features = outputs[:, first:]
        dominant, contextual = self.token_counts(features.shape[1])
        kept, selected = [], []
        for image in range(images):
            top = received[image].topk(dominant).indices.sort().values
            rest = torch.ones(features.shape[1], dtype=torch.bool, device=top.device)
            rest[top] = False
            rest = rest.nonzero().squeeze(1)
            targets, merged = self._contextual(metric[image, rest], features[image, rest], contextual)
            kept.append(torch.cat([top, rest[targets]]))
            selected.append(torch.cat([features[image, top], merged]))
        self._kept = torch.stack(kept)
        self._features = self.tower.project(torch.stack(selected))

    @staticmethod
    def _contextual(metric: torch.Tensor, features: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """VisionZip's contextual tokens from the candidates' unit keys `metric` [m, k] and `features` [m, d]: the
        target indices [count] and the merged tokens [count, d]."""
        if count == 0:
            return torch.zeros(0, dtype=torch.long, device=metric.device), features[:0]
        targets = torch.arange(0, metric.shape[0], max(1, metric.shape[0] // count), device=metric.device)[:count]
        others = torch.ones(metric.shape[0], dtype=torch.bool, device=metric.device)
        others[targets] = False
        joins = (metric[others] @ metric[targets].T).argmax(dim=1)  # [m - count] target each candidate joins
        totals = torch.zeros(count, features.shape[1], dtype=features.dtype, device=features.device)
        totals.index_add_(0, joins, features[others])
        counts = torch.bincount(joins, minlength=count).clamp(min=1).to(features.dtype)
        return targets, features[targets] + totals / counts[:, None]

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx != 0 or self._kept is None:
            return Decision()
        row, slot = _images_of("VisionZip", sub, state.visual_mask, self._patches)
        images = self._kept.shape[0]
        chosen = (torch.arange(images, device=row.device)[:, None] * self._patches + self._kept).flatten()
        hidden = sub.hidden.clone()
        hidden[row[chosen], slot[chosen]] = self._features.reshape(-1, hidden.shape[-1]).to(hidden.dtype)
        keep = ~sub.slots_of(state.visual_mask)
        keep[row[chosen], slot[chosen]] = True
        return Decision(keep=keep, hidden=hidden)


@dataclass
class VisPrunerSettings:
    """VisPruner's settings (`vispruner.*`): the share of each image's tokens kept (64 of 576), the share of those
    chosen by [CLS] attention (`important_ratio`), and the near-duplicates removed per round (`step`)."""

    keep_ratio: float = 64 / 576
    important_ratio: float = 0.5
    step: int = 8

    def __post_init__(self):
        check_share("VisPruner", "keep_ratio", self.keep_ratio, low_open=True)
        check_share("VisPruner", "important_ratio", self.important_ratio)
        check_integer("VisPruner", "step", self.step, 1, why="A tokens removed per round")


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

    def __init__(self, model, keep_ratio: float = VisPrunerSettings.keep_ratio,
                 important_ratio: float = VisPrunerSettings.important_ratio, step: int = VisPrunerSettings.step):
        settings = VisPrunerSettings(keep_ratio, important_ratio, step)
        self.tower = get_adapter(model).tower_features("VisPruner", self)
        if not self.tower.has_cls:
            raise ValueError(
                f"VisPruner ranks important tokens by the [CLS] token's attention in the vision tower; this model's "
                f"tower ({self.tower.tower_name}) has no CLS token. On it use CDPruner or DivPrune "
                "(no tower attention needed) or VisionZip (ranks by the attention patches receive)."
            )
        self.keep_ratio, self.important_ratio, self.step = settings.keep_ratio, settings.important_ratio, settings.step
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
        count = rounded_count(self.keep_ratio, self._patches)
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
        first = torch.arange(images, device=row.device)[:, None] * self._patches
        chosen = (first + self._kept.to(row.device)).flatten()
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


@dataclass
class CDPrunerSettings:
    """CDPruner's settings (`cdpruner.*`): the share of each sample's visual tokens kept (64 of 576), and whether
    the relevance is negated (the official code's choice for CLIP's text tower)."""

    keep_ratio: float = 64 / 576
    negate_relevance: bool = False

    def __post_init__(self):
        check_share("CDPruner", "keep_ratio", self.keep_ratio, low_open=True)
        check_flag("CDPruner", "negate_relevance", self.negate_relevance)


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

    def __init__(self, keep_ratio: float = CDPrunerSettings.keep_ratio,
                 negate_relevance: bool = CDPrunerSettings.negate_relevance):
        settings = CDPrunerSettings(keep_ratio, negate_relevance)
        self.keep_ratio, self.negate_relevance = settings.keep_ratio, settings.negate_relevance
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
            keep[row, slots[greedy_map(kernel, rounded_count(self.keep_ratio, len(slots)))]] = True
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


@dataclass
class DivPruneSettings:
    """DivPrune's settings (`divprune.*`): the share of each sample's visual tokens kept (the paper's 0.098, 56 of
    576), before decoder layer `layer` (0: the LLM's input)."""

    keep_ratio: float = 0.098
    layer: int = 0

    def __post_init__(self):
        check_share("DivPrune", "keep_ratio", self.keep_ratio, low_open=True)
        check_integer("DivPrune", "layer", self.layer, 0)


def divprune_at_budget(settings: DivPruneSettings, share: float, num_layers: int, n_visual: int
                       ) -> tuple[DivPruneSettings | None, str]:
    """DivPrune at the budget `share`: its keep ratio before its layer (the share itself before the LLM)."""
    layer = settings.layer
    ratio = share if layer == 0 else keep_ratio_after(share, layer, num_layers)
    if ratio is None or ratio <= 0:
        return None, f"out of reach: pruning before layer {layer} costs {layer}/{num_layers} of the tokens alone"
    return replace(settings, keep_ratio=ratio), f"layer {layer}, keep {ratio:.3f}"


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

    def __init__(self, keep_ratio: float = DivPruneSettings.keep_ratio, layer: int = DivPruneSettings.layer):
        settings = DivPruneSettings(keep_ratio, layer)
        self.keep_ratio, self.layer = settings.keep_ratio, settings.layer

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
