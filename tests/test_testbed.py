"""The embedded testbed: generator, LLaVA-format splits, processor/training agreement and the shipped checkpoint."""

import itertools
import json
import random

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from dyvte.loading import load_mllm
from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR as DEFAULT_DATA_DIR
from dyvte.testbed import MODEL_DIR as TESTBED_MODEL_DIR
from dyvte.testbed.model import ModelConfig, build_model, build_processor, pixel_values
from dyvte.testbed.pretrain import CellCodes, Encoder, TrainingData, family_weights, parse_args
from dyvte.testbed.scenes import (
    COLOURS,
    FAMILIES,
    Obj,
    SceneConfig,
    SplitSizes,
    build_split,
    generate_dataset,
    held_out_hashes,
    load_split,
    make_question,
    render,
    sample_scene,
    scene_stream,
)

CONFIG = SceneConfig()
# Hand-made scene: top to bottom a big red square with glyph 3, a small blue circle, a big green triangle with 7.
SCENE = (
    Obj(col=2, row=1, colour="red", shape="square", size="big", glyph="3"),
    Obj(col=6, row=4, colour="blue", shape="circle", size="small", glyph=None),
    Obj(col=0, row=6, colour="green", shape="triangle", size="big", glyph="7"),
)
SCENE_QA = [
    ("is there a blue circle ?", "yes"),
    ("how many objects are there ?", "3"),
    ("what colour is the triangle ?", "green"),
    ("what shape is the red object ?", "square"),
    ("what digit is on the green triangle ?", "7"),
    ("what colour is the object with digit 3 ?", "red"),
    ("what colour is the object above the green triangle ?", "blue"),
    ("what colour is the object below the red square ?", "blue"),
    ("list the colours from top to bottom .", "red blue green"),
]


@pytest.fixture(scope="module")
def testbed():
    return load_mllm("testbed")


def greedy_answers(model, processor, images, questions, max_new_tokens=8):
    prompts = [chat_prompt(processor, q) for q in questions]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]


def test_rendering_draws_what_the_scene_says():
    image = render(SCENE, CONFIG)
    assert image.size == (96, 96)
    assert image.getpixel((2 * 12 + 2, 1 * 12 + 2)) == COLOURS["red"]  # inside the big square, off the glyph
    assert image.getpixel((6 * 12 + 6, 4 * 12 + 6)) == COLOURS["blue"]  # centre of the small circle
    assert image.getpixel((0, 0)) == (235, 235, 235)
    glyph_pixels = [image.getpixel((24 + x, 12 + y)) for x in range(12) for y in range(12)]
    assert glyph_pixels.count((0, 0, 0)) == 10  # the 3x5 bitmap of "3" has 10 set pixels


def test_questions_have_the_right_answers():
    rng = random.Random(0)
    asked = {}
    for family in FAMILIES:
        for _ in range(30):
            question, answer = make_question(family, SCENE, rng)
            asked[question] = answer
    for question, answer in SCENE_QA:
        assert asked[question] == answer


def test_generator_is_deterministic_and_seed_sensitive():
    a, _ = build_split("val", 20, seed=3, config=CONFIG, exclude=set())
    b, _ = build_split("val", 20, seed=3, config=CONFIG, exclude=set())
    c, _ = build_split("val", 20, seed=4, config=CONFIG, exclude=set())
    assert a == b
    assert a != c
    scene = sample_scene(random.Random(7), CONFIG)
    assert render(scene, CONFIG).tobytes() == render(scene, CONFIG).tobytes()


def test_answers_are_balanced_so_the_prior_is_at_chance():
    records, _ = build_split("train", 400, seed=0, config=CONFIG, exclude=set())
    counts = {f: sum(r["family"] == f for r in records) for f in FAMILIES}
    assert max(counts.values()) - min(counts.values()) <= 0.1 * max(counts.values())
    yes = [r["conversations"][1]["value"] == "yes" for r in records if r["family"] == "presence"]
    assert 0.4 < sum(yes) / len(yes) < 0.6
    colours = [r["conversations"][1]["value"] for r in records if r["family"] == "relation"]
    assert max(colours.count(c) for c in COLOURS) / len(colours) < 0.3


def test_committed_splits_are_disjoint_llava_records():
    splits = {s: load_split(DEFAULT_DATA_DIR, s) for s in ("train", "val", "test", "certification")}
    assert 5000 <= len(splits["train"]) <= 7000
    assert 300 <= len(splits["val"]) <= 500
    assert 500 <= len(splits["test"]) <= 800
    assert 3000 <= len(splits["certification"]) <= 5000
    scenes = {s: {r["scene"] for r in records} for s, records in splits.items()}
    images = {s: {r["image"] for r in records} for s, records in splits.items()}
    for a, b in itertools.combinations(splits, 2):
        assert not scenes[a] & scenes[b]
        assert not images[a] & images[b]
    for record in splits["test"]:
        assert set(record) >= {"id", "image", "family", "conversations"}
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert record["family"] in FAMILIES
        assert (DEFAULT_DATA_DIR / "images" / record["image"]).is_file()
    assert len({r["id"] for s in splits.values() for r in s}) == sum(len(s) for s in splits.values())


def test_pretraining_never_sees_held_out_scenes():
    held_out = held_out_hashes(DEFAULT_DATA_DIR)
    first = [h for _, (_, h) in zip(range(5), scene_stream(0, "pretrain", CONFIG))]
    skipped = [h for _, (_, h) in zip(range(5), scene_stream(0, "pretrain", CONFIG, exclude=set(first[:2])))]
    assert skipped[:3] == first[2:]
    stream = scene_stream(0, "pretrain", CONFIG, exclude=held_out)
    assert not {h for _, (_, h) in zip(range(2000), stream)} & held_out
    data = TrainingData(0, CONFIG, held_out, {"count": 1.0}, hold=0.2, ramp=0.5, turns=2)
    assert [data.max_objects(p) for p in (0.0, 0.2, 0.35, 0.5, 1.0)] == [1, 1, 3, 6, 6]
    assert [data.hide_probability(p) for p in (0.0, 0.2, 0.35, 0.5, 1.0)] == pytest.approx([1, 1, 0.5, 0, 0])
    image, turns, hidden, scene = data.sample(0.0)
    assert turns == [("how many objects are there ?", "1")] * 2
    assert len(hidden) == 63  # at the start of the curriculum every empty cell is hidden
    lone_objects = TrainingData(0, CONFIG, held_out, {"relation": 1.0}, hold=0.2, ramp=0.5)
    with pytest.raises(ValueError, match="cannot ask 1 questions about a scene of 1 object"):
        lone_objects.sample(0.0)  # relation needs two objects: an error, not an endless loop


def test_llava_json_round_trip(tmp_path):
    sizes = SplitSizes(train=6, val=3, test=3, certification=2, questions_per_image=2)
    written = generate_dataset(tmp_path, seed=1, sizes=sizes)
    for split, records in written.items():
        assert json.loads((tmp_path / f"{split}.json").read_text()) == records
        assert len(records) == 2 * getattr(sizes, split)
    assert generate_dataset(tmp_path, seed=1, sizes=sizes) == written  # same seed: same data, no error
    with pytest.raises(ValueError, match="overwrite"):
        generate_dataset(tmp_path, seed=2, sizes=sizes)
    replaced = generate_dataset(tmp_path, seed=2, sizes=sizes, overwrite=True)
    assert replaced != written
    assert len(list((tmp_path / "images").glob("*.png"))) == 14


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown question family 'colour_of_sky'"):
        make_question("colour_of_sky", SCENE, random.Random(0))
    with pytest.raises(ValueError, match="unknown question family 'nope'"):
        build_split("val", 2, seed=0, config=CONFIG, exclude=set(), families=("count", "nope"))
    with pytest.raises(ValueError, match="impossible configuration: max_objects=9"):
        SceneConfig(max_objects=9)
    with pytest.raises(ValueError, match="unknown split"):
        load_split(DEFAULT_DATA_DIR, "dev")
    with pytest.raises(ValueError, match="unknown question family 'glpyh'"):
        family_weights("glpyh=2")


def test_family_weights_default_to_one():
    weights = family_weights("describe=2, presence=0.5")
    assert weights == {**{family: 1.0 for family in FAMILIES}, "describe": 2.0, "presence": 0.5}


def test_processor_matches_the_training_encoding():
    processor = build_processor()
    question = "what colour is the object above the blue circle ?"
    assert chat_prompt(processor, question) == "<s>USER: <image>\n" + question + " ASSISTANT:"
    image = render(SCENE, CONFIG)
    inputs = processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt")
    encoder = Encoder(processor, CONFIG)
    assert inputs["input_ids"][0].tolist() == encoder.prompt_ids(question)
    assert (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 64
    assert torch.equal(inputs["pixel_values"], pixel_values([image]))
    assert encoder.answer_ids("red blue")[-1] == processor.tokenizer.eos_token_id


def test_packed_questions_train_exactly_the_single_turn_samples():
    """Every packed (question, answer) segment must give the logits the stock model gives the single-turn prompt
    plus answer on its own (2-D mask, default positions); labels are the answers, each weighing 1 in total."""
    processor = build_processor()
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    model = build_model(processor, ModelConfig(num_layers=2)).eval()
    encoder = Encoder(processor, CONFIG)
    image = render(SCENE, CONFIG)
    conversations = [SCENE_QA[1:4] + [("list the colours from top to bottom .", "red blue green")], SCENE_QA[:1]]
    batch = encoder.batch([image, image], conversations)
    labels, weights = batch.pop("labels"), batch.pop("label_weights")
    with torch.no_grad():
        packed = model(**batch).logits
        for row, turns in enumerate(conversations):
            end = 3 + 64  # <s> USER : and the visual tokens: the shared prefix
            for question, answer in turns:
                ids = encoder.prompt_ids(question) + encoder.answer_ids(answer)
                alone = model(input_ids=torch.tensor([ids]), pixel_values=batch["pixel_values"][:1]).logits[0]
                start, end = end, end + len(ids) - 67
                assert torch.allclose(packed[row, start:end], alone[67:], atol=1e-5)
                assert batch["input_ids"][row, start:end].tolist() == ids[67:]
    targets = [tokenizer.convert_ids_to_tokens(i) for i in labels[0].tolist() if i != -100]
    assert targets == ["3", "</s>", "green", "</s>", "square", "</s>", "red", "blue", "green", "</s>"]
    assert weights[0][labels[0] != -100].tolist() == pytest.approx([1 / 2] * 6 + [1 / 4] * 4)
    assert weights[1].sum().item() == pytest.approx(1.0)


def test_vision_codes_are_sums_of_the_object_words_embeddings():
    tokenizer = build_processor(CONFIG).tokenizer
    embeddings = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0))
    codes = CellCodes(embeddings, tokenizer, seed=0)
    targets = codes.targets(CellCodes.indices([SCENE], CONFIG.grid))[0]

    def unit_embedding(word):
        vector = embeddings[tokenizer.convert_tokens_to_ids(word)]
        return vector / vector.norm()

    red_square, blue_circle, empty = 1 * 8 + 2, 4 * 8 + 6, 0
    expected = sum(unit_embedding(w) for w in ("red", "square", "big", "3"))
    assert torch.allclose(targets[red_square], expected)
    expected = sum(unit_embedding(w) for w in ("blue", "circle", "small", "blank"))
    assert torch.allclose(targets[blue_circle], expected)
    assert torch.allclose(targets[empty], codes.empty) and codes.empty.norm().item() == pytest.approx(1.0)
    assert (targets.norm(dim=-1) > 1.5).sum() == 3  # only the three objects carry four codes


def test_vision_code_accuracy_reads_each_attribute():
    tokenizer = build_processor(CONFIG).tokenizer
    embeddings = torch.randn(len(tokenizer), 96, generator=torch.Generator().manual_seed(0))
    codes = CellCodes(embeddings, tokenizer, seed=0)
    indices = CellCodes.indices([SCENE], CONFIG.grid)
    exact = codes.targets(indices)
    assert codes.accuracy(exact, indices) == {"empty": 1.0, "colour": 1.0, "shape": 1.0, "size": 1.0, "glyph": 1.0}
    swapped = exact.clone()
    swapped[0, 1 * 8 + 2] = exact[0, 4 * 8 + 6]  # the red square's token now says "small blue circle"
    accuracy = codes.accuracy(swapped, indices)
    assert accuracy["colour"] == accuracy["shape"] == accuracy["size"] == accuracy["glyph"] == pytest.approx(2 / 3)


def test_checkpoint_loads_with_auto_classes_and_is_small():
    model = AutoModelForImageTextToText.from_pretrained(TESTBED_MODEL_DIR)
    processor = AutoProcessor.from_pretrained(TESTBED_MODEL_DIR)
    assert model.config.text_config.num_hidden_layers >= 12
    assert model.config.image_seq_length >= 60
    assert processor.tokenizer.padding_side == "left"
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    assert (TESTBED_MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20


def test_pretraining_defaults_reproduce_the_shipped_checkpoint():
    """`python -m dyvte.testbed.pretrain` with no options must rebuild what is committed: its recorded options are
    today's defaults, and its config has the default architecture."""
    recorded = json.loads((TESTBED_MODEL_DIR / "training_log.json").read_text())["args"]
    defaults = vars(parse_args([]))
    run_specific = {"data_dir", "out", "overwrite"}
    assert {k: v for k, v in recorded.items() if k not in run_specific} == {
        k: defaults[k] for k in recorded if k not in run_specific
    }
    text = AutoModelForImageTextToText.from_pretrained(TESTBED_MODEL_DIR).config.text_config
    expected = ModelConfig()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        expected.hidden_size, expected.num_layers, expected.num_heads, expected.intermediate_size
    )
    assert text.rope_parameters["rope_theta"] == expected.rope_theta
    # options added after the shipped build default to what that build did
    added = {k: v for k, v in defaults.items() if k not in recorded}
    assert added == {"rope_theta": 10000.0, "tie_embeddings": True, "freeze_embeddings": False, "grounding_weight": 0.0, "grounding_layer": 2,
                     "grounding_head": 0, "answer_grounding_weight": 0.0, "answer_grounding_layer": 4,
                     "device": "cpu", "workers": 0, "precision": "fp32"}


def test_pretraining_with_data_workers(tmp_path):
    """A GPU build feeds the model from worker processes: a few steps on the CPU run through and are logged."""
    from dyvte.testbed.pretrain import pretrain

    args = parse_args(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "model"), "--steps", "4",
                       "--vision-steps", "2", "--eval-every", "4", "--workers", "2", "--threads", "1",
                       "--grounding-weight", "1", "--answer-grounding-weight", "1"])
    summary = pretrain(args)
    assert summary["device"] == "cpu, 1 threads" and summary["log"][-1]["step"] == 4
    assert summary["log"][-1]["grounding_loss"] > 0
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "model").config.text_config.num_hidden_layers == 12


@pytest.mark.xfail(
    strict=True,
    reason="issue 3: the shipped checkpoint is undertrained (70.8% test accuracy, target 85%); strict, so this "
    "fails loudly, and must lose this marker, once a better checkpoint answers correctly",
)
def test_checkpoint_answers_hand_made_questions(testbed):
    model, processor = testbed
    image = render(SCENE, CONFIG)
    questions, answers = zip(*SCENE_QA)
    assert greedy_answers(model, processor, [image] * len(questions), list(questions)) == list(answers)


def fixed_test_questions(testbed):
    from PIL import Image

    model, processor = testbed
    records = [r for f in FAMILIES for r in load_split(DEFAULT_DATA_DIR, "test") if r["family"] == f][::40][:16]
    images = [Image.open(DEFAULT_DATA_DIR / "images" / r["image"]).convert("RGB") for r in records]
    questions = [r["conversations"][0]["value"].removeprefix("<image>\n") for r in records]
    return records, images, questions, greedy_answers(model, processor, images, questions)


def test_checkpoint_answers_batched_like_one_by_one(testbed):
    model, processor = testbed
    _, images, questions, batched = fixed_test_questions(testbed)
    single = [greedy_answers(model, processor, [i], [q])[0] for i, q in zip(images[:4], questions[:4])]
    assert batched[:4] == single


@pytest.mark.xfail(
    strict=True,
    reason="issue 3: the shipped checkpoint is undertrained (70.8% test accuracy, target 85%); strict, so this "
    "fails loudly, and must lose this marker, once a better checkpoint answers correctly",
)
def test_checkpoint_answers_fixed_test_questions(testbed):
    records, _, _, batched = fixed_test_questions(testbed)
    correct = sum(a == r["conversations"][1]["value"] for a, r in zip(batched, records))
    assert correct >= len(records) - 2
