"""The FLOPs convention against hand computations."""

import pytest
import torch
from reference import counted_vision_flops, llava_image_flops, vit_layer_flops
from tiny_models import FAMILIES, VIDEO_FAMILIES, Sample, build_batch, build_model, sample_alone
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

from dyvte import VisualExit, flops

# d=8, m=16, 2 layers, 2 heads of 4 (q_dim 8), 1 kv head (kv_dim 4), vocab 10
CONFIG = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=10)


def test_layer_flops_by_hand():
    # 3 tokens, causal pairs 1+2+3 = 6
    projections = 2 * 3 * (8 * 8 + 2 * 8 * 4 + 8 * 8)  # 1152
    attention = 4 * 6 * 8  # 192
    mlp = 2 * 3 * 3 * 8 * 16  # 2304
    assert flops.layer_flops(CONFIG, 3, 6) == projections + attention + mlp == 3648


def test_prefill_by_hand():
    # 2 text + 1 visual, exit after layer 1: layer 0 sees 3 tokens (3648), layer 1 sees 2 (pairs 3)
    text_layer = 2 * 2 * (64 + 64 + 64) + 4 * 3 * 8 + 2 * 2 * 3 * 8 * 16  # 768 + 96 + 1536 = 2400
    lm_head = 2 * 8 * 10
    assert flops.prefill_flops(CONFIG, n_text=2, n_visual=1, exit_layer=1) == 3648 + text_layer + lm_head
    assert flops.prefill_flops(CONFIG, 2, 1) == 2 * 3648 + lm_head
    assert flops.prefill_flops(CONFIG, 2, 1, exit_layer=2) == flops.prefill_flops(CONFIG, 2, 1, None)


def test_decode_step_by_hand():
    # 2 text + 1 visual + 1 generated already; the new token attends 5 keys before exit, 4 after
    per_token = 2 * (64 + 64 + 64) + 2 * 3 * 8 * 16  # projections 384 + mlp 768
    expected = (per_token + 4 * 5 * 8) + (per_token + 4 * 4 * 8) + 2 * 8 * 10
    assert flops.decode_step_flops(CONFIG, 2, 1, exit_layer=1, n_generated=1) == expected


@pytest.mark.parametrize("k", [0, 8, 16, 24, 32])
def test_exit_ratio_closed_form_llava7b(k):
    """LLaVA-1.5-7B shape, 576 visual + 64 text: saving = (L-k)/L · (F(640) - F(64)) / (F(640) + head/L)."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064)
    d, m, n_full, n_text = 4096, 11008, 640, 64

    def per_layer(n):
        return 2 * n * 4 * d * d + 4 * (n * (n + 1) // 2) * d + 6 * n * d * m

    head = 2 * d * 32064
    full = 32 * per_layer(n_full) + head
    expected = (32 - k) * (per_layer(n_full) - per_layer(n_text)) / full
    assert flops.prefill_saving(config, n_text, 576, k) == pytest.approx(expected, rel=1e-12)


def test_kv_bytes_shrink_with_exit():
    assert flops.kv_cache_bytes(CONFIG, 2, 1, exit_layer=1, bytes_per_value=4) == 2 * (3 + 2) * 4 * 4


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"exit_layer 3 is outside \[0, 2\]"):
        flops.prefill_flops(CONFIG, 2, 1, exit_layer=3)
    with pytest.raises(ValueError, match="non-negative"):
        flops.prefill_flops(CONFIG, -1, 1)


# --- vision towers ------------------------------------------------------------------------------------------------
def llava15_config(hidden: int, intermediate: int, layers: int, heads: int) -> LlavaConfig:
    """LLaVA-1.5 at its real shapes (llava-hf config values), no weights: CLIP ViT-L/14 at 336 px, feature layer
    -2, CLS dropped, Vicuna decoder."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32064)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


@pytest.mark.parametrize("name, hidden, intermediate, layers, paper_tflops",
                         [("7B", 4096, 11008, 32, 8.8), ("13B", 5120, 13824, 40, 16.8)])
def test_whole_model_tflops_reproduce_the_paper(name, hidden, intermediate, layers, paper_tflops):
    """DyVTE Table 1/2 baselines (GQA, VQAv2, POPE): LLaVA-1.5-7B 8.8 TFLOPs, 13B 16.8, with 576 visual + 64 text
    tokens; the vision tower by hand: 576 patches + CLS through all 24 CLIP layers, the projector on 576."""
    config = llava15_config(hidden, intermediate, layers, layers)
    input_ids = torch.full((1, 640), 7)
    input_ids[0, 5:581] = 32000
    vision = flops.vision_flops(config, input_ids, pixel_values=torch.empty(1, 3, 336, 336, device="meta"))
    assert vision == [llava_image_flops(336, 14, 1, 1024, 4096, 24, hidden)]
    lm = flops.prefill_flops(config, n_text=64, n_visual=576)
    assert (lm + vision[0]) / 1e12 == pytest.approx(paper_tflops, rel=0.02)


def test_llava_7b_lm_and_vision_split():
    """The split the issue states: the 7B LM at 576 + 64 tokens is 8.40 TFLOPs, CLIP ViT-L/336 + projector 0.41."""
    config = llava15_config(4096, 11008, 32, 32)
    input_ids = torch.tensor([[32000] * 576 + [7] * 64])
    lm = flops.prefill_flops(config, 64, 576)
    (vision,) = flops.vision_flops(config, input_ids, pixel_values=torch.empty(1, 3, 336, 336, device="meta"))
    assert round(lm / 1e12, 2) == 8.40 and round(vision / 1e12, 2) == 0.41


def siglip_head(tokens: int, hidden: int, intermediate: int) -> int:
    """SigLIP's attention-pooling head by hand: one probe query (q, k, v, out projections, scores and values over
    `tokens` keys) and the MLP on that one vector."""
    return 2 * hidden * hidden + 2 * 2 * tokens * hidden * hidden + 4 * tokens * hidden + 2 * hidden * hidden \
        + 2 * 2 * hidden * intermediate


def hand_count(family: str) -> tuple[Sample, int]:
    """One sample of `tests/tiny_models.py`'s model for `family` and its vision FLOPs computed by hand (vision
    width 16, MLP 32, 2 layers; text width 32)."""
    llava_tile = llava_image_flops(8, 4, 1, 16, 32, 2, 32)  # 8 px tiles, 4 px patches: 4 patches + CLS
    if family == "llava":
        return Sample(images=[(16, 16)]), llava_image_flops(16, 4, 1, 16, 32, 2, 32)
    if family == "llava_next":  # 16x16 picks the 16x16 pinpoint: 2 x 2 tiles + the base view
        return Sample(images=[(16, 16)]), 5 * llava_tile
    if family == "qwen2_vl":  # grid 1 x 8 x 8 of 2 px patches of 2 frames (24 values); MLP 4 x 16; merger to 32
        patches = 64
        return Sample(images=[(16, 16)]), (2 * patches * 24 * 16 + 2 * vit_layer_flops(patches, patches**2, 16, 64)
                                           + 2 * (patches // 4) * (64 * 64 + 64 * 32))
    if family == "qwen2_5_vl":
        # grid 1 x 10 x 6 = 60 patches = 5 x 3 merge units; windows of 8 px = 2 x 2 merge units: rows 2, 2, 1 by
        # columns 2, 1 -> 16, 8, 16, 8, 8, 4 patches -> 720 pairs in layer 0; layer 1 is a full-attention layer
        patches = 60
        window_pairs = 16**2 + 8**2 + 16**2 + 8**2 + 8**2 + 4**2
        return Sample(images=[(20, 12)]), (2 * patches * 24 * 16
                                           + vit_layer_flops(patches, window_pairs, 16, 32, gated=True)
                                           + vit_layer_flops(patches, patches**2, 16, 32, gated=True)
                                           + 2 * (patches // 4) * (64 * 64 + 64 * 32))
    if family == "internvl":  # 4 tiles of 16 px: 16 patches + CLS; CLS dropped, pixel shuffle 0.5 -> 4 x 64
        tile = 2 * 16 * 3 * 16 * 16 + 2 * vit_layer_flops(17, 17 * 17, 16, 32) + 2 * 4 * (64 * 32 + 32 * 32)
        return Sample(images=[(16, 16)]), 4 * tile
    if family == "llava_onevision":
        # SigLIP 8 px tiles: 4 patches, no CLS, pooling head on; "full" keeps all 4. A 16x16 image: 5 tiles;
        # two images in one sample: one tile each; a 4-frame video: 4 frames.
        tile = (2 * 4 * 3 * 16 * 16 + 2 * vit_layer_flops(4, 16, 16, 32) + siglip_head(4, 16, 32)
                + 2 * 4 * (16 * 32 + 32 * 32))
        return Sample(images=[(16, 16), (8, 16)], videos=[(4, 16, 16)]), (1 + 1 + 4) * tile
    raise ValueError(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_flops_by_hand(family):
    model = build_model(family)
    sample, expected = hand_count(family)
    assert flops.vision_flops(model.config, **build_batch(model, [sample])) == [expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_flops_per_sample_match_pytorch_counting_the_stock_tower(family):
    """A batch of samples with one, two or no images (and a video in the video families), of several sizes: each
    sample's count equals what PyTorch's FlopCounterMode counts while the stock model encodes that sample alone."""
    model = build_model(family, attn_implementation="eager")
    samples = [Sample(images=[(16, 16)]), Sample(images=[(8, 16), (20, 12)], left_pad=2), Sample(images=[]),
               Sample(images=[(24, 16)])]
    if family in VIDEO_FAMILIES:
        samples[2] = Sample(images=[], videos=[(4, 16, 16)])
    batch = build_batch(model, samples)
    counted = [counted_vision_flops(model, sample_alone(model, samples, i)) for i in range(len(samples))]
    assert flops.vision_flops(model.config, **batch) == counted
    assert counted[0] > 0 and (counted[2] == 0) == (family not in VIDEO_FAMILIES)


def test_vision_flops_refuse_what_they_cannot_attribute():
    model = build_model("llava_next")
    batch = build_batch(model, [Sample(images=[(16, 16), (16, 16)])])
    ids = batch["input_ids"][0].tolist()
    first_end = ids.index(98) + ids.count(98) // 2
    batch["input_ids"] = torch.tensor([ids[:first_end] + ids[first_end + 1:] + [0]])  # the two spans now touch
    with pytest.raises(ValueError, match="2 images were given.*which sample each image belongs to"):
        flops.vision_flops(model.config, **batch)
    with pytest.raises(ValueError, match="no vision FLOPs count for model_type 'llama'"):
        flops.vision_flops(CONFIG, torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("exit_layer", [0, 1, 2])
def test_generated_prefill_flops_from_the_cache_equal_the_closed_form(exit_layer):
    """Padded samples of different lengths, generated with a static exit: the FLOPs counted from the keys each
    layer's cache holds equal `prefill_flops` with that exit and the sample's own text and visual counts."""
    model = build_model("llava", num_layers=2)
    samples = [Sample(text_before=1, text_after=3), Sample(text_before=2, text_after=5, left_pad=2)]
    batch = build_batch(model, samples)
    out = VisualExit(model).generate(**batch, exit_layer=exit_layer, max_new_tokens=4, min_new_tokens=4,
                                     do_sample=False, return_dict_in_generate=True)
    spent, full = flops.generated_prefill_flops(model.config, out, batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    for i in range(len(samples)):
        n_visual = int(((batch["input_ids"][i] == model.config.image_token_id) & mask[i]).sum())
        n_text = int(mask[i].sum()) - n_visual
        assert spent[i] == flops.prefill_flops(model.config.text_config, n_text, n_visual, exit_layer)
        assert full[i] == flops.prefill_flops(model.config.text_config, n_text, n_visual)
