"""The real-format fixture folders load like the hub checkpoints, and dyvte runs on them as on the stock model.

References: the encodings `llama-tokenizer-js` tests itself against (ids of Meta's tokenizer), the prompt text
and decoded output transformers' own LLaVA integration tests show for llava-hf/llava-1.5-7b-hf, Qwen2-VL's token
count rule (one token per 28x28 pixels after its resize), the stock image processor called directly, and stock
`model.generate`.
"""

import importlib.util
import json
import shutil

import pytest
import torch
from fixtures.real_format import fixture, llama_reference_cases, llama_tokenizer_json
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessor

from dyvte import VisualExit
from dyvte.data import BadSample, PromptCollator, read_llava_json
from dyvte.loading import load_mllm
from dyvte.prompts import chat_prompt

ALL_FIXTURES = ["llava-1.5", "qwen2-vl", "qwen2.5-vl", "internvl3", "llava-onevision"]


@pytest.fixture(scope="module")
def llava():
    return load_mllm(str(fixture("llava-1.5")))


@pytest.fixture(scope="module")
def qwen():
    return load_mllm(str(fixture("qwen2-vl")))


def test_llama_tokenizer_matches_the_reference_encodings(llava):
    cases = llama_reference_cases()
    assert len(cases) == 12
    rebuilt = Tokenizer.from_str(json.dumps(llama_tokenizer_json()))
    for text, ids in cases:
        assert rebuilt.encode(text).ids == ids, text
    # The folder's tokenizer is what transformers 5 makes of it (LlamaTokenizer's own Metaspace pipeline, as for the
    # real checkpoint): the same, except that a leading space stands in for the "▁" SentencePiece prepends.
    _, processor = llava
    for text, _ in cases:
        reference = rebuilt.encode(text.removeprefix(" ")).ids
        assert processor.tokenizer(text)["input_ids"] == reference, text


def test_llava_prompt_tokens_and_576_visual_tokens(llava):
    model, processor = llava
    prompt = chat_prompt(processor, "<image>\nWhat is this?")
    assert prompt == "USER: <image>\nWhat is this? ASSISTANT:"
    inputs = processor(images=[Image.new("RGB", (640, 480), "red")], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(32000) == 576 and inputs["pixel_values"].shape == (1, 3, 336, 336)
    text_tokens = processor.tokenizer.convert_ids_to_tokens([i for i in ids if i != 32000])
    assert text_tokens == ["<s>", "▁US", "ER", ":", "▁", "▁", "<0x0A>", "What", "▁is", "▁this", "?", "▁A", "SS", "IST",
                           "ANT", ":"]
    # as decoded in transformers' integration tests of the real checkpoint
    assert processor.decode(ids, skip_special_tokens=True) == "USER:  \nWhat is this? ASSISTANT:"
    assert len(processor.tokenizer) == 32002 and model.config.text_config.vocab_size == 32064
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]


def test_qwen_processor_without_torchvision_is_the_stock_image_pipeline(qwen):
    _, processor = qwen
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor).__mro__[2].__name__ == "Qwen2VLProcessor"
        with pytest.raises(ImportError, match="videos need torchvision"):
            processor(videos=[torch.zeros(2, 3, 56, 56)], text=["<|vision_start|><|video_pad|><|vision_end|>"])
    prompt = chat_prompt(processor, "What is it? <image>")
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n")
    images = [Image.new("RGB", (84, 56), "red"), Image.new("RGB", (112, 112), "blue")]  # width x height
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=[prompt, prompt], padding=True, return_tensors="pt")
    # dynamic resolution: one token per 28x28 pixels, so 2*3 and 4*4 tokens
    assert (inputs["input_ids"] == 151655).sum(dim=1).tolist() == [6, 16]
    stock = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)(images=images, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], stock["pixel_values"])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 8, 8]]


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_folder_loads_with_auto_classes_and_engine_equals_stock_generate(name):
    folder = fixture(name)
    model, processor = load_mllm(str(folder))
    assert type(model) is type(AutoModelForImageTextToText.from_pretrained(folder))
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == model.config.image_token_id
    processor.tokenizer.padding_side = "left"
    prompts = [chat_prompt(processor, "<image>\nWhat is it?"), chat_prompt(processor, "Describe <image> in a word.")]
    size = 448 if name == "internvl3" else 56
    images = [Image.new("RGB", (size, size), "red"), Image.new("RGB", (size, size), "green")]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    engine = VisualExit(model)
    stock = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    ours = engine.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, stock)


def test_no_chat_template_names_the_folder(tmp_path):
    folder = tmp_path / "llava-without-template"
    shutil.copytree(fixture("llava-1.5"), folder)
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=rf"{folder}: the processor LlavaProcessor has no chat template"):
        load_mllm(str(folder))


def test_tokenizer_without_the_image_token_names_the_folder(tmp_path):
    folder = tmp_path / "llava-without-image-token"
    shutil.copytree(fixture("llava-1.5"), folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["content"] != "<image>"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    with pytest.raises(ValueError, match=rf"{folder}: the tokenizer encodes the image token '<image>' as id 0, but "
                                         "the model's config expects image_token_id 32000"):
        load_mllm(str(folder))


def test_bad_records_are_listed_with_their_reason_or_raised(qwen, tmp_path, monkeypatch):
    _, processor = qwen
    Image.new("RGB", (56, 56), "red").save(tmp_path / "ok.png")
    Image.new("RGB", (6000, 28), "red").save(tmp_path / "wide.png")  # Qwen2-VL refuses aspect ratios over 200
    question = {"from": "human", "value": "<image>\nWhat is it?"}
    records = [
        {"id": "ok", "image": "ok.png", "conversations": [question, {"from": "gpt", "value": "Red."}]},
        {"id": "wide", "image": "wide.png", "conversations": [question, {"from": "gpt", "value": "Red."}]},
        {"id": "no_gpt", "image": "ok.png", "conversations": [question]},
        {"id": "two_humans", "image": "ok.png", "conversations": [question, question]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    samples = read_llava_json(tmp_path / "data.json", tmp_path)
    batch = PromptCollator(processor)(samples)
    assert [s.id for s in batch["samples"]] == ["ok"] and batch["input_ids"].shape[0] == 1
    reasons = {row["id"]: row["reason"] for row in batch["skipped"]}
    assert list(reasons) == ["wide", "no_gpt", "two_humans"]
    assert reasons["no_gpt"] == "the conversation has no gpt turn, so there is no answer to label"
    assert reasons["two_humans"] == "turn 1 of the conversation is from 'human', expected 'gpt' (human and gpt alternate)"
    assert reasons["wide"] == ("image is 6000x28, an aspect ratio over 200:1, the most any image may have "
                               "(dyvte.images.MAX_ASPECT_RATIO): "
                               f"{tmp_path / 'wide.png'}")  # found on the header, before the processor runs
    monkeypatch.setattr("dyvte.data.image_size_problem", lambda *args: "")  # without dyvte's check: the processor's
    reasons = {row["id"]: row["reason"] for row in PromptCollator(processor)(samples[:2])["skipped"]}
    assert reasons["wide"].startswith(f"the processor rejects its image {tmp_path / 'wide.png'} (6000x28 px): "
                                      "absolute aspect ratio must be smaller than 200")
    with pytest.raises(BadSample, match=r"sample 'wide': the processor rejects its image .*wide.png"):
        PromptCollator(processor, on_bad_sample="raise")([samples[0], samples[1]])
    with pytest.raises(BadSample, match="sample 'no_gpt': the conversation has no gpt turn"):
        PromptCollator(processor, on_bad_sample="raise")(samples[2:])
