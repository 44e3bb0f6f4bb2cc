"""Bad input fails early with an error that names the sample and the problem."""

import pytest
import torch
from tiny_models import IMAGE_TOKEN, PAD, Sample, build_batch, build_model
from transformers import LlamaConfig, LlamaForCausalLM

from dyvte import VisualExit
from dyvte.adapters import check_transformers_version


@pytest.fixture(scope="module")
def engine():
    return VisualExit(build_model("llava"))


@pytest.fixture(scope="module")
def batch(engine):
    return build_batch(engine.model, [Sample(), Sample(left_pad=1), Sample(left_pad=2)])


def test_pixels_without_image_tokens(engine, batch):
    text_only = build_batch(engine.model, [Sample(images=[])] * 3)
    with pytest.raises(ValueError, match="no sample contains the image token"):
        engine(**text_only, pixel_values=batch["pixel_values"])


def test_image_tokens_without_pixels(engine, batch):
    with pytest.raises(ValueError, match=r"sample\(s\) \[0, 1, 2\] contain image tokens"):
        engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_token_feature_count_mismatch_names_the_sample(engine, batch):
    ids = batch["input_ids"].clone()
    first_image_token = int((ids[1] == IMAGE_TOKEN).nonzero()[0])
    ids[1, first_image_token] = 5
    with pytest.raises(ValueError, match="sample 1: image 1 has 15 image tokens in the prompt but 16 features"):
        engine(**{**batch, "input_ids": ids})


def test_total_mismatch_with_an_extra_image(engine, batch):
    extra = torch.cat([batch["pixel_values"], batch["pixel_values"][:1]])
    with pytest.raises(ValueError, match="do not match the 4 image"):
        engine(**{**batch, "pixel_values": extra})


@pytest.mark.parametrize(
    "exit_layer, message",
    [
        (torch.tensor([1, 5, 2]), r"exit_layer of sample 1 is 5, outside \[0, 4\]"),
        (torch.tensor([1, 2, -1]), r"exit_layer of sample 2 is -1"),
        (torch.tensor([1, 2]), r"one per sample \(shape \[3\]\), got shape \[2\]"),
        (torch.tensor([1.0, 2.0, 3.0]), "must hold integers"),
        (7, r"sample 0 is 7"),
    ],
)
def test_exit_layer_checked(engine, batch, exit_layer, message):
    with pytest.raises(ValueError, match=message):
        engine(**batch, exit_layer=exit_layer)


def test_beam_search_refused(engine, batch):
    with pytest.raises(ValueError, match="not beam search"):
        engine.generate(**batch, num_beams=2, max_new_tokens=2)


def test_unsupported_family_lists_supported():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, pad_token_id=PAD))
    supported = "internvl, llava, llava_next, llava_onevision, qwen2_5_vl, qwen2_vl"
    with pytest.raises(ValueError, match=rf"no adapter for model_type 'llama'; supported: {supported}\.$"):
        VisualExit(model)


@pytest.mark.parametrize("version", ["4.57.1", "5.16.0", "5.26.0", "6.0.0"])
def test_unsupported_transformers_version(version):
    with pytest.raises(RuntimeError, match=f"found {version}"):
        check_transformers_version(version)


@pytest.mark.parametrize("version", ["5.17.0", "5.23.0", "5.24.0", "5.25.0"])
def test_supported_transformers_versions_pass_the_check(version):
    check_transformers_version(version)  # the range the CI cells and the by-hand 5.24 run test
