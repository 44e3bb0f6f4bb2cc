"""Exactness of the withdrawal engine against the stock model and a masked-attention reference, on every family."""

import functools

import pytest
import torch
from reference import forward_positions, greedy_without_cache, masked_logits, stock_inputs_embeds, stock_positions
from tiny_models import (
    FAMILIES,
    IMAGE_TOKEN,
    VIDEO_FAMILIES,
    VIDEO_TOKEN,
    Sample,
    build_batch,
    build_model,
    sample_alone,
    visual_mask,
)

from dyvte import VisualExit

ATTENTION = ["sdpa", "eager"]
L = 4
ATOL = 1e-5


@functools.lru_cache(maxsize=None)
def tiny(family: str, attn: str = "sdpa"):
    """One model per (family, attention): building is deterministic and no test changes the weights."""
    return build_model(family, attn)


def image_sizes(family: str) -> list:
    """Different sizes, hence different visual token counts, except for LLaVA-1.5 (one fixed size)."""
    return [(16, 16)] * 3 if family == "llava" else [(16, 16), (8, 16), (13, 7)]


def padded_samples(family: str) -> list[Sample]:
    """Three samples with left padding, right padding and none; images of different sizes."""
    sizes = image_sizes(family)
    return [
        Sample(text_before=2, images=[sizes[0]], text_after=7, left_pad=3),
        Sample(text_before=4, images=[sizes[1]], text_after=5, right_pad=2),
        Sample(text_before=1, images=[sizes[2]], text_after=9),
    ]


def generation_samples(family: str) -> list[Sample]:
    """Left padding only; the first prompt has two images."""
    sizes = image_sizes(family)
    return [
        Sample(left_pad=3, images=[sizes[0], sizes[1]]),
        Sample(left_pad=0, images=[sizes[1]]),
        Sample(left_pad=1, images=[sizes[2]]),
    ]


def text_positions(batch: dict) -> torch.Tensor:
    return batch["attention_mask"].bool() & ~visual_mask(batch)


def reference(model, batch: dict, exit_layer, withdrawn: torch.Tensor | None = None, embeds=None) -> torch.Tensor:
    embeds = stock_inputs_embeds(model, **batch) if embeds is None else embeds
    withdrawn = visual_mask(batch) if withdrawn is None else withdrawn
    return masked_logits(model, embeds, batch["attention_mask"], forward_positions(model, batch), withdrawn, exit_layer)


@pytest.mark.install_matrix
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exit_layer", [None, L])
def test_no_exit_equals_stock_forward(family, attn, exit_layer):
    model = tiny(family, attn)
    batch = build_batch(model, padded_samples(family))
    with torch.no_grad():
        expected = model(**batch).logits
    logits = VisualExit(model)(**batch, exit_layer=exit_layer).logits
    real = batch["attention_mask"].bool()
    assert logits.shape == expected.shape
    assert (logits - expected)[real].abs().max() <= ATOL


@pytest.mark.install_matrix
@pytest.mark.parametrize("family", FAMILIES)
def test_no_exit_generate_equals_stock_generate(family):
    model = tiny(family)
    batch = build_batch(model, generation_samples(family))
    expected = model.generate(**batch, max_new_tokens=10, do_sample=False)
    assert torch.equal(VisualExit(model).generate(**batch, max_new_tokens=10, do_sample=False), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_exit_sampling_equals_stock_sampling(family):
    model = tiny(family)
    batch = build_batch(model, [Sample(left_pad=p) for p in (2, 0, 1)])
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_k=20, top_p=0.9)
    torch.manual_seed(7)
    expected = model.generate(**batch, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(VisualExit(model).generate(**batch, **kwargs), expected)


@pytest.mark.install_matrix
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_exit_layer_equals_masked_reference(family, attn):
    model = tiny(family, attn)
    batch = build_batch(model, padded_samples(family))
    engine = VisualExit(model)
    text = text_positions(batch)
    embeds = stock_inputs_embeds(model, **batch)
    for k in range(L + 1):
        exit_layer = torch.full((3,), k)
        logits = engine(**batch, exit_layer=exit_layer).logits
        expected = reference(model, batch, exit_layer, embeds=embeds)
        assert (logits - expected)[text].abs().max() <= ATOL, f"exit_layer={k}"


@pytest.mark.install_matrix
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_exit_layers_equal_masked_reference(family, attn):
    model = tiny(family, attn)
    samples = padded_samples(family) + [Sample(text_before=5, images=[], text_after=4, left_pad=1)]
    batch = build_batch(model, samples)
    exit_layer = torch.tensor([1, 3, 0, 2])
    logits = VisualExit(model)(**batch, exit_layer=exit_layer).logits
    assert (logits - reference(model, batch, exit_layer))[text_positions(batch)].abs().max() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_each_sample_alone(family):
    model = tiny(family)
    engine = VisualExit(model)
    samples = padded_samples(family)
    exit_layer = torch.tensor([2, 0, 3])
    batch = build_batch(model, samples)
    # Stock positions count real tokens only (0..T-1 would shift with the joint batch's padding).
    joint = engine(**batch, position_ids=stock_positions(model, batch), exit_layer=exit_layer).logits
    for i in range(len(samples)):
        alone_batch = sample_alone(model, samples, i)
        real = batch["attention_mask"][i].bool()
        assert torch.equal(batch["input_ids"][i, real], alone_batch["input_ids"][0])
        alone = engine(**alone_batch, exit_layer=exit_layer[i : i + 1]).logits[0]
        text = ~visual_mask(alone_batch)[0]
        assert (joint[i, real][text] - alone[text]).abs().max() <= ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_one_prompt(family):
    model = tiny(family)
    sizes = image_sizes(family)[:2]
    samples = [Sample(images=sizes, left_pad=0), Sample(images=sizes[:1], left_pad=2)]
    batch = build_batch(model, samples)
    with torch.no_grad():
        expected = model(**batch).logits
    engine = VisualExit(model)
    assert (engine(**batch).logits - expected)[batch["attention_mask"].bool()].abs().max() <= ATOL
    exit_layer = torch.tensor([1, 2])
    logits = engine(**batch, exit_layer=exit_layer).logits
    assert (logits - reference(model, batch, exit_layer))[text_positions(batch)].abs().max() <= ATOL


@pytest.mark.install_matrix
@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_exit_equals_no_cache_reference(family, attn):
    model = tiny(family, attn)
    batch = build_batch(model, generation_samples(family))
    exit_layer = torch.tensor([0, 2, 3])
    expected = greedy_without_cache(model, batch, exit_layer, max_new_tokens=10)
    generated = VisualExit(model).generate(**batch, exit_layer=exit_layer, max_new_tokens=10, do_sample=False)
    assert torch.equal(generated, expected)


def test_right_padded_generate_continues_after_last_real_token():
    model = tiny("llava")
    batch = build_batch(model, [Sample(right_pad=3), Sample(left_pad=1)])
    exit_layer = torch.tensor([2, 1])
    expected = greedy_without_cache(model, batch, exit_layer, max_new_tokens=8)
    assert torch.equal(VisualExit(model).generate(**batch, exit_layer=exit_layer, max_new_tokens=8), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_after_exit_holds_no_visual_entries(family):
    model = tiny(family)
    samples = padded_samples(family)
    batch = build_batch(model, samples)
    exit_layer = torch.tensor([1, 3, 0])
    out = VisualExit(model)(**batch, exit_layer=exit_layer)
    cache = out.cache
    assert out.past_key_values is cache  # the name transformers used before 5.24
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
    model = tiny("llava")
    batch = build_batch(model, [Sample(), Sample()])
    out = VisualExit(model).generate(
        **batch, exit_layer=1, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True
    )
    n_text = int(text_positions(batch)[0].sum())
    generated = out.sequences.shape[1] - batch["input_ids"].shape[1]
    # the last generated token is never fed back, so the cache holds prompt text + generated - 1 keys
    assert out.past_key_values.layers[L - 1].keys.shape[2] == n_text + generated - 1
    assert out.past_key_values.layers[0].keys.shape[2] == batch["input_ids"].shape[1] + generated - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_without_image_is_text_only(family):
    model = tiny(family)
    batch = build_batch(model, [Sample(images=[]), Sample(images=[], left_pad=2)])
    with torch.no_grad():
        expected = model(**batch).logits
    logits = VisualExit(model)(**batch, exit_layer=torch.tensor([0, 2])).logits
    assert (logits - expected)[batch["attention_mask"].bool()].abs().max() <= ATOL


# --- videos --------------------------------------------------------------------------------------------------------
def video_samples(family: str) -> list[Sample]:
    """An image+video prompt, a video-only prompt and an image-only prompt, left-padded."""
    video = (4, 8, 8) if family != "llava_onevision" else (2, 8, 8)
    return [
        Sample(images=[(16, 16)], videos=[video], left_pad=2),
        Sample(images=[], videos=[(video[0], 16, 8) if family != "llava_onevision" else video]),
        Sample(images=[(8, 16)], left_pad=1),
    ]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_videos_equal_stock_and_masked_reference(family):
    model = tiny(family)
    batch = build_batch(model, video_samples(family))
    assert (batch["input_ids"] == VIDEO_TOKEN).any()
    engine = VisualExit(model)
    with torch.no_grad():
        expected = model(**batch).logits
    assert (engine(**batch).logits - expected)[batch["attention_mask"].bool()].abs().max() <= ATOL
    exit_layer = torch.tensor([1, 2, 0])
    logits = engine(**batch, exit_layer=exit_layer).logits
    assert (logits - reference(model, batch, exit_layer))[text_positions(batch)].abs().max() <= ATOL
    generated = engine.generate(**batch, exit_layer=exit_layer, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(model, batch, exit_layer, max_new_tokens=6))
    assert torch.equal(engine.generate(**batch, max_new_tokens=6, do_sample=False),
                       model.generate(**batch, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("withdraw, kept", [("images", VIDEO_TOKEN), ("videos", IMAGE_TOKEN)])
def test_kept_modality_stays_and_says_so(family, withdraw, kept):
    model = tiny(family)
    batch = build_batch(model, video_samples(family))
    engine = VisualExit(model, withdraw=withdraw)
    exit_layer = torch.tensor([1, 2, 0])
    with pytest.warns(UserWarning, match=f"withdraw='{withdraw}'.*kept in every layer"):
        out = engine(**batch, exit_layer=exit_layer)
    withdrawn = visual_mask(batch) & (batch["input_ids"] != kept)
    assert torch.equal(out.visual_mask, withdrawn)
    text = batch["attention_mask"].bool() & ~withdrawn
    assert (out.logits - reference(model, batch, exit_layer, withdrawn))[text].abs().max() <= ATOL
    cache = out.past_key_values
    assert torch.equal(cache.num_keys(L - 1), text.sum(1))  # every sample has exited by the last layer

    def only_withdrawn(model, ids):
        return ((ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)) & (ids != kept)

    with pytest.warns(UserWarning, match="kept in every layer"):
        generated = engine.generate(**batch, exit_layer=exit_layer, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(model, batch, exit_layer, 5, withdrawn=only_withdrawn))
