"""The dense label pass against generation with exit, per-layer engine passes and the stock hidden states."""

import pytest
import torch
from tiny_models import EOS, IMAGE_TOKEN, PAD, Sample, build_batch, build_model

from dyvte import VisualExit
from dyvte.engine import greedy_answers
from dyvte.training.dense_labels import LabelConfig, candidate_exits, dense_labels

L = 4
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def setup():
    samples = [Sample(text_before=1 + i % 3, text_after=4 + i % 4, left_pad=i % 3) for i in range(16)]
    for seed in range(3, 30):
        model = build_model("llava", num_layers=L, seed=seed)
        # Shrink the image features so that late exits often keep the answer, early ones rarely: both occur.
        model.model.multi_modal_projector.linear_2.weight.data *= 0.3
        engine = VisualExit(model)
        batch = build_batch(model, samples, seed=1)
        answers = greedy_answers(engine, batch, NEW_TOKENS, EOS)
        # A random model may "answer" with the image token id; the per-layer reference below would read it as
        # an image placeholder, so pick a model that does not.
        if all(IMAGE_TOKEN not in answer for answer in answers):
            break
    candidates = candidate_exits(LabelConfig(), [str(i) for i in range(16)], L)
    labels = dense_labels(engine, batch, answers, candidates, "after_first_visual", PAD)
    return engine, batch, answers, labels


def test_match_is_greedy_generation_with_exit(setup):
    engine, batch, answers, labels = setup
    prompt_length = batch["input_ids"].shape[1]
    for k in range(L + 1):
        generated = engine.generate(**batch, exit_layer=k, max_new_tokens=NEW_TOKENS, do_sample=False)
        for row, answer in enumerate(answers):
            reproduces = generated[row, prompt_length : prompt_length + len(answer)].tolist() == answer
            assert bool(labels.match[row, k]) == reproduces, f"sample {row}, exit {k}"
    # the comparison is only meaningful if both outcomes occur
    assert labels.match[:, :L].any() and not labels.match[:, :L].all()
    assert labels.match[:, L].all()


def test_dense_equals_independent_per_layer_passes(setup):
    engine, batch, answers, labels = setup
    prompt_length = batch["input_ids"].shape[1]
    width = max(len(a) for a in answers)
    ids = torch.cat([batch["input_ids"], torch.tensor([a + [PAD] * (width - len(a)) for a in answers])], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    for k in range(L + 1):
        logits = engine(input_ids=ids, attention_mask=mask, position_ids=positions, exit_layer=k,
                        pixel_values=batch["pixel_values"], use_cache=False).logits
        for row, answer in enumerate(answers):
            predicted = logits[row, prompt_length - 1 : prompt_length - 1 + len(answer)]
            target = torch.tensor(answer)
            ce = torch.nn.functional.cross_entropy(predicted, target)
            assert bool(labels.match[row, k]) == bool((predicted.argmax(-1) == target).all())
            assert abs(float(labels.ce[row, k]) - float(ce)) <= 1e-5


def test_labels_follow_eq6(setup):
    _, _, _, labels = setup
    alpha = 1.03
    expected = labels.match & (labels.ce < alpha * labels.ce[:, L:])
    assert torch.equal(labels.labels(alpha), expected.to(torch.int8))
    assert (labels.labels(alpha)[:, L] == 1).all()


def test_features_are_stock_hidden_states(setup):
    engine, batch, _, labels = setup
    with torch.no_grad():
        hidden = engine.model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each layer
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row in range(ids.shape[0]):
        first_visual = int((ids[row] == IMAGE_TOKEN).nonzero()[0])
        text = [t for t in range(first_visual, ids.shape[1] - 1) if ids[row, t] != IMAGE_TOKEN and mask[row, t]]
        for layer in range(L - 1):  # HF's last hidden state is after the final norm; the head reads it before
            expected = torch.cat([hidden[layer + 1][row, text].mean(0), hidden[layer + 1][row, -1]])
            assert torch.allclose(labels.features[row, layer].float(), expected, atol=2e-3, rtol=2e-3)


def test_random_and_listed_layers():
    ids = [str(i) for i in range(50)]
    random_layers = candidate_exits(LabelConfig(layers="random"), ids, 12)
    assert (random_layers.sum(1) == 2).all() and random_layers[:, 12].all()
    assert torch.equal(random_layers, candidate_exits(LabelConfig(layers="random"), ids, 12))
    assert len(set(random_layers[:, :12].int().argmax(1).tolist())) > 5
    listed = candidate_exits(LabelConfig(layers=[2, 5]), ids, 12)
    assert listed[0].nonzero().squeeze(1).tolist() == [2, 5, 12]
    with pytest.raises(ValueError, match=r"labels.layers \[13\] outside \[0, 12\]"):
        candidate_exits(LabelConfig(layers=[13]), ids, 12)


def test_match_full_model_compares_exits_with_the_full_models_teacher_forced_argmax(setup):
    """Where the full model, teacher-forced, does not reproduce the answer (bf16 rounding at 7B; here: answers
    with a token changed), `match_full_model=True` compares each exit with the full model's own argmax."""
    engine, batch, answers, _ = setup
    changed = [a[:1] + [(a[1] + 7) % 50 + 3] + a[2:] if len(a) > 1 else a for a in answers]
    candidates = candidate_exits(LabelConfig(), [str(i) for i in range(len(changed))], L)
    labels = dense_labels(engine, batch, changed, candidates, "after_first_visual", PAD, match_full_model=True)
    prompt_length = batch["input_ids"].shape[1]
    width = max(len(a) for a in changed)
    ids = torch.cat([batch["input_ids"], torch.tensor([a + [PAD] * (width - len(a)) for a in changed])], dim=1)
    mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in changed])
    mask = torch.cat([batch["attention_mask"], mask], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    argmax = {
        k: engine(input_ids=ids, attention_mask=mask, position_ids=positions, exit_layer=k,
                  pixel_values=batch["pixel_values"], use_cache=False).logits.argmax(-1)
        for k in range(L + 1)
    }
    for row, answer in enumerate(changed):
        span = slice(prompt_length - 1, prompt_length - 1 + len(answer))
        full = argmax[L][row, span]
        assert bool(labels.reproduces[row]) == bool((full == torch.tensor(answer)).all())
        for k in range(L + 1):
            assert bool(labels.match[row, k]) == bool((argmax[k][row, span] == full).all()), f"sample {row}, exit {k}"
    assert not labels.reproduces.all() and labels.match[:, L].all()
    assert labels.match[:, :L].any() and not labels.match[:, :L].all()
