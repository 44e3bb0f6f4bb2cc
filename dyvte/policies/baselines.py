"""Token-reduction baselines as policies on the same engine as visual-token exit: random pruning, pooling before
the LLM (`Downsample`), token merging (`ToMe`), `VisionZip`, `PyramidDrop` and `DART`.

Every baseline is one policy: it composes with exit (`ToMe(...) + DynamicExit(heads)`), runs batched (each
sample prunes or merges its own tokens), leaves the KV cache of the tokens each layer really computed (so
`engine.generate` decodes against it and FLOPs are counted from it), and keeps every kept or merged token at the
position of a prompt slot: the engine never renumbers positions (text keeps its positions, as under exit). Where
a paper's code renumbers positions or places tokens differently, the class docstring says so.

Settings that are a count of tokens in a paper (64 of LLaVA-1.5's 576 image tokens) are shares here
(`keep_ratio = 64 / 576`), so one setting fits every image size; the docstrings give both.
"""

import itertools
import math
import zlib

import torch
import torch.nn.functional as F

from ..adapters import get_adapter
from ..engine import Decision, ExitPolicy, PrefillState, SubBatch
from .pruning import attention_by_position, keep_most_attended, kept_count


def _check_share(method: str, name: str, value: float, low_open: bool = False) -> None:
    if not (0.0 < value if low_open else 0.0 <= value) or value > 1.0:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{method}: {name} = {value} is outside {bracket}0, 1]: it is a share of each sample's visual tokens, "
            "and no method can keep more visual tokens than the image has."
        )


def _check_layer(method: str, layer: int, first: int = 1) -> None:
    if layer < first:
        raise ValueError(f"{method}: layer must be >= {first}, got {layer}.")


def _round_half_up(value: float) -> int:
    return math.floor(round(value, 9) + 0.5)


def _visual_slots(sub: SubBatch, visual_mask: torch.Tensor, row: int) -> torch.Tensor:
    """The slots of row `row` that hold visual tokens, in position order ([n_visual] long)."""
    return sub.slots_of(visual_mask)[row].nonzero().squeeze(1)


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

    def __init__(self, layer: int = 2, keep_ratio: float = 0.5, seed: int = 0):
        _check_layer("RandomPrune", layer, first=0)
        _check_share("RandomPrune", "keep_ratio", keep_ratio)
        if not 0 <= seed < 2**31:
            raise ValueError(f"RandomPrune: seed must be in [0, 2**31), got {seed}.")
        self.layer, self.keep_ratio, self.seed = layer, keep_ratio, seed

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
        if factor is not None and keep_ratio is not None:
            raise ValueError("Downsample: give either factor (pooling window side) or keep_ratio, not both.")
        if factor is None and keep_ratio is None:
            factor = 2
        if factor is not None and factor < 1:
            raise ValueError(f"Downsample: factor must be >= 1, got {factor}.")
        if keep_ratio is not None:
            _check_share("Downsample", "keep_ratio", keep_ratio, low_open=True)
        self.factor, self.keep_ratio = factor, keep_ratio

    def output_grid(self, side: int) -> tuple[int, int]:
        """(rows, columns) of the pooled grid of an image of `side x side` tokens."""
        if self.factor is not None:
            return -(-side // self.factor), -(-side // self.factor)
        rows = min(side, max(1, _round_half_up(side * math.sqrt(self.keep_ratio))))
        return rows, min(side, max(1, _round_half_up(self.keep_ratio * side * side / rows)))

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


class ToMe(ExitPolicy):
    """ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) on the decoder's visual tokens, the
    merging baseline of DyVTE's Table 4 (there at about 40% fewer LM TFLOPs on LLaVA-1.5-7B; the DyVTE paper gives
    no other setting).

    ToMe merges `r` tokens in every block; here, before every layer `i >= first_layer`, each sample merges
    `round(r * N)` visual tokens (`N`: its visual tokens in the prompt; the default `r = 16/576` merges 16 of a
    LLaVA-1.5 image's 576 per layer, about 45% fewer visual tokens per layer on average over 32 layers). Bipartite
    soft matching: the sample's remaining visual tokens, in position order, alternate between set A (even) and B
    (odd); each A token's match is its most similar B token by the cosine similarity of layer `i`'s keys (its own
    `input_layernorm` and `k_proj` on its input, before rotary, averaged over key heads: ToMe's metric); the
    `round(r * N)` A tokens with the most similar matches (at most all of A) merge into their matches. A merged
    token is the size-weighted mean of what it holds (`size`: how many prompt tokens it stands for), so later
    merges weight it by its size. It stays in its B token's slot and position; the merged A tokens leave.

    Not implemented: ToMe's proportional attention (`log size` added to the attention logits of merged keys):
    the engine hands the stock decoder layers a plain causal mask, so a merged token is attended as one token.
    """

    name = "tome"

    def __init__(self, r: float = 16 / 576, first_layer: int = 0):
        if not 0.0 <= r <= 0.5:
            raise ValueError(
                f"ToMe: r = {r} is outside [0, 0.5]: it is the share of a sample's visual tokens merged per layer, "
                "and bipartite matching merges at most half of them."
            )
        _check_layer("ToMe", first_layer, first=0)
        self.r, self.first_layer = r, first_layer
        self._size: torch.Tensor | None = None  # [B, T] prompt tokens each slot stands for, this prefill

    def reset(self, state: PrefillState) -> None:
        self._size = torch.ones(state.input_ids.shape, device=state.input_ids.device)

    def before_layer(self, layer_idx, sub, state) -> Decision:
        if layer_idx < self.first_layer or self.r == 0.0:
            return Decision()
        visual = sub.slots_of(state.visual_mask)
        prompt_visual = state.visual_mask.sum(dim=1)[sub.rows].tolist()
        row, slot = visual.nonzero(as_tuple=True)
        keys = state.adapter.layer_keys(state.adapter.layers[layer_idx], sub.hidden[row, slot][None])[0]
        metric = keys.new_zeros(*visual.shape, keys.shape[-1])
        metric[row, slot] = keys.mean(dim=1)
        metric = F.normalize(metric, dim=-1)
        hidden, keep = sub.hidden.clone(), torch.ones_like(visual)
        for b in range(len(sub)):
            slots = visual[b].nonzero().squeeze(1)
            a, bset = slots[0::2], slots[1::2]
            merged = min(_round_half_up(self.r * prompt_visual[b]), len(a) if len(bset) else 0)
            if merged == 0:
                continue
            similarity = metric[b, a] @ metric[b, bset].T  # [|A|, |B|]
            best, match = similarity.max(dim=1)
            source = best.argsort(descending=True, stable=True)[:merged]
            positions = sub.index[b]
            size = self._size[sub.rows[b], positions.clamp(min=0)]
            weight = size[a[source], None].to(hidden.dtype)
            total = (hidden[b, bset] * size[bset, None]).index_add(
                0, match[source], hidden[b, a[source]] * weight
            )
            new_size = size[bset].index_add(0, match[source], size[a[source]])
            hidden[b, bset] = total / new_size[:, None].to(hidden.dtype)
            self._size[sub.rows[b], positions[bset]] = new_size
            keep[b, a[source]] = False
        return Decision(keep=keep, hidden=hidden)


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

    def __init__(self, num_layers: int, ratio: float = 0.5, layers: list[int] | None = None):
        _check_share("PyramidDrop", "ratio", ratio)
        if layers is None:  # the paper's boundaries scaled to the depth; fewer stages where they coincide
            scaled = {_round_half_up(num_layers * stage / 32) for stage in (8, 16, 24)}
            layers = sorted(layer for layer in scaled if 1 <= layer < num_layers)
        layers = [int(layer) for layer in layers]
        increasing = all(a < b for a, b in itertools.pairwise(layers))
        if not layers or not increasing or not 1 <= layers[0] <= layers[-1] < num_layers:
            raise ValueError(
                f"PyramidDrop: layers {layers} must be increasing stage boundaries in [1, {num_layers - 1}] for "
                f"{num_layers} decoder layers."
            )
        self.num_layers, self.ratio, self.layers = num_layers, ratio, layers

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

    def __init__(self, layer: int = 2, keep_ratio: float = 128 / 576, image_pivots: int = 4, text_pivots: int = 4):
        _check_layer("DART", layer)
        _check_share("DART", "keep_ratio", keep_ratio)
        if image_pivots < 0 or text_pivots < 0 or image_pivots + text_pivots == 0:
            raise ValueError(
                f"DART needs pivots: image_pivots = {image_pivots} and text_pivots = {text_pivots} must be >= 0 and "
                "not both 0."
            )
        self.layer, self.keep_ratio = layer, keep_ratio
        self.image_pivots, self.text_pivots = image_pivots, text_pivots
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

    def __init__(self, model, keep_ratio: float = 64 / 576):
        _check_share("VisionZip", "keep_ratio", keep_ratio, low_open=True)
        self.keep_ratio = keep_ratio
        self.tower = get_adapter(model).tower_features("VisionZip", self)
        self.has_cls = self.tower.has_cls
        self._patches = 0  # tokens per image, this prefill
        self._kept: torch.Tensor | None = None  # [images, keep] patch index each kept token sits at
        self._features: torch.Tensor | None = None  # [images, keep, d] their projected features

    def token_counts(self, patches: int) -> tuple[int, int]:
        """(dominant, contextual) tokens kept of an image of `patches` tokens."""
        keep = min(patches, max(1, _round_half_up(self.keep_ratio * patches)))
        contextual = _round_half_up(keep * 10 / 64)
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
