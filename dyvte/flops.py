"""One FLOPs convention for every report in dyvte.

Convention: 2 FLOPs per multiply-add. Per decoder layer with `n` query tokens attending `pairs` (query, key)
pairs in total:
    attention projections  2·n·(d·d_q + 2·d·d_kv + d_q·d)
    scores and values      4·pairs·d_q              (causal prefill: pairs = n(n+1)/2, the real lower triangle)
    MLP (gated, SwiGLU)    2·n·3·d·m
plus `lm_head` (2·d·V) for each position whose logits are computed.

The vision side (`vision_flops`) follows the same convention, counted from the vision config and the patches the
processor really produced: the patch embedding (2·patches·(channels·patch area)·D), every encoder layer the tower
runs (projections 2·n·4·D², scores and values 4·pairs·D with the pairs its attention really computes: all
`n²` of a tile or frame, Qwen2.5-VL's windows in its windowed layers; MLP 2·n·2·D·M, gated 2·n·3·D·M), SigLIP's
attention-pooling head where the config enables it, and the multimodal projector or patch merger on the tokens it
really receives. The vision cost of a sample does not depend on its exit layer.

Left out everywhere: norms, activations, biases, rotary and position embeddings, softmax, residual adds, layer
scales, and the data movement of unpadding, pixel shuffle, pooling and newline tokens (all O(n·d), below 1% at any
real width).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that determine a decoder's FLOPs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    q_dim: int
    kv_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "DecoderShape":
        """From an MLLM config or its text config."""
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            q_dim=text.num_attention_heads * head_dim,
            kv_dim=kv_heads * head_dim,
            vocab_size=text.vocab_size,
        )


def _shape(config) -> DecoderShape:
    return config if isinstance(config, DecoderShape) else DecoderShape.from_config(config)


def layer_flops(config, n_queries: int, n_pairs: int) -> int:
    """One decoder layer: `n_queries` tokens computed, attending `n_pairs` (query, key) pairs in total."""
    s = _shape(config)
    d = s.hidden_size
    projections = 2 * n_queries * (d * s.q_dim + 2 * d * s.kv_dim + s.q_dim * d)
    attention = 4 * n_pairs * s.q_dim
    mlp = 2 * n_queries * 3 * d * s.intermediate_size
    return projections + attention + mlp


def lm_head_flops(config, n_positions: int = 1) -> int:
    s = _shape(config)
    return 2 * n_positions * s.hidden_size * s.vocab_size


def _check(s: DecoderShape, n_text: int, n_visual: int, exit_layer: int | None) -> int:
    exit_layer = s.num_layers if exit_layer is None else exit_layer
    if not 0 <= exit_layer <= s.num_layers:
        raise ValueError(f"exit_layer {exit_layer} is outside [0, {s.num_layers}].")
    if n_text < 0 or n_visual < 0:
        raise ValueError(f"token counts must be non-negative, got n_text={n_text}, n_visual={n_visual}.")
    return exit_layer


def prefill_flops(config, n_text: int, n_visual: int, exit_layer: int | None = None, logits_positions: int = 1) -> int:
    """LM FLOPs of one sample's prefill: layers before `exit_layer` see all tokens, the rest only the text."""
    s = _shape(config)
    exit_layer = _check(s, n_text, n_visual, exit_layer)
    tokens = [n_text + n_visual] * exit_layer + [n_text] * (s.num_layers - exit_layer)
    return prefill_flops_from_counts(s, tokens, logits_positions)


def prefill_flops_from_counts(config, tokens_per_layer: list[int], logits_positions: int = 1) -> int:
    """LM FLOPs of one sample's prefill given the tokens each layer really computed (any pruning policy)."""
    s = _shape(config)
    if len(tokens_per_layer) != s.num_layers:
        raise ValueError(f"need one token count per layer ({s.num_layers}), got {len(tokens_per_layer)}.")
    body = sum(layer_flops(s, n, n * (n + 1) // 2) for n in tokens_per_layer)
    return body + lm_head_flops(s, logits_positions)


def generated_prefill_flops(config, out, attention_mask) -> tuple[list[int], list[int]]:
    """Per sample of a `generate` output with its cache (`out.sequences` [B, T], `out.cache`) for prompts
    with `attention_mask` [B, prompt length]: the LM prefill FLOPs the policy spent (from the keys each layer holds,
    less the generated tokens fed back) and the full model's on the same prompt."""
    s = _shape(config)
    fed_back = max(out.sequences.shape[1] - attention_mask.shape[1] - 1, 0)  # the last new token never enters it
    keys = [out.cache.num_keys(layer) for layer in range(s.num_layers)]
    prompt_tokens = attention_mask.sum(dim=1).tolist()
    spent = [prefill_flops_from_counts(s, [int(k[i]) - fed_back for k in keys]) for i in range(len(prompt_tokens))]
    full = [prefill_flops_from_counts(s, [n] * s.num_layers) for n in prompt_tokens]
    return spent, full


def decode_step_flops(
    config, n_text: int, n_visual: int, exit_layer: int | None = None, n_generated: int = 0
) -> int:
    """LM FLOPs of the decode step that produces token `n_generated + 1`, with the KV cache of the prefill."""
    s = _shape(config)
    exit_layer = _check(s, n_text, n_visual, exit_layer)
    keys_full = n_text + n_visual + n_generated + 1
    keys_text = n_text + n_generated + 1
    return (
        exit_layer * layer_flops(s, 1, keys_full)
        + (s.num_layers - exit_layer) * layer_flops(s, 1, keys_text)
        + lm_head_flops(s, 1)
    )


def prefill_saving(config, n_text: int, n_visual: int, exit_layer: int) -> float:
    """Fraction of the full model's prefill FLOPs saved by exiting at `exit_layer`."""
    full = prefill_flops(config, n_text, n_visual, None)
    return 1.0 - prefill_flops(config, n_text, n_visual, exit_layer) / full


def kv_cache_bytes(config, n_text: int, n_visual: int, exit_layer: int | None = None, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values one sample holds after its prefill."""
    s = _shape(config)
    exit_layer = _check(s, n_text, n_visual, exit_layer)
    tokens = exit_layer * (n_text + n_visual) + (s.num_layers - exit_layer) * n_text
    return 2 * tokens * s.kv_dim * bytes_per_value


# --- vision towers ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderShape:
    """The sizes that determine a ViT-style encoder layer's FLOPs (queries, keys, values and output all D wide)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    gated_mlp: bool = False


def encoder_layer_flops(shape: EncoderShape, n_tokens: int, n_pairs: int) -> int:
    """One encoder layer: `n_tokens` tokens, `n_pairs` (query, key) pairs of bidirectional attention."""
    d, m = shape.hidden_size, shape.intermediate_size
    projections = 2 * n_tokens * 4 * d * d
    attention = 4 * n_pairs * d
    mlp = 2 * n_tokens * (3 if shape.gated_mlp else 2) * d * m
    return projections + attention + mlp


def mlp_projector_flops(n_tokens: int, in_dim: int, hidden_dim: int, out_dim: int) -> int:
    """`Linear(in, hidden) -> act -> Linear(hidden, out)` on `n_tokens` tokens (LLaVA's projector, Qwen's merger,
    InternVL's projector)."""
    return 2 * n_tokens * (in_dim * hidden_dim + hidden_dim * out_dim)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _vit_tile_flops(vision_config, height: int, width: int) -> tuple[int, int]:
    """A CLIP / SigLIP / InternViT tower on one `height` x `width` tile: (FLOPs, tokens it outputs)."""
    patch_h, patch_w = _pair(vision_config.patch_size)
    patches = (height // patch_h) * (width // patch_w)
    model_type = vision_config.model_type
    if model_type not in ("clip_vision_model", "siglip_vision_model", "internvl_vision"):
        raise ValueError(
            f"no FLOPs count for the vision tower {model_type!r}; dyvte counts clip_vision_model, "
            f"siglip_vision_model and internvl_vision."
        )
    tokens = patches + (model_type != "siglip_vision_model")  # CLIP and InternViT prepend a CLS token
    d = vision_config.hidden_size
    shape = EncoderShape(d, vision_config.intermediate_size, vision_config.num_hidden_layers)
    total = 2 * patches * vision_config.num_channels * patch_h * patch_w * d
    total += shape.num_layers * encoder_layer_flops(shape, tokens, tokens * tokens)
    if model_type == "siglip_vision_model" and vision_config.vision_use_head:
        # attention pooling: one probe query over all tokens, then the MLP on that one vector
        total += 2 * d * d + 2 * 2 * tokens * d * d + 4 * tokens * d + 2 * d * d + 2 * 2 * d * shape.intermediate_size
    return total, tokens


def _llava_tile_flops(config, height: int, width: int) -> tuple[int, int]:
    """One tile through a LLaVA-family tower and projector: (FLOPs, visual tokens before unpadding or pooling)."""
    tower, tokens = _vit_tile_flops(config.vision_config, height, width)
    selected = tokens - (config.vision_feature_select_strategy == "default")  # "default" drops the first token
    layers = config.vision_feature_layer
    width_in = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
    text_hidden = config.get_text_config(decoder=True).hidden_size
    return tower + mlp_projector_flops(selected, width_in, text_hidden, text_hidden), selected


def _runs(mask: torch.Tensor) -> list[int]:
    """Contiguous runs of True per row of `mask` [B, T]: one per image or video in every family's prompts."""
    starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    return starts.sum(dim=1).tolist()


def _owners(counts: list[int], n_items: int, what: str) -> list[int]:
    """The sample of each of `n_items` images (batch order) when sample `s` holds `counts[s]` of them."""
    if sum(counts) != n_items:
        raise ValueError(
            f"the prompts hold {sum(counts)} {what} placeholder spans but {n_items} {what}s were given; "
            f"dyvte cannot tell which sample each {what} belongs to (adjacent {what} placeholders without text "
            f"between them look like one span)."
        )
    return [sample for sample, count in enumerate(counts) for _ in range(count)]


def _sum_by_owner(costs: list[int], owners: list[int], batch: int) -> list[int]:
    out = [0] * batch
    for cost, owner in zip(costs, owners):
        out[owner] += cost
    return out


def _split_by_tokens(costs: list[int], tokens: list[int], sample_tokens: list[int], what: str) -> list[int]:
    """Sum `costs` (one per image) into samples by placeholder tokens: images are consumed in batch order until
    each sample's placeholder count is reached."""
    out, index = [], 0
    for need in sample_tokens:
        spent = 0
        while need > 0 and index < len(costs):
            spent += costs[index]
            need -= tokens[index]
            index += 1
        if need != 0:
            raise ValueError(
                f"the {what} placeholder tokens of the prompts do not match the {what} inputs (grid or pixel "
                f"shape); build the batch with the model's processor."
            )
        out.append(spent)
    if index != len(costs):
        raise ValueError(f"{len(costs) - index} {what}(s) have no placeholder tokens in any prompt.")
    return out


def _llava_flops(config, input_ids, pixel_values=None, image_sizes=None, batch_num_images=None,
                 pixel_values_videos=None, **unused) -> list[int]:
    """LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: anyres tiles from `image_sizes` and the grid pinpoints, as the
    model's own `get_image_features` tiles them; OneVision's multi-image samples are not tiled; OneVision videos
    run every frame."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    batch = input_ids.shape[0]
    per_sample = [0] * batch
    image_mask = input_ids == config.image_token_id
    if pixel_values is not None and pixel_values.numel():
        height, width = pixel_values.shape[-2:]
        tile, tile_tokens = _llava_tile_flops(config, height, width)
        if config.model_type == "llava":
            if pixel_values.dim() != 4:
                raise ValueError(f"llava pixel_values must be [images, 3, H, W]; got {list(pixel_values.shape)}.")
            per_sample = _split_by_tokens([tile] * len(pixel_values), [tile_tokens] * len(pixel_values),
                                          image_mask.sum(dim=1).tolist(), "image")
        else:
            counts = batch_num_images.tolist() if batch_num_images is not None else _runs(image_mask)
            owners = _owners(counts, len(image_sizes), "image")
            tiles = [
                image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if config.model_type == "llava_next" or counts[owner] == 1 else 1
                for size, owner in zip(image_sizes.tolist(), owners)
            ]
            per_sample = _sum_by_owner([n * tile for n in tiles], owners, batch)
    if pixel_values_videos is not None and pixel_values_videos.numel():
        frames, (height, width) = pixel_values_videos.shape[1], pixel_values_videos.shape[-2:]
        frame, _ = _llava_tile_flops(config, height, width)
        owners = _owners(_runs(input_ids == config.video_token_id), len(pixel_values_videos), "video")
        videos = _sum_by_owner([frames * frame] * len(owners), owners, batch)
        per_sample = [a + b for a, b in zip(per_sample, videos)]
    return per_sample


def _qwen_grid_flops(vision_config, model_type: str, t: int, h: int, w: int) -> int:
    """One Qwen2-VL / Qwen2.5-VL image or video of `t x h x w` patches: patch embedding, blocks, patch merger.

    Attention runs within each temporal frame; Qwen2.5-VL's layers outside `fullatt_block_indexes` attend within
    windows of `window_size` pixels (in whole merge units), as its vision model partitions them."""
    merge = vision_config.spatial_merge_size
    patches = t * h * w
    channels = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    if model_type == "qwen2_vl":
        d = vision_config.embed_dim
        shape = EncoderShape(d, int(d * vision_config.mlp_ratio), vision_config.depth)
        out_dim = vision_config.hidden_size
        full_layers, window_layers = shape.num_layers, 0
    else:
        d = vision_config.hidden_size
        shape = EncoderShape(d, vision_config.intermediate_size, vision_config.depth, gated_mlp=True)
        out_dim = vision_config.out_hidden_size
        full_layers = len(vision_config.fullatt_block_indexes)
        window_layers = shape.num_layers - full_layers
    full_pairs = t * (h * w) ** 2
    total = 2 * patches * channels * d + full_layers * encoder_layer_flops(shape, patches, full_pairs)
    if window_layers:
        side = vision_config.window_size // merge // vision_config.patch_size  # merge units per window side
        rows, cols = h // merge, w // merge
        window_pairs = t * sum(
            (min(side, rows - i) * min(side, cols - j) * merge * merge) ** 2
            for i in range(0, rows, side)
            for j in range(0, cols, side)
        )
        total += window_layers * encoder_layer_flops(shape, patches, window_pairs)
    merged_width = d * merge * merge
    return total + mlp_projector_flops(patches // (merge * merge), merged_width, merged_width, out_dim)


def _qwen_flops(config, input_ids, image_grid_thw=None, video_grid_thw=None, **unused) -> list[int]:
    """Qwen2-VL and Qwen2.5-VL: each image / video from its `grid_thw` row, assigned to samples by tokens."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    per_sample = [0] * input_ids.shape[0]
    for grids, token_id, what in ((image_grid_thw, config.image_token_id, "image"),
                                  (video_grid_thw, config.video_token_id, "video")):
        if grids is None or not len(grids):
            continue
        costs = [_qwen_grid_flops(vision, config.model_type, *grid) for grid in grids.tolist()]
        tokens = [math.prod(grid) // (merge * merge) for grid in grids.tolist()]
        spent = _split_by_tokens(costs, tokens, (input_ids == token_id).sum(dim=1).tolist(), what)
        per_sample = [a + b for a, b in zip(per_sample, spent)]
    return per_sample


def _internvl_flops(config, input_ids, pixel_values=None, **unused) -> list[int]:
    """InternVL: every tile through InternViT, pixel shuffle by `downsample_ratio`, then the projector; tiles are
    assigned to samples by their image tokens (each tile has the same count)."""
    if pixel_values is None or not pixel_values.numel():
        return [0] * input_ids.shape[0]
    height, width = pixel_values.shape[-2:]
    tower, tokens = _vit_tile_flops(config.vision_config, height, width)
    selected = tokens - (config.vision_feature_select_strategy == "default")
    shuffle = round(1 / config.downsample_ratio) ** 2  # tokens folded into one by the pixel shuffle
    text_hidden = config.get_text_config(decoder=True).hidden_size
    tile = tower + mlp_projector_flops(selected // shuffle, config.vision_config.hidden_size * shuffle,
                                       text_hidden, text_hidden)
    return _split_by_tokens([tile] * len(pixel_values), [selected // shuffle] * len(pixel_values),
                            (input_ids == config.image_token_id).sum(dim=1).tolist(), "image tile")


VISION_FLOPS = {
    "internvl": _internvl_flops,
    "llava": _llava_flops,
    "llava_next": _llava_flops,
    "llava_onevision": _llava_flops,
    "qwen2_5_vl": _qwen_flops,
    "qwen2_vl": _qwen_flops,
}


def vision_flops(config, input_ids: torch.Tensor, **processor_outputs) -> list[int]:
    """Vision-tower + projector FLOPs of each sample of a processor batch (`flops.vision_flops(config, **inputs)`),
    counted from the vision config and the real number of patches, anyres tiles and frames (see the module
    docstring). `input_ids` [B, T] says which sample each image, tile or video belongs to; keys the family does
    not read (attention_mask, ...) are ignored. Text-only samples cost 0."""
    model_type = getattr(config, "model_type", None)
    if model_type not in VISION_FLOPS:
        raise ValueError(
            f"no vision FLOPs count for model_type {model_type!r}; supported: {', '.join(sorted(VISION_FLOPS))}."
        )
    return VISION_FLOPS[model_type](config, input_ids, **processor_outputs)
