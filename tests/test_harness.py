"""Harness requests (the lmms-eval plug-in's work) against the stock model."""

import pytest
import torch
from fixtures.tiny_testbed import tiny_testbed
from PIL import Image

from dyvte import VisualExit
from dyvte.evaluation.harness import ExitRunner, generation_settings
from dyvte.policies import NoExit, StaticExit
from dyvte.prompts import chat_prompt


@pytest.fixture(scope="module")
def runner_parts():
    model, processor = tiny_testbed()
    images = [[Image.new("RGB", (96, 96), colour)] for colour in ("red", "blue", "white")]
    return model, processor, images


def test_loglikelihood_without_exit_is_the_stock_log_probability(runner_parts):
    model, processor, images = runner_parts
    runner = ExitRunner(VisualExit(model), processor, NoExit())
    contexts = ["how many objects are there ?", "what colour is the square ?", "is there a red circle ?"]
    continuations = ["2", "red", "yes"]
    results = runner.loglikelihood(contexts, continuations, images)
    for (log_p, greedy), context, continuation, image in zip(results, contexts, continuations, images):
        content = [{"type": "image"}, {"type": "text", "text": context}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=image, text=[prompt + " " + continuation], return_tensors="pt")
        target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(**inputs).logits[0, -len(target) - 1 : -1]
        expected = logits.log_softmax(-1)[torch.arange(len(target)), torch.tensor(target)].sum()
        assert log_p == pytest.approx(float(expected), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(target)).all())
    assert runner.stats.summary(3) == {"requests": 3, "mean_exit_layer": 3.0, "num_layers": 3, "histogram": {3: 3}}


def test_generate_matches_engine_and_cuts_at_stop_strings(runner_parts):
    model, processor, images = runner_parts
    engine = VisualExit(model)
    runner = ExitRunner(engine, processor, StaticExit(1))
    answers = runner.generate(["describe the image", "list the colours"], images[:2], max_new_tokens=6)
    for answer, image, context in zip(answers, images, ["describe the image", "list the colours"]):
        content = [{"type": "image"}, {"type": "text", "text": context}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=image, text=[prompt], return_tensors="pt")
        ids = engine.generate(**inputs, exit_layer=1, max_new_tokens=6)
        assert answer == processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    torch.manual_seed(5)  # sampling, so the random model says several different words
    words = runner.generate(["describe the image"], images[:1], max_new_tokens=8, do_sample=True)[0].split()
    later = [j for j, word in enumerate(words) if word not in " ".join(words[:j])]
    assert later[1:], f"the sampled answer {words} has no second distinct word to stop at"
    torch.manual_seed(5)
    cut = runner.generate(["describe the image"], images[:1], until=[words[later[1]]], max_new_tokens=8,
                          do_sample=True)
    assert cut == [" ".join(words[: later[1]])]
    assert runner.stats.exit_layers.count(1) >= 2


def test_generation_settings_follow_lmms_eval():
    assert generation_settings({"until": ["</s>"], "max_new_tokens": 16, "temperature": 0}) == {"do_sample": False}
    assert generation_settings({"temperature": 0, "top_p": 0.9, "num_beams": 1}) == {"do_sample": False,
                                                                                     "num_beams": 1}
    assert generation_settings({"temperature": 0.7, "top_p": 0.9}) == {"do_sample": True, "temperature": 0.7,
                                                                       "top_p": 0.9}
    assert generation_settings({"do_sample": True}) == {"do_sample": True, "temperature": 1.0}
    assert generation_settings({"repetition_penalty": 1.2}) == {"do_sample": False, "repetition_penalty": 1.2}


def test_task_temperature_reaches_generation(runner_parts):
    """A task's temperature samples at that temperature, exactly as `generate` does with it."""
    model, processor, images = runner_parts
    engine = VisualExit(model)
    runner = ExitRunner(engine, processor, StaticExit(1))
    settings = generation_settings({"temperature": 5.0, "until": ["</s>"], "max_new_tokens": 8})
    torch.manual_seed(3)
    answer = runner.generate(["describe the image"], images[:1], max_new_tokens=8, **settings)[0]
    inputs = processor(images=images[0], text=[chat_prompt(processor, "describe the image")], return_tensors="pt")
    torch.manual_seed(3)
    ids = engine.generate(**inputs, exit_layer=1, max_new_tokens=8, do_sample=True, temperature=5.0)
    assert answer == processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    torch.manual_seed(3)
    greedy = runner.generate(["describe the image"], images[:1], max_new_tokens=8)[0]
    assert answer != greedy  # at temperature 5 the random model's sample differs from its greedy answer
