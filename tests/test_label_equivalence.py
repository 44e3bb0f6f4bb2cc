"""Dense labels under real tokenizers and chat templates equal what greedy generation with exit does.

The tiny real-format models are first taught a few answers, on sequences tokenized as each family was trained
(the whole conversation text: LLaVA's "USER: <image>\\n{q} ASSISTANT: {a}</s>", Qwen's chat template with the
assistant turn and its <|im_end|>), so that greedy generation produces real answers. Then, for every sample and
every exit layer k, the label pass (`LabelModule.predict_step`: prompts, answer tokens, dense pass) must say
"reproduces" exactly when `engine.generate` with exit at k does:
- `labels.reference=model`: the generated tokens equal the model's own full-depth greedy answer;
- `labels.reference=ground_truth`: the generated text (decoded, special tokens skipped, stopped by an EOS) is the
  dataset answer. This reference is text, so it does not depend on how dyvte tokenizes the answer.
"""

import pytest
import torch
from fixtures.real_format import fixture
from PIL import Image

from dyvte.data import PromptCollator, Sample
from dyvte.engine import generation_eos_ids
from dyvte.loading import load_mllm
from dyvte.training.dense_labels import LabelConfig
from dyvte.training.label_run import LabelModule

COLORS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
MAX_NEW_TOKENS = 8


def qa_pairs() -> list[tuple[str, str, str]]:
    """(color, question, answer): one answer needs the image, one the image and the words, one only the words."""
    pairs = []
    for color in COLORS:
        pairs.append((color, "<image>\nWhat color is the image?", f"{color.capitalize()}."))
        pairs.append((color, "Is the image red? <image>", "Yes" if color == "red" else "No"))
        pairs.append((color, "<image>\nHow many sides does a square have?", "4 sides"))
    return pairs


def trained_sequence(family: str, processor, question: str, answer: str) -> tuple[str, int]:
    """The training text of one turn, as the family was trained, and the EOS it ends with (reference: written out
    per family here, not taken from dyvte)."""
    text = question.replace("<image>", "").strip()
    if family == "llava-1.5":  # LLaVA-1.5's conv_vicuna_v1: roles "USER"/"ASSISTANT", sep " ", sep2 "</s>"
        return f"USER: <image>\n{text} ASSISTANT: {answer}", processor.tokenizer.eos_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    rendered = processor.apply_chat_template(messages)
    return rendered[: rendered.rindex(answer) + len(answer)], processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def teach(family: str, model, processor, images: dict, steps: int = 200) -> None:
    """A few Adam steps on the answer tokens (and EOS) of every pair, whole-text tokenization (the LM head only
    at those positions, to keep it cheap)."""
    prompts, targets, pictures = [], [], []
    for color, question, answer in qa_pairs():
        text, eos = trained_sequence(family, processor, question, answer)
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                              "text": question.replace("<image>", "").strip()}]}],
            add_generation_prompt=True)
        assert text.startswith(prompt)
        prompts.append(text), targets.append((prompt, eos)), pictures.append(images[color])
    processor.tokenizer.padding_side = "right"
    batch = processor(images=pictures, text=prompts, padding=True, return_tensors="pt")
    ids = batch["input_ids"]
    eos_column = torch.full((len(ids), 1), processor.tokenizer.pad_token_id)
    ids = torch.cat([ids, eos_column], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.zeros_like(eos_column)], dim=1)
    labels = torch.full_like(ids, -100)
    for row, (prompt, eos) in enumerate(targets):
        n_prompt = len(processor(images=[pictures[row]], text=[prompt])["input_ids"][0])
        n_text = int(batch["attention_mask"][row].sum())
        ids[row, n_text], mask[row, n_text] = eos, 1
        labels[row, n_prompt : n_text + 1] = ids[row, n_prompt : n_text + 1]
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in inputs:  # Qwen: one entry per token, the EOS column is text
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(eos_column)], dim=1)
    row, position = (labels[:, 1:] != -100).nonzero(as_tuple=True)  # position predicts position + 1
    targets = labels[row, position + 1]
    torch.manual_seed(0)
    model.train()
    # the vision encoder stays random (cheaper; its features differ by image), its projector or merger learns
    trained = [p for name, p in model.named_parameters()
               if ("visual" not in name and "vision_tower" not in name) or "merger" in name]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    model.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    for _ in range(steps):
        hidden = model.model(input_ids=ids, attention_mask=mask, **inputs).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[row, position]), targets)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    model.requires_grad_(False).eval()


@pytest.fixture(scope="module", params=["llava-1.5", "qwen2-vl"])
def taught(request, tmp_path_factory):
    family = request.param
    model, processor = load_mllm(str(fixture(family)))
    size = 56
    folder = tmp_path_factory.mktemp("images")
    images = {}
    for color, rgb in COLORS.items():
        images[color] = Image.new("RGB", (size, size), rgb)
        images[color].save(folder / f"{color}.png")
    teach(family, model, processor, images)
    samples = [Sample(id=f"{color}-{i}", image=str(folder / f"{color}.png"), question=q, answer=a)
               for i, (color, q, a) in enumerate(qa_pairs())]
    return family, model, processor, samples


def generated_answers(module, batch, exit_layer: int) -> list[list[int]]:
    """Greedy generation with exit at `exit_layer`, each cut after its first EOS (as generation stops there)."""
    inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
    out = module.engine.generate(**inputs, exit_layer=exit_layer, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    eos = set(generation_eos_ids(module.model))
    rows = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        ends = [i for i, token in enumerate(row) if token in eos]
        rows.append(row[: ends[0] + 1] if ends else row + [None])  # None: no EOS within max_new_tokens
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["model", "ground_truth"])
def test_dense_labels_equal_generation_with_exit(taught, reference):
    family, model, processor, samples = taught
    collator = PromptCollator(processor)
    batch = collator(samples)
    assert not batch["skipped"]
    module = LabelModule(model, collator, LabelConfig(reference=reference, max_new_tokens=MAX_NEW_TOKENS))
    rows = module.predict_step(batch, 0)["rows"]
    num_layers = module.engine.num_layers
    eos = set(generation_eos_ids(model))
    full = generated_answers(module, batch, num_layers)
    compared = 0
    for k in range(num_layers + 1):
        generated = generated_answers(module, batch, k)
        for row, sample in enumerate(samples):
            if reference == "model":
                reproduces = generated[row] == full[row]
            else:
                # the answer's own tokens, as generation would emit them: for these templates the answer encoded
                # alone; a generation that spells the same text in other tokens ("r" + "ed") does not reproduce it
                complete = generated[row][-1] in eos
                answer = processor.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
                reproduces = complete and generated[row][:-1] == answer
            assert rows["match"][row][k] == reproduces, (family, reference, sample.id, k, generated[row])
            compared += 1
    matches = torch.tensor(rows["match"])
    # meaningful only if taught answers come back (as text) at full depth, and not at every exit: at least half of
    # them (the 200 teaching steps give 4 to 6 of the 6, depending on the machine's kernels)
    taught = [full[row][-1] in eos and processor.tokenizer.decode(full[row][:-1], skip_special_tokens=True).strip()
              == sample.answer for row, sample in enumerate(samples)]
    assert sum(taught) >= len(samples) / 2 and not matches.all()
    assert compared == len(samples) * (num_layers + 1)
