"""Adapter features beyond exactness: text spans from token ids, which visual tokens withdraw, quantized loading."""

import importlib.util

import pytest
import torch
from tiny_models import (
    FAMILIES,
    IMAGE_TOKEN,
    PAD,
    VIDEO_FAMILIES,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    Sample,
    build_batch,
    build_model,
)

from dyvte import VisualExit
from dyvte.adapters import ADAPTERS, get_adapter
from dyvte.loading import load_mllm


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return get_adapter(build_model(request.param, num_layers=1))


def expected_spans(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two spans, one token at a time (placeholders are image/video ids; start/end markers count as text)."""
    all_text = torch.zeros_like(ids, dtype=torch.bool)
    after = torch.zeros_like(all_text)
    for row in range(ids.shape[0]):
        seen_visual = False
        has_visual = bool(((ids[row] == IMAGE_TOKEN) | (ids[row] == VIDEO_TOKEN))[mask[row].bool()].any())
        for col in range(ids.shape[1]):
            token = int(ids[row, col])
            if not mask[row, col]:
                continue
            if token in (IMAGE_TOKEN, VIDEO_TOKEN):
                seen_visual = True
                continue
            all_text[row, col] = True
            after[row, col] = seen_visual or not has_visual
    return after, all_text


def test_text_mask_on_every_family(adapter):
    family = adapter.model.config.model_type
    videos = [(2, 8, 8)] if family in VIDEO_FAMILIES else []
    samples = [
        Sample(text_before=3, images=[(16, 16), (8, 16)], text_after=4, left_pad=2),
        Sample(text_before=2, images=[], videos=videos, text_after=3, right_pad=1),
        Sample(text_before=5, images=[], text_after=2),  # no visual tokens: all its text is "after"
    ]
    batch = build_batch(adapter.model, samples)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    after, all_text = expected_spans(ids, mask)
    assert torch.equal(adapter.text_mask(ids, mask, span="after_first_visual"), after)
    assert torch.equal(adapter.text_mask(ids, mask, span="all_text"), all_text)
    assert torch.equal(adapter.text_mask(ids, mask), after)  # the default span
    first_visual = int(((ids[0] == IMAGE_TOKEN)).nonzero()[0])
    assert not adapter.text_mask(ids, mask)[0, : first_visual + 1].any()
    if family in ("qwen2_vl", "qwen2_5_vl", "internvl"):  # markers around the image are text, after the first one
        assert adapter.text_mask(ids, mask)[0][ids[0] == VISION_END].all()
        assert adapter.text_mask(ids, mask, span="all_text")[0][ids[0] == VISION_START].all()
    with pytest.raises(ValueError, match="span must be one of after_first_visual, all_text"):
        adapter.text_mask(ids, mask, span="prompt")


def test_text_mask_with_withdrawn_mask_only():
    """Given the engine's visual_mask (images only), kept video tokens count as text."""
    model = build_model("qwen2_vl", num_layers=1)
    batch = build_batch(model, [Sample(images=[(8, 8)], videos=[(2, 8, 8)])])
    ids = batch["input_ids"]
    adapter = get_adapter(model, withdraw="images")
    with pytest.warns(UserWarning):
        withdrawn = adapter.withdrawn_mask(ids)
    spans = adapter.text_mask(ids, batch["attention_mask"], visual_mask=withdrawn, span="all_text")
    assert spans[ids == VIDEO_TOKEN].all() and not spans[ids == IMAGE_TOKEN].any()


def test_withdraw_choices_checked():
    model = build_model("qwen2_vl", num_layers=1)
    with pytest.raises(ValueError, match="withdraw must be one of both, images, videos; got 'audio'"):
        VisualExit(model, withdraw="audio")


@pytest.mark.parametrize("withdraw", ["images", "videos"])
def test_internvl_cannot_split_images_and_videos(withdraw):
    model = build_model("internvl", num_layers=1)
    with pytest.raises(ValueError, match="video frames through its image tokens.*withdraw='both'"):
        VisualExit(model, withdraw=withdraw)


def test_videos_without_pixels_name_the_samples():
    model = build_model("qwen2_vl", num_layers=1)
    batch = build_batch(model, [Sample(images=[]), Sample(images=[], videos=[(2, 8, 8)])])
    del batch["pixel_values_videos"]
    message = r"sample\(s\) \[1\] contain video tokens \(id 97\) but no pixel_values_videos"
    with pytest.raises(ValueError, match=message):
        VisualExit(model)(**batch)


def test_every_registered_family_has_a_tiny_model():
    assert sorted(ADAPTERS) == sorted(FAMILIES)


def test_quantization_without_the_extra_names_it_and_fails_before_download(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr("dyvte.loading.AutoModelForImageTextToText.from_pretrained", no_download)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args))
    for quantization in ("4bit", "nf4", "fp4", "8bit"):
        with pytest.raises(ImportError, match=f"quantization='{quantization}'.*bitsandbytes is not installed: "
                                              r'pip install "dyvte\[quant\]"'):
            load_mllm("llava-hf/llava-1.5-7b-hf", quantization=quantization)
    with pytest.raises(ValueError, match="quantization must be null, '4bit', 'nf4', 'fp4' or '8bit'; got '3bit'"):
        load_mllm("llava-hf/llava-1.5-7b-hf", quantization="3bit")


def test_pad_is_not_text(adapter):
    ids = torch.tensor([[PAD, PAD, 5, 6]])
    assert adapter.text_mask(ids, (ids != PAD).long(), span="all_text").tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_positions_of_prompt_and_answer_match_generate(family):
    """`generation_position_ids` over prompt + appended answer tokens: what generate uses for those tokens."""
    model = build_model(family, num_layers=1)
    batch = build_batch(model, [Sample(images=[(16, 16)], left_pad=2), Sample(images=[(8, 16)])])
    adapter = get_adapter(model)
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    answer = torch.tensor([[5, 6, 7], [8, 9, 10]])
    ids = torch.cat([batch["input_ids"], answer], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(answer)], dim=1)
    positions = adapter.generation_position_ids(ids, mask, **vision)
    prompt = adapter.generation_position_ids(batch["input_ids"], batch["attention_mask"], **vision)
    length = batch["input_ids"].shape[1]
    assert torch.equal(positions[..., :length], prompt)
    # each answer token continues every row by one from the prompt's next position, as generate's decode steps do
    start = adapter.next_position_ids(prompt, batch["attention_mask"])
    assert torch.equal(positions[..., length:], start[..., None] + torch.arange(3))


def test_model_configs_state_every_key_of_the_schema():
    """Each shipped model config states every key of the model group's schema (`ModelSettings`), in its order, so a
    user reads every setting there; its values have the schema's types."""
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf

    from dyvte.loading import HeadSchedule, ModelSettings

    keys = [f.name for f in fields(ModelSettings)]
    schedule = [f.name for f in fields(HeadSchedule)]
    for path in sorted((Path(__file__).parent.parent / "conf" / "model").glob("*.yaml")):
        config = OmegaConf.load(path)
        assert list(config.keys()) == keys, path.name
        assert list(config.head_schedule.keys()) == schedule, path.name
        OmegaConf.merge(ModelSettings, config)  # raises on a value of another type
        assert config.withdraw in ("both", "images", "videos") and config.quantization in (None, "4bit", "nf4", "fp4", "8bit")
        assert config.dtype in ("float32", "float16", "bfloat16")


def test_sliding_window_layers_refused():
    model = build_model("qwen2_vl", num_layers=1)
    model.config.text_config.layer_types = ["sliding_attention"]
    with pytest.raises(ValueError, match="sliding-window attention"):
        VisualExit(model)
