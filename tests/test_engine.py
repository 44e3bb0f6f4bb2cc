"""Exactness of the withdrawal engine against the stock model and a masked-attention reference."""

import pytest
import torch
from reference import generation_positions, greedy_without_cache, masked_logits, stock_inputs_embeds
from tiny_models import IMAGE_TOKEN, Sample, build_batch, build_model

from dyvte import VisualExit

FAMILIES = ["llava", "llava_next"]
ATTENTION = ["sdpa", "eager"]
L = 4
ATOL = 1e-5


def padded_samples(family: str) -> list[Sample]:
    """Three samples with left padding, right padding and none; NeXT images of different sizes."""
    sizes = [(16, 16), (8, 16), (13, 7)] if family == "llava_next" else [(16, 16)] * 3
    return [
        Sample(text_before=2, images=[sizes[0]], text_after=7, left_pad=3),
        Sample(text_before=4, images=[sizes[1]], text_after=5, right_pad=2),
        Sample(text_before=1, images=[sizes[2]], text_after=9),
    ]


def vision_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}


def text_positions(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE_TOKEN)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exit_layer", [None, L])
def test_no_exit_equals_stock_forward(family, attn, exit_layer):
    model = build_model(family, attn)
    batch = build_batch(model, padded_samples(family))
    with torch.no_grad():
        expected = model(**batch).logits
    logits = VisualExit(model)(**batch, exit_layer=exit_layer).logits
    real = batch["attention_mask"].bool()
    assert logits.shape == expected.shape
    assert (logits - expected)[real].abs().max() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_no_exit_generate_equals_stock_generate(family):
    model = build_model(family)
    samples = [Sample(left_pad=p, images=s.images) for p, s in zip((3, 0, 1), padded_samples(family))]
    batch = build_batch(model, samples)
    expected = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(VisualExit(model).generate(**batch, max_new_tokens=10, do_sample=False), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_exit_sampling_equals_stock_sampling(family):
    model = build_model(family)
    batch = build_batch(model, [Sample(left_pad=p) for p in (2, 0, 1)])
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    expected = model.generate(**batch, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(VisualExit(model).generate(**batch, **kwargs), expected)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_exit_layer_equals_masked_reference(family, attn):
    model = build_model(family, attn)
    batch = build_batch(model, padded_samples(family))
    engine = VisualExit(model)
    embeds = stock_inputs_embeds(model, **batch)
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    visual = batch["input_ids"] == IMAGE_TOKEN
    text = text_positions(batch)
    for k in range(L + 1):
        exit_layer = torch.full((3,), k)
        expected = masked_logits(model, embeds, batch["attention_mask"], positions, visual, exit_layer)
        logits = engine(**batch, exit_layer=exit_layer).logits
        assert (logits - expected)[text].abs().max() <= ATOL, f"exit_layer={k}"


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_exit_layers_equal_masked_reference(family, attn):
    model = build_model(family, attn)
    samples = padded_samples(family) + [Sample(text_before=5, images=[], text_after=4, left_pad=1)]
    batch = build_batch(model, samples)
    exit_layer = torch.tensor([1, 3, 0, 2])
    embeds = stock_inputs_embeds(model, **batch)
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    expected = masked_logits(
        model, embeds, batch["attention_mask"], positions, batch["input_ids"] == IMAGE_TOKEN, exit_layer
    )
    logits = VisualExit(model)(**batch, exit_layer=exit_layer).logits
    assert (logits - expected)[text_positions(batch)].abs().max() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_sample_alone(family):
    model = build_model(family)
    engine = VisualExit(model)
    samples = padded_samples(family)
    exit_layer = torch.tensor([2, 0, 3])
    together = engine(**build_batch(model, samples), exit_layer=exit_layer).logits
    batch = build_batch(model, samples)
    for i, sample in enumerate(samples):
        alone_batch = build_batch(model, [sample], seed=0)
        # Same tokens and pixels as row i of the joint batch, without the joint batch's extra padding.
        real = batch["attention_mask"][i].bool()
        alone_batch["input_ids"] = batch["input_ids"][i, real][None]
        alone_batch["attention_mask"] = torch.ones_like(alone_batch["input_ids"])
        alone_batch["pixel_values"] = batch["pixel_values"][i : i + 1]
        if "image_sizes" in batch:
            alone_batch["image_sizes"] = batch["image_sizes"][i : i + 1]
        alone = engine(**alone_batch, exit_layer=exit_layer[i : i + 1]).logits[0]
        text = (alone_batch["input_ids"][0] != IMAGE_TOKEN)
        # Positions differ between the two layouts (0..T-1 per row), so compare generation-style positions.
        joint = engine(**batch, position_ids=generation_positions(batch["attention_mask"]), exit_layer=exit_layer)
        assert (joint.logits[i, real][text] - alone[text]).abs().max() <= ATOL
    assert together.shape[0] == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_one_prompt(family):
    model = build_model(family)
    sizes = [(16, 16), (8, 16)] if family == "llava_next" else [(16, 16), (16, 16)]
    samples = [Sample(images=sizes, left_pad=0), Sample(images=sizes[:1], left_pad=2)]
    batch = build_batch(model, samples)
    with torch.no_grad():
        expected = model(**batch).logits
    engine = VisualExit(model)
    assert (engine(**batch).logits - expected)[batch["attention_mask"].bool()].abs().max() <= ATOL
    embeds = stock_inputs_embeds(model, **batch)
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    exit_layer = torch.tensor([1, 2])
    reference = masked_logits(
        model, embeds, batch["attention_mask"], positions, batch["input_ids"] == IMAGE_TOKEN, exit_layer
    )
    logits = engine(**batch, exit_layer=exit_layer).logits
    assert (logits - reference)[text_positions(batch)].abs().max() <= ATOL


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_exit_equals_no_cache_reference(family, attn):
    model = build_model(family, attn)
    samples = [Sample(left_pad=p, images=s.images) for p, s in zip((3, 0, 1), padded_samples(family))]
    batch = build_batch(model, samples)
    exit_layer = torch.tensor([0, 2, 3])
    expected = greedy_without_cache(model, batch, exit_layer, max_new_tokens=10)
    generated = VisualExit(model).generate(**batch, exit_layer=exit_layer, max_new_tokens=10, do_sample=False)
    assert torch.equal(generated, expected)


def test_right_padded_generate_continues_after_last_real_token():
    model = build_model("llava")
    batch = build_batch(model, [Sample(right_pad=3), Sample(left_pad=1)])
    exit_layer = torch.tensor([2, 1])
    expected = greedy_without_cache(model, batch, exit_layer, max_new_tokens=8)
    assert torch.equal(VisualExit(model).generate(**batch, exit_layer=exit_layer, max_new_tokens=8), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_after_exit_holds_no_visual_entries(family):
    model = build_model(family)
    samples = padded_samples(family)
    batch = build_batch(model, samples)
    exit_layer = torch.tensor([1, 3, 0])
    cache = VisualExit(model)(**batch, exit_layer=exit_layer).past_key_values
    real = batch["attention_mask"].sum(1)
    n_text = text_positions(batch).sum(1)
    for layer in range(L):
        expected = torch.where(exit_layer > layer, real, n_text)
        assert torch.equal(cache.num_keys(layer), expected), f"layer {layer}"
        assert cache.layers[layer].keys.shape[2] == int(expected.max())

    single = build_batch(model, samples[:1])
    cache = VisualExit(model)(**single, exit_layer=2).past_key_values
    n_text = int(text_positions(single).sum())
    assert [cache.layers[layer].keys.shape[2] for layer in range(L)] == [int(single["attention_mask"].sum())] * 2 + [
        n_text
    ] * 2


def test_generation_keeps_cache_compact():
    model = build_model("llava")
    batch = build_batch(model, [Sample(), Sample()])
    out = VisualExit(model).generate(
        **batch, exit_layer=1, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True
    )
    n_text = int(text_positions(batch)[0].sum())
    generated = out.sequences.shape[1] - batch["input_ids"].shape[1]
    # the last generated token is never fed back, so the cache holds prompt text + generated - 1 keys
    assert out.past_key_values.layers[L - 1].keys.shape[2] == n_text + generated - 1
    assert out.past_key_values.layers[0].keys.shape[2] == batch["input_ids"].shape[1] + generated - 1


def test_prompt_without_image_is_text_only():
    model = build_model("llava")
    batch = build_batch(model, [Sample(images=[]), Sample(images=[], left_pad=2)])
    with torch.no_grad():
        expected = model(**batch).logits
    logits = VisualExit(model)(**batch, exit_layer=torch.tensor([0, 2])).logits
    assert (logits - expected)[batch["attention_mask"].bool()].abs().max() <= ATOL
