"""Independent references for the engine: the stock model's own layers with a masked, full-length sequence.

Nothing here uses dyvte. Withdrawal at layer `k` is expressed as a 4-D attention mask that hides a sample's
visual tokens as keys from layer `k` on, every token keeping its position; text-position outputs must then
equal the engine's, which really removes those tokens. Pruning and merging baselines are the same with an edit
before each layer (`edited_forward`): it may rewrite hidden states and hide more positions.
"""

import math

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def stock_inputs_embeds(model, **inputs) -> torch.Tensor:
    """The merged text+image embeddings the stock model feeds its language model."""
    captured = {}

    def grab(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured["inputs_embeds"]


@torch.no_grad()
def masked_logits(model, inputs_embeds, attention_mask, position_ids, visual_mask, exit_layer) -> torch.Tensor:
    """Logits [B, T, V] of the full sequence, visual keys hidden from layer `exit_layer[b]` on."""
    language_model = model.model.language_model
    batch, length, _ = inputs_embeds.shape
    cos, sin = language_model.rotary_emb(inputs_embeds, position_ids)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    diagonal = torch.eye(length, dtype=torch.bool)
    hidden = inputs_embeds
    for layer_idx, layer in enumerate(language_model.layers):
        withdrawn = visual_mask & (torch.as_tensor(exit_layer) <= layer_idx)[:, None]
        keys = attention_mask.bool() & ~withdrawn
        allowed = (causal[None] & keys[:, None, :]) | diagonal[None]
        mask = torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
    return model.lm_head(language_model.norm(hidden))


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as `model.generate` forms them: count of real tokens so far, 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def uses_mrope(model) -> bool:
    return hasattr(model.model, "get_rope_index")


def stock_positions(model, batch: dict, input_ids=None, attention_mask=None) -> torch.Tensor:
    """Positions `model.generate` uses for `input_ids` (the prompt of `batch`, possibly with generated tokens after).

    1-D families: `generation_positions`. M-RoPE families: the model's own `get_rope_index` [3, B, T] on the whole
    sequence (generated tokens are text, so it continues each row by one per token exactly as `generate` does).
    """
    input_ids = batch["input_ids"] if input_ids is None else input_ids
    attention_mask = batch["attention_mask"] if attention_mask is None else attention_mask
    if not uses_mrope(model):
        return generation_positions(attention_mask)
    if batch.get("image_grid_thw") is None and batch.get("video_grid_thw") is None:
        return generation_positions(attention_mask)[None].expand(3, *input_ids.shape)
    types = batch["mm_token_type_ids"]
    types = torch.cat([types, types.new_zeros(types.shape[0], input_ids.shape[1] - types.shape[1])], dim=1)
    extra = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in batch}
    positions, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=types, attention_mask=attention_mask, **extra
    )
    return positions


def forward_positions(model, batch: dict) -> torch.Tensor:
    """Positions the stock forward uses when given none: 0..T-1, or `get_rope_index` for M-RoPE with visual input."""
    if uses_mrope(model) and (batch.get("image_grid_thw") is not None or batch.get("video_grid_thw") is not None):
        return stock_positions(model, batch)
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    return positions[None].expand(3, *positions.shape) if uses_mrope(model) else positions


def visual_tokens(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Image and video placeholders, from the model's config."""
    mask = input_ids == model.config.image_token_id
    if getattr(model.config, "video_token_id", None) is not None:
        mask |= input_ids == model.config.video_token_id
    return mask


@torch.no_grad()
def greedy_without_cache(model, batch: dict, exit_layer, max_new_tokens: int, withdrawn=visual_tokens) -> torch.Tensor:
    """Greedy decoding that recomputes the whole masked forward for every new token (no KV cache).

    Like `generate`, a sample that produced EOS is continued with padding. `withdrawn(model, ids)` marks the
    tokens that exit.
    """
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    ids, mask = batch["input_ids"], batch["attention_mask"]
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    prompt_embeds = stock_inputs_embeds(model, input_ids=ids, attention_mask=mask, **vision)
    embed_tokens = model.model.language_model.get_input_embeddings()
    prompt_visual = withdrawn(model, ids)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        new = ids[:, batch["input_ids"].shape[1] :]
        embeds = torch.cat([prompt_embeds, embed_tokens(new)], dim=1)
        positions = stock_positions(model, batch, ids, mask)
        # generated tokens are text, even when a random model happens to generate a placeholder id
        visual = torch.cat([prompt_visual, torch.zeros_like(new, dtype=torch.bool)], dim=1)
        logits = masked_logits(model, embeds, mask, positions, visual, exit_layer)
        last_real = (mask * torch.arange(mask.shape[1])).argmax(dim=1)  # the end, unless right-padded
        next_token = logits[torch.arange(ids.shape[0]), last_real].argmax(-1).masked_fill(finished, pad)
        finished |= next_token == eos
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def additive_mask(attention_mask: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] causal mask over the real keys not `removed` ([B, T]); every query also sees itself."""
    batch, length = attention_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keys = attention_mask.bool() & ~removed
    allowed = (causal[None] & keys[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
    return torch.zeros(batch, 1, length, length).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


@torch.no_grad()
def edited_forward(model, inputs_embeds, attention_mask, position_ids, edit):
    """The stock layers over the full sequence, `edit(layer_idx, hidden, removed) -> (hidden, removed)` called
    before each layer: it may rewrite hidden states [B, T, d] (merging) and mark positions removed ([B, T] bool,
    hidden as keys from that layer on).

    Returns the logits [B, T, V] and, per layer, its keys after rotary [B, H_kv, T, head_dim] with the positions
    that layer kept as keys ([B, T] bool), to compare with a KV cache.
    """
    language_model = model.model.language_model
    batch, length, _ = inputs_embeds.shape
    cos, sin = language_model.rotary_emb(inputs_embeds, position_ids)
    hidden = inputs_embeds
    removed = torch.zeros(batch, length, dtype=torch.bool)
    layer_keys = []
    for layer_idx, layer in enumerate(language_model.layers):
        hidden, removed = edit(layer_idx, hidden, removed.clone())
        captured = {}
        handle = layer.self_attn.k_proj.register_forward_hook(
            lambda module, args, out, captured=captured: captured.update(keys=out)
        )
        try:
            mask = additive_mask(attention_mask, removed)
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        finally:
            handle.remove()
        keys = captured["keys"].view(batch, length, -1, layer.self_attn.head_dim).transpose(1, 2)
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        layer_keys.append((keys, attention_mask.bool() & ~removed))
    return model.lm_head(language_model.norm(hidden)), layer_keys


@torch.no_grad()
def edited_greedy(model, batch: dict, edit, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of one unpadded sample without a KV cache: every step reruns `edited_forward` on prompt and
    generated tokens. The edits are decided on the prompt once, then replayed at every step (they concern prompt
    positions only), as a KV cache keeps them. Stops after EOS, like `generate`."""
    ids = batch["input_ids"]
    length = ids.shape[1]
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    prompt = stock_inputs_embeds(model, input_ids=ids, attention_mask=batch["attention_mask"], **vision)
    record = []

    def recording(layer_idx, hidden, removed):
        edited, removed = edit(layer_idx, hidden.clone(), removed)
        record.append((edited != hidden, edited, removed))
        return edited, removed

    def replay(layer_idx, hidden, removed):
        changed, edited, prompt_removed = record[layer_idx]
        hidden = hidden.clone()
        hidden[:, :length][changed] = edited[changed]
        removed[:, :length] = prompt_removed
        return hidden, removed

    embed_tokens = model.model.language_model.get_input_embeddings()
    logits, _ = edited_forward(model, prompt, torch.ones_like(ids), torch.arange(length)[None], recording)
    for _ in range(max_new_tokens):
        next_token = logits[:, -1].argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        if next_token.item() == model.generation_config.eos_token_id:
            break
        embeds = torch.cat([prompt, embed_tokens(ids[:, length:])], dim=1)
        logits, _ = edited_forward(model, embeds, torch.ones_like(ids), torch.arange(ids.shape[1])[None], replay)
    return ids


def density_peak_merge(tokens, clusters):
    """DPC-KNN by loops: density from each token's `clusters` nearest (itself included), parent distance to the
    nearest denser token (ties by index), centres by density x parent distance; members join the nearest centre;
    a merged token is the members' sum over (count + 1e-6). Returns {centre: merged token}."""
    n, width = tokens.shape
    distance = [[float((tokens[i] - tokens[j]).norm()) / width**0.5 for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(distance[i])[:clusters]) / clusters) for i in range(n)]
    largest = max(max(row) for row in distance)
    parent = [min([distance[i][j] for j in range(n) if density[j] > density[i] or
                   (density[j] == density[i] and j < i)], default=largest) for i in range(n)]
    centres = sorted(range(n), key=lambda i: -parent[i] * density[i])[:clusters]
    members = {c: [] for c in centres}
    for i in range(n):
        members[i if i in members else min(centres, key=lambda c: distance[c][i])].append(i)
    return {c: sum(tokens[i] for i in group) / (len(group) + 1e-6) for c, group in members.items()}


def vit_layer_flops(tokens: int, pairs: int, hidden: int, intermediate: int, gated: bool = False) -> int:
    """One ViT encoder layer by hand, 2 FLOPs per multiply-add: q, k, v, o projections, scores and values over
    `pairs` (query, key) pairs, and the MLP (two matrices, or three when gated)."""
    mlp = 2 * tokens * (3 if gated else 2) * hidden * intermediate
    return 2 * tokens * 4 * hidden * hidden + 4 * pairs * hidden + mlp


def llava_image_flops(side: int, patch: int, cls: int, hidden: int, intermediate: int, layers: int, text_hidden: int,
                      drop_first: bool = True) -> int:
    """One `side` x `side` image through a CLIP-style tower (`cls` = 1 with a CLS token) and LLaVA's two-matrix
    projector, by hand: patch embedding, `layers` full-attention layers, projector on the selected tokens."""
    patches = (side // patch) ** 2
    tokens = patches + cls
    selected = tokens - drop_first
    return (2 * patches * 3 * patch * patch * hidden
            + layers * vit_layer_flops(tokens, tokens * tokens, hidden, intermediate)
            + 2 * selected * (hidden * text_hidden + text_hidden * text_hidden))


@torch.no_grad()
def counted_vision_flops(model, batch: dict) -> int:
    """Matrix-multiply FLOPs that PyTorch's `FlopCounterMode` counts while the stock model encodes the batch's
    images and videos with its own `get_image_features` / `get_video_features` (run the model with eager
    attention, whose score and value products are plain matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    inner = model.model
    qwen = model.config.model_type in ("qwen2_vl", "qwen2_5_vl")
    with FlopCounterMode(display=False) as counter:
        if "pixel_values" in batch:
            if qwen:
                inner.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
            else:
                extra = {k: batch[k] for k in ("image_sizes", "batch_num_images") if k in batch}
                inner.get_image_features(pixel_values=batch["pixel_values"], **extra)
        if "pixel_values_videos" in batch:
            if qwen:
                inner.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])
            else:
                inner.get_video_features(batch["pixel_values_videos"])
    return counter.get_total_flops()
